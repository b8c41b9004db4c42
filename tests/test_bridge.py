"""bridge mode: the job is a port of the site's bridge (real kernel).

The worker's uplink is a port of a bridge (lktbr0) that holds the worker's
own addresses; the site runs radvd as its router.  A job gets an address of
this node's range of the site's subnet, its IPv6 address by the site's RAs,
and can send only as itself.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sites import BRIDGE, BRIDGE_POOL, DHCP_RANGE, bridged_site, missing, required
from tests.test_run import run_job
from tests.world import PEER, PORT, SITE4, SITE6, World, sh

POOL = BRIDGE_POOL
KNOBS = {"LARKNS_BRIDGE": BRIDGE, "LARKNS_BRIDGE_IPV4_POOL": POOL, "LARKNS_SLAAC_TIMEOUT": "5"}


def bridged_world(prefix: str) -> Iterator[World]:
    """A world whose worker reaches the site through a bridge, and whose
    site has a router (radvd) and a DHCP server (dnsmasq)."""
    required(missing("radvd", "dnsmasq"))
    w = World(prefix)
    try:
        with bridged_site(w) as dhcp:
            w.leases = dhcp.leases  # type: ignore[attr-defined]
            w.dhcp = dhcp  # type: ignore[attr-defined]
            yield w
    finally:
        w.close()


def without_leftovers(world: World) -> Iterator[World]:
    """`world` for one test, which fails if any of its jobs' objects are left."""
    yield world
    left = world.wait_no_leftovers()
    if left:
        world.larkns("gc", knobs=KNOBS)
        pytest.fail(f"leaked: {left}")


@pytest.fixture(scope="module")
def bridged() -> Iterator[World]:
    yield from bridged_world("lkt")


@pytest.fixture()
def site(bridged: World) -> Iterator[World]:
    yield from without_leftovers(bridged)


def _report(
    world: World, tmp_path: Path, script: str, privileged: bool = False, **knobs: str
) -> tuple[Any, Any]:
    """A bridged job's run; `privileged`: with all of root's capabilities (an
    attacker that may change its own addresses and neighbours)."""
    extra = ("--mode", "bridge", *(("--privileged",) if privileged else ()))
    return run_job(world, tmp_path, "sh", "-c", script, extra=extra, **(KNOBS | knobs))


def test_a_bridged_job_has_an_address_of_the_site_and_reaches_it_as_itself(
    site: World, tmp_path: Path
) -> None:
    script = (
        f"{sys.executable} {PEER} udp {SITE4} {PORT} 3 100 50 && "
        f"{sys.executable} {PEER} udp {SITE6} {PORT} 2 200 60"
    )
    proc, report = _report(site, tmp_path, script)
    assert proc.returncode == 0, proc.stderr
    v4, v6 = (json.loads(line) for line in proc.stdout.splitlines())
    ipv4 = report["addresses"]["ipv4"]
    assert ipaddress.IPv4Address(ipv4) in ipaddress.IPv4Network(POOL)
    (ipv6,) = report["addresses"]["ipv6"]
    assert ipaddress.IPv6Address(ipv6) in ipaddress.IPv6Network("2001:db8:0:1::/64")
    # On the site's own network: the site sees the job's addresses.
    assert v4["seen_as"] == ipv4 and v6["seen_as"] == ipv6
    fam = report["families"]
    assert fam["ipv4"]["bytes"] == {"outgoing": 3 * 128, "incoming": 3 * 78}
    assert fam["ipv6"]["bytes"] == {"outgoing": 2 * 248, "incoming": 2 * 108}
    assert report["dropped"] == {"packets": 0, "bytes": 0}


