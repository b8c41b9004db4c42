"""The guard: what a job may not send from its link (real kernel, simulated worker).

A job is root in its own network namespace: it can give itself any address,
and send router advertisements or DHCP replies.  None of it may leave its
link; all of it is counted as dropped (the report's "dropped").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.test_run import run_job
from tests.world import SITE4, SITE6, World

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
    proc, report = run_job(clean_world, tmp_path, "sh", "-c", script)
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
    proc, report = run_job(clean_world, tmp_path, "sh", "-c", script)
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
    from larkns.kernel import nft

    old_table = [
        {"chain": {"name": "forward"}},
        {"chain": {"name": "postrouting"}},
        {"chain": {"name": "prerouting"}},
    ]
    added = nft.feature_update(old_table)
    chains = [c["add"]["chain"]["name"] for c in added if "chain" in c["add"]]
    assert chains == ["guard", "spoofed"]
    assert {"add": {"counter": {**nft._T, "name": nft.GUARD_MARKER}}} in added
    assert nft.feature_update([*old_table, {"chain": {"name": "guard"}}]) == []
