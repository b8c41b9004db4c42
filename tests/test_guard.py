"""The guard: what a job may not send from its link (real kernel, simulated worker).

A job is root in its own network namespace: it can give itself any address,
and send router advertisements or DHCP replies.  None of it may leave its
link; all of it is counted as dropped (the report's "dropped").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_routed import KNOBS as ROUTED_KNOBS
from tests.test_routed import _job_addresses, routed_site  # noqa: F401 (a fixture)
from tests.test_run import run_job
from tests.world import PEER, PORT, SITE4, SITE6, WORKER4, WORKER6, World

# Inside 198.18.0.0/15 and 2001:db8::/32, outside anything the job was given.
FOREIGN4 = "198.19.200.1"
FOREIGN6 = "2001:db8:ff::1"

RA_AND_DHCP = """
import socket, struct
idx = socket.if_nametoindex("eth0")
ra = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
ra.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
# type 134, code 0, checksum (kernel), hop limit 64, flags 0, lifetime 1800 s
ra.sendto(struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0), ("ff02::1", 0, 0, idx))
dhcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dhcp.bind(("0.0.0.0", 67))
gw = [l.split()[2] for l in open("/proc/net/route") if l.split()[1] == "00000000"][0]
gw = socket.inet_ntoa(struct.pack("<I", int(gw, 16)))
dhcp.sendto(b"\\x02" + bytes(299), (gw, 68))  # a BOOTREPLY of 300 bytes
print("sent")
"""


def _packets_out(report: dict[str, Any], family: str) -> int:
    return int(report["families"][family]["packets"]["outgoing"])


def _dropped(report: dict[str, Any]) -> tuple[int, int]:
    d = report["dropped"]
    return d["packets"], d["bytes"]


def test_a_job_that_uses_an_ipv4_address_not_its_own_is_dropped_and_counted(
    clean_world: World, tmp_path: Path
) -> None:
    script = (
        f"ping -q -c 1 -W 1 {SITE4} >/dev/null || exit 10; "
        f"ip addr add {FOREIGN4}/32 dev eth0 || exit 11; "
        f"ping -q -c 3 -i 0.2 -W 1 -I {FOREIGN4} {SITE4} >/dev/null && exit 12; "
        f"ping -q -c 1 -W 1 {SITE4} >/dev/null || exit 13"
    )
    proc, report = run_job(clean_world, tmp_path, "sh", "-c", script, extra=("--privileged",))
    assert proc.returncode == 0, proc.stderr
    # three echo requests of 84 bytes each; the job's own pings went through
    assert _dropped(report) == (3, 3 * 84)
    assert _packets_out(report, "ipv4") == 2
    assert "dropped 3 pkts" in proc.stderr


def test_a_job_that_uses_an_ipv6_address_not_its_own_is_dropped_and_counted(
    clean_world: World, tmp_path: Path
) -> None:
    # The job's own ping first: its router's link-layer address is known then,
    # so the spoofed echo requests are all that is sent from the other address.
    script = (
        f"ping -6 -q -c 1 -W 1 {SITE6} >/dev/null || exit 10; "
        f"ip -6 addr add {FOREIGN6}/128 dev eth0 nodad || exit 11; "
        f"ping -6 -q -c 2 -i 0.2 -W 1 -I {FOREIGN6} {SITE6} >/dev/null && exit 12; "
        # (it would be chosen as the source for the site: closer to its address)
        f"ip -6 addr del {FOREIGN6}/128 dev eth0; "
        f"ping -6 -q -c 1 -W 1 {SITE6} >/dev/null || exit 13"
    )
    proc, report = run_job(clean_world, tmp_path, "sh", "-c", script, extra=("--privileged",))
    assert proc.returncode == 0, proc.stderr
    packets, nbytes = _dropped(report)
    assert packets >= 2 and nbytes >= 2 * 104, report["dropped"]
    assert _packets_out(report, "ipv6") == 2


def test_a_job_cannot_act_as_a_router_or_a_dhcp_server(clean_world: World, tmp_path: Path) -> None:
    proc, report = run_job(clean_world, tmp_path, "/usr/bin/python3", "-c", RA_AND_DHCP)
    assert proc.returncode == 0 and "sent" in proc.stdout, proc.stderr
    # the RA (40 + 16 bytes) and the DHCP reply (20 + 8 + 300 bytes)
    assert _dropped(report) == (2, 56 + 328)


def test_a_job_that_keeps_to_its_own_addresses_has_nothing_dropped(
    clean_world: World, tmp_path: Path
) -> None:
    script = f"ping -q -c 2 -i 0.2 {SITE4} >/dev/null && ping -6 -q -c 2 -i 0.2 {SITE6} >/dev/null"
    proc, report = run_job(clean_world, tmp_path, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert _dropped(report) == (0, 0)


def test_a_table_made_without_the_guard_gets_it_once() -> None:
    from larkns.kernel.nft import GUARD_MARKER, INET, Ruleset
    from larkns.kernel.nftexpr import feature_update

    old_table = [
        {"chain": {"name": "forward"}},
        {"chain": {"name": "postrouting"}},
        {"chain": {"name": "prerouting"}},
    ]
    added = feature_update(Ruleset.FEATURES, old_table)
    chains = [c["add"]["chain"]["name"] for c in added if "chain" in c.get("add", {})]
    assert chains[:2] == ["guard", "spoofed"]
    assert chains.count("guard") == 1
    assert {"add": INET.counter(GUARD_MARKER)} in added
    newer = [{"chain": {"name": c}} for c in ("guard", "control_out", "fence", "policy")]
    assert feature_update(Ruleset.FEATURES, [*old_table, *newer]) == []


ND_TYPED = """
import socket, sys
site, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)  # as ND has it
for kind in (133, 135, 136, 130):  # RS, NS, NA, MLD query: all to a site address
    for _ in range(count):
        s.sendto(bytes([kind]) + bytes(size - 1), (site, 0))