def test_a_bridged_job_cannot_send_as_another_address_or_mac(site: World, tmp_path: Path) -> None:
    script = (
        f"ping -q -c 1 -W 2 {SITE4} >/dev/null || exit 10; "
        "ip addr add 198.18.0.77/24 dev eth0 || exit 11; "
        f"ping -q -c 2 -i 0.2 -W 1 -I 198.18.0.77 {SITE4} >/dev/null && exit 12; "
        "ip addr del 198.18.0.77/24 dev eth0; "
        f"ping -q -c 1 -W 2 {SITE4} >/dev/null || exit 13"
    )
    proc, report = _report(site, tmp_path, script, privileged=True)
    assert proc.returncode == 0, proc.stderr
    assert report["dropped"]["packets"] >= 2


def _dropped(report: dict[str, Any]) -> int:
    return int(report["dropped"]["packets"])


RAW = """
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
me = s.getsockname()[4]
kind = sys.argv[1]
if kind == "arp":
    # "198.18.0.1 is at my MAC": a forged ARP reply, broadcast
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, me,
                       socket.inet_aton("198.18.0.1"), b"\\xff" * 6, socket.inet_aton("198.18.0.1"))
    s.send(b"\\xff" * 6 + me + b"\\x08\\x06" + body)
elif kind == "mac":
    # an IPv4 frame from another MAC
    s.send(b"\\xff" * 6 + b"\\x02\\x00\\x00\\x00\\x00\\x99" + b"\\x08\\x00" + bytes(46))
print("sent")
"""


@pytest.mark.parametrize("kind", ["arp", "mac"])
def test_forged_arp_answers_and_foreign_macs_are_dropped(
    site: World, tmp_path: Path, kind: str
) -> None:
    proc, report = run_job(
        site, tmp_path, "/usr/bin/python3", "-c", RAW, kind, extra=("--mode", "bridge"), **KNOBS
    )
    assert proc.returncode == 0 and "sent" in proc.stdout, proc.stderr
    assert _dropped(report) == 1
    neigh = sh("ip", "neigh", "show", SITE4, ns=site.worker).stdout
    assert "02:00:00:00:00:99" not in neigh


ROGUE = """
import socket, struct
idx = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.sendto(struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0), ("ff02::1", 0, 0, idx))
# a neighbour advertisement for the site's router's address (override)
na = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000, socket.inet_pton(socket.AF_INET6, "SITE6"))
s.sendto(na, ("ff02::1", 0, 0, idx))
# a DHCP server's reply (BOOTREPLY), from port 67 to the whole link
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
d.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
d.bind(("0.0.0.0", 67))
d.sendto(b"\x02" + bytes(299), ("255.255.255.255", 68))
print("sent")
""".replace("SITE6", SITE6)


def test_a_bridged_job_cannot_act_as_the_site_s_router_or_dhcp_server(
    site: World, tmp_path: Path
) -> None:
    proc, report = run_job(
        site, tmp_path, "/usr/bin/python3", "-c", ROGUE, extra=("--mode", "bridge"), **KNOBS
    )
    assert proc.returncode == 0 and "sent" in proc.stdout, proc.stderr
    assert _dropped(report) == 3  # the RA, the forged NA, the DHCP reply


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({"LARKNS_BRIDGE": "lktnosuch0"}, "LARKNS_BRIDGE: no link"),
        ({"LARKNS_BRIDGE": "up0"}, "is not a bridge"),
        ({"LARKNS_BRIDGE_IPV4_POOL": "198.18.200.0/26"}, "is not within the IPv4 subnet"),
    ],
)
def test_bad_bridge_config_gets_a_one_line_error(
    site: World, tmp_path: Path, knobs: dict[str, str], words: str
) -> None:
    proc, _ = run_job(site, tmp_path, "true", extra=("--mode", "bridge"), **(KNOBS | knobs))
    assert proc.returncode == 125, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


DHCP = KNOBS | {"LARKNS_BRIDGE_IPV4": "dhcp"}
# The job's MAC, from inside (/sys would show the host's links).
MAC_OF_ETH0 = "ip -o link show eth0 | sed 's/.*link.ether \\([0-9a-f:]*\\).*/\\1/'"


