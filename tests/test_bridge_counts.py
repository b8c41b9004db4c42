"""bridge mode: each frame a job sends or receives is counted once (real kernel).

The bridge floods a broadcast or multicast frame to every port and to the
worker itself; a job's counters must still see it once.  Several jobs share
the site's bridge, in a world of their own (lktnXXXX).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from larkns.kernel import netns
from larkns.kernel.bridge import BRIDGE, COUNT_ONCE_MARKER, BridgeRuleset
from larkns.kernel.nftexpr import ACCOUNT_PRIORITY, Tap, counting_rules
from tests.test_bridge import KNOBS, ND_TYPED, bridged_world, without_leftovers
from tests.test_classes import Background
from tests.test_run import run_job
from tests.world import WORKER6, World, sh

# UDP headers on top of the payload: IPv4 20 + 8, IPv6 40 + 8.
V4, V6 = 28, 48
# Flood: where the jobs' broadcasts and multicasts go; Site: the site's own
# addresses (its link-local one sends to ff02::1).
CLASSES = "Flood = 198.18.0.255/32, 255.255.255.255/32, 224.0.0.0/4, ff02::/16; " + (
    "Site = 198.18.0.1/32, fe80::/10"
)


@pytest.fixture(scope="module")
def bridged() -> Iterator[World]:
    yield from bridged_world("lktn")


@pytest.fixture()
def site(bridged: World) -> Iterator[World]:
    yield from without_leftovers(bridged)


# UDP datagrams of SIZE bytes to the whole link from DEV: V4 of them to the
# IPv4 subnet's broadcast address, to 255.255.255.255 and to the mDNS group
# in turn, V6 to ff02::1 (all nodes).
FLOOD = """
import socket, sys
dev, v4, v6, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
for i in range(v4):
    s.sendto(bytes(size), (("198.18.0.255", "255.255.255.255", "224.0.0.251")[i % 3], 9))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for _ in range(v6):
    s6.sendto(bytes(size), ("ff02::1", 9, 0, socket.if_nametoindex(dev)))
"""


def _at(report: dict[str, Any], *keys: str) -> dict[str, int]:
    """The report's {"outgoing": N, "incoming": M} at `keys`."""
    found: Any = report
    for key in keys:
        found = found[key]
    return dict(found)


def _family(report: dict[str, Any], family: str, unit: str) -> dict[str, int]:
    return _at(report, "families", family, unit)


def _class(report: dict[str, Any], name: str) -> dict[str, int]:
    return _at(report, "classes", name, "bytes")


def test_broadcasts_and_multicasts_are_counted_once_each_way_with_three_jobs_on_the_bridge(
    site: World, tmp_path: Path
) -> None:
    """A job's flooded frames leave it once, whatever the number of ports
    they are flooded to (it was billed 14 packets for 7); the site's reach
    each job once."""
    flood = tmp_path / "flood.py"
    flood.write_text(FLOOD)
    sent4, sent6, size = 7, 5, 100  # from one job
    site4, site6, site_size = 6, 4, 60  # from the site, to every job
    bridge = ("--mode", "bridge")
    jobs: list[Background] = []
    try:
        for name in ("lktnq1", "lktnq2"):
            jobs.append(Background(site, tmp_path, name, CLASSES, "true", "true", KNOBS, bridge))
        send = f"{sys.executable} {flood} eth0 {sent4} {sent6} {size}"
        jobs.append(Background(site, tmp_path, "lktnsend", CLASSES, send, "true", KNOBS, bridge))
        sh(sys.executable, str(flood), "down0", str(site4), str(site6), str(site_size),
           ns=site.site)  # fmt: skip
        time.sleep(0.2)  # frames in flight reach the jobs' ports
        quiet1, quiet2, sender = (j.finish() for j in jobs)
    finally:
        for j in jobs:
            j.kill()
    out4, out6 = sent4 * (V4 + size), sent6 * (V6 + size)
    in4, in6 = site4 * (V4 + site_size), site6 * (V6 + site_size)
    assert _family(sender, "ipv4", "packets") == {"outgoing": sent4, "incoming": site4}
    assert _family(sender, "ipv6", "packets") == {"outgoing": sent6, "incoming": site6}
    assert _family(sender, "ipv4", "bytes") == {"outgoing": out4, "incoming": in4}
    assert _family(sender, "ipv6", "bytes") == {"outgoing": out6, "incoming": in6}
    assert _class(sender, "Flood") == {"outgoing": out4 + out6, "incoming": 0}
    assert _class(sender, "Site") == {"outgoing": 0, "incoming": in4 + in6}
    for quiet in (quiet1, quiet2):
        # The sender's frames never reach another job: not counted there.
        assert _family(quiet, "ipv4", "packets") == {"outgoing": 0, "incoming": site4}
        assert _family(quiet, "ipv6", "packets") == {"outgoing": 0, "incoming": site6}
        assert _class(quiet, "Flood") == {"outgoing": 0, "incoming": 0}
        assert _class(quiet, "Site") == {"outgoing": 0, "incoming": in4 + in6}
    for report in (quiet1, quiet2, sender):
        # Flooded frames stopped between jobs' ports are dropped quietly.
        assert report["dropped"] == {"packets": 0, "bytes": 0}