print("sent")
"""


def test_icmpv6_of_link_control_types_sent_beyond_the_link_is_counted_as_traffic(
    clean_world: World, tmp_path: Path
) -> None:
    """Neighbour discovery stays on its link; the same ICMPv6 types addressed
    to the site are forwarded like any packet, and are the job's traffic."""
    count, size = 5, 1000
    proc, report = run_job(
        clean_world, tmp_path, "/usr/bin/python3", "-c", ND_TYPED, SITE6, str(count), str(size)
    )
    assert proc.returncode == 0 and "sent" in proc.stdout, proc.stderr
    out6 = report["families"]["ipv6"]  # type: ignore[index]
    assert out6["packets"]["outgoing"] == 4 * count
    assert out6["bytes"]["outgoing"] == 4 * count * (40 + size)
    assert _dropped(report) == (0, 0)


WORKER_PORT = PORT + 1
PROBE = """
import json, socket, subprocess, sys, time
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(",", 1)
    if host == "gateway4":
        host = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True,
                              text=True).stdout.split()[2]
    elif host == "gateway6":
        host = subprocess.run(["ip", "-6", "route", "show", "default"], capture_output=True,
                              text=True).stdout.split()[2]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    addr = (host, int(port))
    if host.startswith("fe80:"):
        addr = (host, int(port), 0, socket.if_nametoindex("eth0"))
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    start = time.monotonic()
    try:
        s.connect(addr)
        got = "connected"
    except ConnectionRefusedError:
        got = "refused"
    except TimeoutError:
        got = "timeout"
    except OSError as e:
        got = e.strerror
    out[target] = [got, round(time.monotonic() - start, 3)]
    s.close()
print(json.dumps(out))
"""


def _probe(
    world: World, tmp_path: Path, mode: str, targets: list[str], knobs: dict[str, str]
) -> tuple[dict[str, list[Any]], dict[str, object]]:
    proc, report = run_job(
        world, tmp_path, "/usr/bin/python3", "-c", PROBE, *targets,
        extra=("--mode", mode), **knobs,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), report


@pytest.mark.parametrize("mode", ["nat", "routed"])
def test_a_job_reaches_neither_the_worker_s_services_nor_another_job(
    mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A service bound to 0.0.0.0/:: on the worker, and a server in another
    job, are refused at once (not left to time out), over IPv4 and IPv6,
    whichever of its addresses the job tries; the site stays reachable."""
    world: World = request.getfixturevalue("routed_site" if mode == "routed" else "clean_world")
    knobs = ROUTED_KNOBS if mode == "routed" else {}
    worker = subprocess.Popen(
        world.worker_cmd(sys.executable, PEER, "serve", str(WORKER_PORT)),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    other = None
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        other = world.serving(
            "run", "--mode", mode, "--name", "lktother", "--",
            sys.executable, PEER, "serve", str(PORT), knobs=knobs,
        )  # fmt: skip
        other4, other6 = _job_addresses(world, "lktother")
        refused = [f"{h},{WORKER_PORT}" for h in ("gateway4", "gateway6", WORKER4, WORKER6)]
        refused += [f"{other4},{PORT}", f"{other6},{PORT}"]
        reached = [f"{SITE4},{PORT}", f"{SITE6},{PORT}"]
        got, report = _probe(world, tmp_path, mode, refused + reached, knobs)
    finally:
        worker.kill()
        worker.wait()
        if other is not None:
            other.terminate()
            other.communicate(timeout=10)
    for target in refused:
        if target.startswith("gateway6"):
            # To the gateway's link-local address: ICMPv6 administratively
            # prohibited (EACCES) rather than a reset, which this kernel
            # takes for fatal at the SYN's first retransmission (1 s).
            assert got[target][0] == "Permission denied" and got[target][1] < 2, (target, got)
        else:
            assert got[target][0] == "refused" and got[target][1] < 1, (target, got)
    for target in reached:
        assert got[target][0] == "connected", (target, got)
    # one SYN each, two to the link-local gateway (its retransmission)
    assert _dropped(report)[0] == len(refused) + 1


def test_a_table_made_before_link_control_by_scope_gets_its_counting_chains_rebuilt() -> None:
    """In place, in one transaction: the counting chains are flushed and
    filled again, with the rules of the classes the table has."""
    from larkns.kernel.nft import INET, LINK_CONTROL_MARKER, Ruleset
    from larkns.kernel.nftexpr import feature_update

    chains = ("forward", "input", "output", "postrouting", "prerouting", "guard", "fence", "policy")
    old_table: list[dict[str, Any]] = [{"chain": {"name": c}} for c in chains]
    old_table.append({"set": {"name": "cls_Site_4"}})
    added = feature_update(Ruleset.FEATURES, old_table)
    flushed = [c["flush"]["chain"]["name"] for c in added if "flush" in c]
    assert flushed == ["forward", "input", "output"]
    class_rules = [c for c in added if "@cls_Site_4" in json.dumps(c)]
    assert len(class_rules) == 4  # forward (both ends), input, output
    assert {"add": INET.counter(LINK_CONTROL_MARKER)} in added
    newer = [*old_table, {"chain": {"name": "control_out"}}]
    assert feature_update(Ruleset.FEATURES, newer) == []