def _lease_expiry(world: World, mac: str) -> int | None:
    leases: Path = world.leases  # type: ignore[attr-defined]
    for line in leases.read_text().splitlines() if leases.exists() else []:
        expiry, lease_mac, *_ = line.split()
        if lease_mac == mac:
            return int(expiry)
    return None


def test_a_bridged_job_gets_its_ipv4_address_from_the_site_s_dhcp_server(
    site: World, tmp_path: Path
) -> None:
    script = f"{sys.executable} {PEER} udp {SITE4} {PORT} 2 100 50; {MAC_OF_ETH0}"
    proc, report = run_job(site, tmp_path, "sh", "-c", script, extra=("--mode", "bridge"), **DHCP)
    assert proc.returncode == 0, proc.stderr
    first, mac = proc.stdout.splitlines()
    ipv4 = str(report["addresses"]["ipv4"])  # type: ignore[index]
    assert ipaddress.IPv4Address(DHCP_RANGE[0]) <= ipaddress.IPv4Address(ipv4)
    assert ipaddress.IPv4Address(ipv4) <= ipaddress.IPv4Address(DHCP_RANGE[1])
    assert json.loads(first)["seen_as"] == ipv4
    # Given back at the end: the server no longer holds it for the job.
    leases: Path = site.leases  # type: ignore[attr-defined]
    assert leases.exists()
    assert _lease_expiry(site, mac.strip()) is None


def test_a_bridged_job_keeps_its_lease_for_as_long_as_it_runs(site: World) -> None:
    p = site.larkns_popen(
        "run", "--mode", "bridge", "--", "sh", "-c", f"{MAC_OF_ETH0}; exec sleep 6", knobs=DHCP
    )
    assert p.stdout is not None
    mac = p.stdout.readline().strip()
    first = _lease_expiry(site, mac)
    time.sleep(4.5)
    later = _lease_expiry(site, mac)
    _out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    # Renewed at T1 (every 2 s): the server moved the lease's end on.
    leases: Path = site.leases  # type: ignore[attr-defined]
    assert first is not None and later is not None and later >= first + 3, (
        first,
        later,
        mac,
        leases.read_text() if leases.exists() else "(no lease file)",
        err,
    )
    assert _lease_expiry(site, mac) is None


def test_when_the_node_s_range_is_used_up_the_next_bridged_job_is_refused(
    site: World, tmp_path: Path
) -> None:
    one = KNOBS | {"LARKNS_BRIDGE_IPV4_POOL": "198.18.0.130/32"}
    p = site.larkns_popen(
        "run", "--mode", "bridge", "--name", "lktone", "--", "sh", "-c", "echo up; exec sleep 30",
        knobs=one,
    )  # fmt: skip
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "up"
        proc, _ = run_job(site, tmp_path, "true", extra=("--mode", "bridge"), **one)
        assert proc.returncode == 125
        assert "exhausted" in proc.stderr and "LARKNS_BRIDGE_IPV4_POOL" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        p.terminate()
        p.communicate(timeout=10)


def test_a_lease_the_server_refuses_is_dropped_and_a_new_one_taken(site: World) -> None:
    """The site's server restarts with another range: it refuses (NAK) the
    job's renewal; the job loses that address and gets one of the new range."""
    dhcp = site.dhcp  # type: ignore[attr-defined]
    show = "ip -4 -o addr show dev eth0"
    p = site.larkns_popen(
        "run", "--mode", "bridge", "--", "sh", "-c", f"{show}; read go; {show}",
        knobs=DHCP, stdin=True,
    )  # fmt: skip
    assert p.stdout is not None and p.stdin is not None
    try:
        before = p.stdout.readline()
        assert f" {DHCP_RANGE[0].rsplit('.', 1)[0]}." in before, before
        dhcp.start("198.18.0.240", "198.18.0.250")
        # T1 is 2 s: the renewal is refused, a new lease is taken at once.
        deadline = time.monotonic() + 15
        while True:
            out = sh("ip", "netns", "exec", _job_ns(site), "ip", "-4", "-o", "addr", "show",
                     "dev", "eth0", check=False).stdout  # fmt: skip
            if "198.18.0.24" in out or "198.18.0.250" in out:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.2)
        p.stdin.write("go\n")
        p.stdin.flush()
        after = p.stdout.readline()
        assert "198.18.0.2" in after and before.split()[3] not in after, (before, after)
    finally:
        dhcp.start()
        p.communicate(timeout=20)
    assert p.returncode == 0