# Counts, on the site's link, the DHCP frames (UDP from port 68: a client's,
# from 67: a server's) until a line comes on stdin; a client's RELEASE is
# left out (the job's counters are read before its lease is given back).
DHCP_FRAMES = """
import select, socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind(("down0", 0))
print("ready", flush=True)
seen = {67: 0, 68: 0}
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in ready:
        break
    f = s.recv(65535)
    if f[12:14] != b"\\x08\\x00" or f[23] != 17:
        continue
    udp = 14 + (f[14] & 15) * 4
    (sport,) = struct.unpack("!H", f[udp:udp + 2])
    options = f[udp + 8 + 240:]
    kind, i = 0, 0
    while i + 1 < len(options) and options[i] != 255:
        if options[i] == 53:
            kind = options[i + 2]
        i += 1 if options[i] == 0 else 2 + options[i + 1]
    if sport in seen and kind != 7:
        seen[sport] += 1
print(seen[68], seen[67], flush=True)
"""


def test_a_bridged_job_s_dhcp_exchange_is_counted_as_the_site_sees_it(
    site: World, tmp_path: Path
) -> None:
    """DHCP's broadcasts (DISCOVER, REQUEST; the server's answers, which it
    is asked to broadcast) once each."""
    capture = subprocess.Popen(
        ["ip", "netns", "exec", site.site, sys.executable, "-c", DHCP_FRAMES],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert capture.stdout is not None
    try:
        assert capture.stdout.readline().strip() == "ready"
        dhcp = KNOBS | {"LARKNS_BRIDGE_IPV4": "dhcp"}
        proc, report = run_job(site, tmp_path, "true", extra=("--mode", "bridge"), **dhcp)
        time.sleep(0.2)  # frames in flight reach the capture
    finally:
        out, _ = capture.communicate("\n", timeout=10)
    assert proc.returncode == 0, proc.stderr
    client, server = (int(n) for n in out.split())
    assert client >= 2 and server >= 2, out  # at least DISCOVER, OFFER, REQUEST, ACK
    assert _family(report, "ipv4", "packets") == {"outgoing": client, "incoming": server}


def test_a_bridged_job_s_neighbour_discovery_with_the_worker_itself_is_link_control(
    site: World, tmp_path: Path
) -> None:
    """ND-typed ICMPv6 with hop limit 255 to the worker's own address stays
    on the link (to the same types addressed to the site, it is traffic:
    test_bridge)."""
    count, size = 4, 200
    proc, report = run_job(
        site, tmp_path, "/usr/bin/python3", "-c", ND_TYPED, WORKER6, str(count), str(size),
        extra=("--mode", "bridge"), **KNOBS,
    )  # fmt: skip
    assert proc.returncode == 0 and "sent" in proc.stdout, proc.stderr
    assert _family(report, "ipv6", "packets")["outgoing"] == 0
    assert _at(report, "link_control", "packets")["outgoing"] >= 3 * count


# How tables of an older larkns counted: at forward (both ends of a job's
# port), input (what a job sent to the worker) and output (what the worker
# sent to it), where a flooded frame passes once per port.
OLDER = dataclasses.replace(
    BRIDGE,
    taps=(
        Tap("forward", "iifname", None),
        Tap("forward", "oifname", ()),
        Tap("input", "iifname", ()),
        Tap("output", "oifname", ()),
    ),
)


def _nft(ns: str, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "-f", "-"],
        input=json.dumps({"nftables": list(cmds)}), capture_output=True, text=True, check=True,
    )  # fmt: skip
    if not done.stdout.strip():
        return []
    return [o for o in json.loads(done.stdout)["nftables"] if "metainfo" not in o]


def test_a_bridge_table_of_an_older_larkns_gets_its_counting_moved_in_place(site: World) -> None:
    """A larknsd upgraded while bridge jobs run: the table's counting goes to
    prerouting and postrouting in one transaction; the jobs keep their
    counters and map entries."""
    ns = f"{site.netns_prefix}older"
    classes = (("Site", (ipaddress.ip_network("198.18.0.1/32"),)),)
    sh("ip", "netns", "add", ns)
    try:
        with netns.entered(ns):
            rules = BridgeRuleset(classes)
            try:
                link_local = ipaddress.IPv6Address("fe80::400:ff:fe00:1")
                rules.add_job("lktnold", "lk-lktnold", "06:00:00:00:00:01", None, [link_local])
                # As an older larkns left it.
                listing = _nft(ns, BRIDGE.listing())
                _nft(
                    ns,
                    *({"flush": BRIDGE.chain(c)} for c in BRIDGE.chains()),
                    *({"delete": BRIDGE.chain(c)} for c in BRIDGE.chains()),
                    {"delete": BRIDGE.counter(COUNT_ONCE_MARKER)},
                    *({"flush": BRIDGE.chain(c)} for c in ("control_out", "control_in")),
                    *({"add": OLDER.base_chain(c, c, ACCOUNT_PRIORITY)} for c in OLDER.chains()),
                    *counting_rules(OLDER, listing),
                )
                assert not rules.serves_classes()
                rules.update_classes()
                assert rules.serves_classes()
                assert rules.has_job("lktnold", ["Site"])
                listing = _nft(ns, BRIDGE.listing())
            finally:
                rules.close()
    finally:
        sh("ip", "netns", "del", ns)
    chains = {o["chain"]["name"] for o in listing if "chain" in o}
    assert {"prerouting", "postrouting"} <= chains
    assert not chains & {"forward", "input", "output"}
    rules_of: dict[str, list[str]] = {}
    for o in listing:
        if "rule" in o:
            rules_of.setdefault(o["rule"]["chain"], []).append(json.dumps(o["rule"]["expr"]))
    # One counting rule in each link-control chain, the class's in the new chains.
    assert len(rules_of["control_out"]) == len(rules_of["control_in"]) == 1
    assert [c for c, rs in rules_of.items() for r in rs if "cls_Site_4" in r] == [
        "prerouting",
        "postrouting",
    ]