def _job_ns(world: World) -> str:
    (ns,) = [n for n in os.listdir("/run/netns") if n.startswith(world.netns_prefix)]
    return str(ns)


def test_a_bridged_job_s_traffic_classes_are_counted(site: World, tmp_path: Path) -> None:
    script = (
        f"{sys.executable} {PEER} udp {SITE4} {PORT} 3 100 50 && "
        f"{sys.executable} {PEER} udp {SITE6} {PORT} 2 200 60"
    )
    proc, report = run_job(
        site,
        tmp_path,
        "sh",
        "-c",
        script,
        extra=("--mode", "bridge"),
        **(KNOBS | {"LARKNS_CLASSES": "Site = 198.18.0.1/32; Far = 2001:db8:0:1::1/128"}),
    )
    assert proc.returncode == 0, proc.stderr
    classes: dict[str, Any] = report["classes"]  # type: ignore[assignment]
    assert classes["Site"]["bytes"] == {"outgoing": 3 * 128, "incoming": 3 * 78}
    assert classes["Far"]["bytes"] == {"outgoing": 2 * 248, "incoming": 2 * 108}


# Frames that carry MARKER, so a capture in the site finds them whatever
# the kernel made of their tags.
MARKER = b"LKTMARK"
TAGGED = """
import socket, struct, sys
WORKER4, WORKER6, MARKER = sys.argv[1], sys.argv[2], sys.argv[3].encode()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
me = s.getsockname()[4]
ll = bytes.fromhex("fe80000000000000") + bytes([me[0] ^ 2]) + me[1:3] + b"\\xff\\xfe" + me[3:6]
print(me.hex(":"), socket.inet_ntop(socket.AF_INET6, ll), flush=True)

def sum16(data):
    data += bytes(len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def icmp6(dst, body):
    # a marker in an option no receiver knows (RFC 4861: ignored)
    body += bytes([253, 1]) + MARKER[:6]
    dst = socket.inet_pton(socket.AF_INET6, dst)
    pseudo = ll + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", sum16(pseudo + body)) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + ll + dst + body

vlan0 = b"\\x81\\x00\\x00\\x00"  # 802.1Q, VLAN 0 (a priority tag)
qinq = b"\\x88\\xa8\\x00\\x00" + vlan0  # 802.1ad outer tag, then 802.1Q
# RA: "I am a default router for 1800 s", with my link-layer address
ra = icmp6("ff02::1", struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + b"\\x01\\x01" + me)
# NA: "the worker's address is at my MAC" (override)
na = icmp6("ff02::1", struct.pack("!BBHI16s", 136, 0, 0, 0x20000000,
           socket.inet_pton(socket.AF_INET6, WORKER6)) + b"\\x02\\x01" + me)
# ARP reply: "the worker's address is at my MAC"
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, me, socket.inet_aton(WORKER4),
                  b"\\xff" * 6, socket.inet_aton(WORKER4)) + MARKER
# STP configuration BPDU claiming root priority 0, LLC-framed (802.3 length)
bpdu = b"\\x42\\x42\\x03" + bytes(4) + b"\\x00\\x00" + me + bytes(4) + b"\\x00\\x00" + me
bpdu += bytes(35 - len(bpdu) + 3) + MARKER
frames = [
    b"\\x33\\x33\\x00\\x00\\x00\\x01" + me + vlan0 + b"\\x86\\xdd" + ra,
    b"\\x33\\x33\\x00\\x00\\x00\\x01" + me + vlan0 + b"\\x86\\xdd" + na,
    b"\\xff" * 6 + me + vlan0 + b"\\x08\\x06" + arp,
    b"\\x33\\x33\\x00\\x00\\x00\\x01" + me + qinq + b"\\x86\\xdd" + ra,
    b"\\x01\\x80\\xc2\\x00\\x00\\x00" + me + struct.pack("!H", len(bpdu)) + bpdu,
]
for f in frames:
    s.send(f)
print(len(frames), flush=True)
"""

CAPTURE = """
import select, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind(("down0", 0))
print("ready", flush=True)
seen = 0
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    f = s.recv(65535) if s in ready else b""
    if sys.argv[1].encode() in f:
        seen += 1
    if sys.stdin in ready:
        break
print(seen, flush=True)
"""


def _neighbour(world: World, ns: str, addr: str) -> str:
    return sh("ip", "neigh", "show", addr, ns=ns).stdout


def test_a_bridged_job_cannot_hide_rogue_frames_behind_a_vlan_tag_or_send_stp(
    site: World, tmp_path: Path
) -> None:
    """VLAN 0 (a priority tag) is taken for untagged by the site and the
    worker, but hides the frame's type from rules keyed on it: a job that
    sent a tagged RA became a router, a tagged ARP reply or NA took over
    the worker's neighbour entries.  None of it may leave the job's port."""
    from tests.world import WORKER4, WORKER6

    # The entries a forged answer would take over.
    sh("ping", "-q", "-c", "1", "-W", "2", WORKER4, ns=site.site)
    sh("ping", "-6", "-q", "-c", "1", "-W", "2", WORKER6, ns=site.site)
    capture = subprocess.Popen(
        ["ip", "netns", "exec", site.site, sys.executable, "-c", CAPTURE, MARKER.decode()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert capture.stdout is not None and capture.stdin is not None
    try:
        assert capture.stdout.readline().strip() == "ready"
        proc, report = run_job(
            site, tmp_path, "/usr/bin/python3", "-c", TAGGED, WORKER4, WORKER6, MARKER.decode(),
            extra=("--mode", "bridge"), **KNOBS,
        )  # fmt: skip
        time.sleep(0.2)  # frames in flight reach the capture
    finally:
        out, _ = capture.communicate("\n", timeout=10)
    assert proc.returncode == 0, proc.stderr
    (mac, link_local), (sent,) = (line.split() for line in proc.stdout.splitlines())
    assert out.strip() == "0", "the site saw frames the job should not send"
    for ns, addr in ((site.site, WORKER4), (site.site, WORKER6), (site.worker, SITE4)):
        assert mac not in _neighbour(site, ns, addr), (ns, addr)
    for ns in (site.site, site.worker):
        routes = sh("ip", "-6", "route", "show", ns=ns).stdout
        assert link_local not in routes, (ns, routes)
    assert _dropped(report) == int(sent)


def test_a_bridged_job_s_port_is_disabled_by_a_bpdu_where_the_bridge_runs_stp(
    site: World,
) -> None:
    """With STP on, the bridge takes BPDUs for itself before any nftables
    hook: the job's port has BPDU guard (a BPDU disables it)."""
    p = site.larkns_popen("run", "--mode", "bridge", "--", "sh", "-c", "echo up; read x",
                          knobs=KNOBS, stdin=True)  # fmt: skip
    assert p.stdout is not None and p.stdin is not None
    try:
        assert p.stdout.readline().strip() == "up"
        ports = sh("ip", "-d", "-o", "link", "show", "master", BRIDGE, ns=site.worker).stdout
        (job_port,) = [line for line in ports.splitlines() if ": lk-" in line]
        assert " guard on " in job_port, job_port
    finally:
        p.communicate("\n", timeout=20)
    assert p.returncode == 0


ND_TYPED = """
import socket, sys
site, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)  # as ND has it
for kind in (133, 135, 130):  # RS, NS, MLD query, to the site's global address
    for _ in range(count):
        s.sendto(bytes([kind]) + bytes(size - 1), (site, 0))
print("sent")
"""


def test_a_bridged_job_s_icmpv6_of_link_control_types_to_a_site_address_is_traffic(
    site: World, tmp_path: Path
) -> None:
    count, size = 5, 1000
    proc, report = run_job(
        site, tmp_path, "/usr/bin/python3", "-c", ND_TYPED, SITE6, str(count), str(size),
        extra=("--mode", "bridge"), **KNOBS,
    )  # fmt: skip
    assert proc.returncode == 0 and "sent" in proc.stdout, proc.stderr
    out6 = report["families"]["ipv6"]  # type: ignore[index]
    assert out6["packets"]["outgoing"] == 3 * count
    assert out6["bytes"]["outgoing"] == 3 * count * (40 + size)


def test_bridged_jobs_do_not_reach_each_other(site: World, tmp_path: Path) -> None:
    """Not even a job that knows the other's MAC (a static neighbour entry,
    so its frames are unicast): dropped between the two ports, counted."""
    from larkns.modes.bridge import BridgeNetwork
    from larkns.plan import JobNetwork

    other = site.serving(
        "run", "--mode", "bridge", "--name", "lktbother", "--",
        sys.executable, PEER, "serve", str(PORT), knobs=KNOBS,
    )  # fmt: skip
    try:
        shown = json.loads(site.larkns("show", "lktbother").stdout)
        plan = JobNetwork.from_dict(shown["plan"])
        assert isinstance(plan, BridgeNetwork) and plan.ipv4_job is not None
        # A healthy bridged job is whole (its counters are in bridge larkns).
        assert shown["problems"] == []
        check = site.larkns("check", "lktbother")
        assert check.returncode == 0, check.stderr
        b4 = plan.ipv4_job.ip
        script = (
            f"ip neigh replace {b4} lladdr {plan.job_mac} dev eth0 || exit 10; "
            f"{sys.executable} {PEER} udp {b4} {PORT} 2 100 50 && exit 11; "
            f"{sys.executable} {PEER} udp {SITE4} {PORT} 1 100 50 >/dev/null || exit 12"
        )
        proc, report = _report(site, tmp_path, script, privileged=True)
    finally:
        other.terminate()
        other.communicate(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert _dropped(report) >= 1  # the datagram to the other job


def test_a_flushed_bridged_job_is_put_back_with_its_guard_and_counters(site: World) -> None:
    """bridge larkns goes with a flush of the ruleset like inet larkns:
    put back at once, the job's guard admitting its addresses again and
    its counters going on."""
    import time

    from larkns import watch
    from tests.test_flush import stop_if_running, table_back

    burst = f"{sys.executable} {PEER} udp {SITE4} {PORT} 20 100 100"
    job = site.larkns_popen(
        "run", "--mode", "bridge", "--name", "lktbfl", "--",
        "sh", "-c", f"{burst} && echo ready && read go && {burst}",
        stdin=True, knobs=KNOBS,
    )  # fmt: skip
    assert job.stdout is not None and job.stdin is not None
    try:
        assert json.loads(job.stdout.readline())["received"] == 20
        assert job.stdout.readline().strip() == "ready"
        time.sleep(watch.SAMPLE_INTERVAL * 1.5)
        before = json.loads(site.larkns("show", "lktbfl", knobs=KNOBS).stdout)["counters"]
        sh("nft", "flush", "ruleset", ns=site.worker)
        assert table_back(site, "lktbfl", within=1.0, knobs=KNOBS) < 1.0
        after = json.loads(site.larkns("show", "lktbfl", knobs=KNOBS).stdout)["counters"]
        assert after["ipv4"] == before["ipv4"]
        job.stdin.write("go\n")
        job.stdin.flush()
        assert json.loads(job.stdout.readline())["received"] == 20  # the guard lets it out
        _, err = job.communicate(timeout=30)
    finally:
        stop_if_running(job, site, KNOBS)
    assert job.returncode == 0, err
    assert "larkns: job lktbfl: put back" in err, err
