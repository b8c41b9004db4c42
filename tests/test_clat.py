"""IPv6-only workers: jobs still get IPv4, through a CLAT toward the site's
NAT64 (464XLAT), (real kernel, simulated site), with either translator: the
kernel-side one (eBPF on the job's link) and tayga.

The worker has no IPv4 on its uplink.  The site runs a NAT64 (tayga) for
NAT64 (a network-specific prefix inside 2001:db8::/32: tayga refuses the
well-known 64:ff9b::/96 toward benchmark-range IPv4) and an IPv4 server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sites import NAT64, missing, required, v6only_site
from tests.test_run import run_job
from tests.world import PEER, PORT, RATE, SITE4, World, sh

KNOBS = {"LARKNS_NAT64_PREFIX": NAT64}
PY = sys.executable
RATE_PORT = 7790


@pytest.fixture(scope="module")
def v6only() -> Iterator[World]:
    required(missing("tayga"))
    w = World()
    try:
        with v6only_site(w):
            yield w
    finally:
        w.close()


@pytest.fixture()
def site(v6only: World) -> Iterator[World]:
    yield v6only
    left = v6only.wait_no_leftovers()
    if left:
        v6only.larkns("gc", knobs=KNOBS)
        pytest.fail(f"leaked: {left}")


@pytest.fixture(params=["bpf", "tayga"])
def translator(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs with both translators."""
    if request.param == "bpf":
        from larkns.kernel import clatbpf

        why = clatbpf.unavailable()
        if why is not None:
            required(f"the kernel-side CLAT cannot be used here: {why}")
    return str(request.param)


def knobs(translator: str) -> dict[str, str]:
    return KNOBS | {"LARKNS_CLAT_TRANSLATOR": translator}


def clat_job(
    world: World, tmp_path: Path, translator: str, *cmd: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`larkns run -- CMD` on the IPv6-only worker, with `translator`."""
    return run_job(
        world, tmp_path, *cmd, LARKNS_NAT64_PREFIX=NAT64, LARKNS_CLAT_TRANSLATOR=translator
    )


def test_on_an_ipv6_only_worker_a_job_reaches_an_ipv4_server_through_clat_and_nat64(
    site: World, tmp_path: Path, translator: str
) -> None:
    script = f"{PY} {PEER} udp {SITE4} {PORT} 3 100 50 && {PY} {PEER} tcp {SITE4} {PORT}"
    proc, report = clat_job(site, tmp_path, translator, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    udp, tcp = (json.loads(line) for line in proc.stdout.splitlines())
    # The job has IPv4 (the CLAT's), the server sees the site's NAT64.
    assert udp["local"] == "192.0.0.1" and report["addresses"]["ipv4"] == "192.0.0.1"
    assert udp["seen_as"].startswith("198.18.100.") and tcp["seen_as"].startswith("198.18.100.")
    assert report["clat"] == {"translator": translator, "untranslated_packets": 0}
    assert f"translated {'in the kernel' if translator == 'bpf' else 'by tayga'}" in proc.stderr
    assert report["dropped"] == {"packets": 0, "bytes": 0}


def test_udp_through_the_clat_is_counted_exactly_once_as_ipv6(
    site: World, tmp_path: Path, translator: str
) -> None:
    proc, report = clat_job(
        site, tmp_path, translator, PY, PEER, "udp", SITE4, str(PORT), "5", "100", "300"
    )
    assert proc.returncode == 0, proc.stderr
    fam = report["families"]
    # What crossed the job's link: IPv6, 20 bytes more per packet than the
    # IPv4 the job sent and received (40 + 8 of headers, then the payload).
    assert fam["ipv4"]["bytes"] == {"incoming": 0, "outgoing": 0}
    assert fam["ipv6"]["packets"] == {"incoming": 5, "outgoing": 5}
    assert fam["ipv6"]["bytes"] == {"incoming": 5 * 348, "outgoing": 5 * 148}


def test_ping_through_the_clat(site: World, tmp_path: Path, translator: str) -> None:
    proc, report = clat_job(
        site, tmp_path, translator, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "3", SITE4
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 received" in proc.stdout
    # Echo and reply of 64 bytes of ICMP, as ICMPv6 on the link.
    fam = report["families"]
    assert fam["ipv6"]["bytes"] == {"incoming": 3 * 104, "outgoing": 3 * 104}


def test_tcp_bulk_through_the_clat(site: World, tmp_path: Path, translator: str) -> None:
    with site.on_site(RATE, "sink", str(RATE_PORT)):
        proc, report = clat_job(
            site, tmp_path, translator, PY, RATE, "put", SITE4, str(RATE_PORT), "1"
        )
    assert proc.returncode == 0, proc.stderr
    sent = sum(json.loads(proc.stdout)["bins"])
    assert sent > 1 << 20
    # Every payload byte crossed the link once, with its headers.
    assert report["families"]["ipv6"]["bytes"]["outgoing"] > sent
    assert report["clat"]["untranslated_packets"] == 0


DATAGRAM = """
import json, socket, sys
size, how = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, how)  # IP_MTU_DISCOVER
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
s.settimeout(3)
s.connect((sys.argv[3], int(sys.argv[4])))
s.send((8192).to_bytes(4, "big") + b"x" * (size - 4))
out = {}
try:
    out["reply"] = len(s.recv(65535))
except OSError as e:
    out["error"] = e.errno
    import select
    if select.select([s], [], [], 1)[0]:
        try:
            msg, anc, _, _ = s.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
            for level, kind, data in anc:
                if level == socket.IPPROTO_IP and kind == 11:
                    errno_, origin, type_, code, _, info = __import__("struct").unpack_from(
                        "=IBBBBI", data)
                    out["icmp"] = [errno_, origin, type_, code, info]
        except OSError:
            pass
print(json.dumps(out))
"""
IP_PMTUDISC_DONT = 0
IP_PMTUDISC_PROBE = 3


def test_a_datagram_larger_than_the_route_mtu_is_fragmented_by_the_job_both_ways(
    site: World, tmp_path: Path, translator: str
) -> None:
    # DF clear, 3000 bytes: the job's kernel cuts it to the route's MTU,
    # each piece becomes an IPv6 fragment, the site's reply (8192 bytes, in
    # fragments) comes back to the job whole.
    proc, _ = clat_job(
        site,
        tmp_path,
        translator,
        PY,
        "-c",
        DATAGRAM,
        "3000",
        str(IP_PMTUDISC_DONT),
        SITE4,
        str(PORT),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"reply": 8192}


def test_a_df_packet_too_large_once_translated_gets_fragmentation_needed(
    site: World, tmp_path: Path
) -> None:
    # IP_PMTUDISC_PROBE: DF set, the route's MTU (1472) ignored, the link's
    # (1500) used: 1490 bytes of IPv4 would be 1510 of IPv6.  The CLAT
    # answers with ICMP "fragmentation needed", MTU 1472, from its gateway.
    proc, report = clat_job(
        site,
        tmp_path,
        "bpf",
        PY,
        "-c",
        DATAGRAM,
        str(1490 - 28),
        str(IP_PMTUDISC_PROBE),
        SITE4,
        str(PORT),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # EMSGSIZE, from ICMP (origin 2), type 3 code 4, MTU 1472.
    assert out["icmp"] == [90, 2, 3, 4, 1472], out
    assert report["families"]["ipv6"]["packets"]["outgoing"] == 0


def test_a_closed_port_on_the_ipv4_server_is_reported_to_the_job(
    site: World, tmp_path: Path, translator: str
) -> None:
    # The server's ICMP port unreachable, translated by the site's NAT64 to
    # ICMPv6 and back to ICMP by the CLAT, its inner packet too: the job's
    # connected socket sees ECONNREFUSED.
    proc, _ = clat_job(site, tmp_path, translator, PY, "-c", DATAGRAM, "100", "0", SITE4, "9")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["error"] == 111  # ECONNREFUSED


def test_a_smaller_mtu_on_the_way_reaches_the_jobs_tcp(
    site: World, tmp_path: Path, translator: str
) -> None:
    # The worker's uplink at 1400: the worker answers the job's 1492-byte
    # IPv6 packets with "packet too big" (1400) from its own address, which
    # has no IPv4: the CLAT makes it "fragmentation needed" (1380) from
    # 192.0.0.8 (RFC 7600), and the job's TCP goes on in smaller segments.
    sh("ip", "link", "set", "up0", "mtu", "1400", ns=site.worker)
    try:
        with site.on_site(RATE, "sink", str(RATE_PORT)):
            proc, _ = clat_job(
                site, tmp_path, translator, PY, RATE, "put", SITE4, str(RATE_PORT), "1"
            )
    finally:
        sh("ip", "link", "set", "up0", "mtu", "1500", ns=site.worker)
    assert proc.returncode == 0, proc.stderr
    assert sum(json.loads(proc.stdout)["bins"]) > 1 << 20


def test_ipv6_to_the_clat_address_from_outside_the_nat64_prefix_is_dropped_and_counted(
    site: World, tmp_path: Path
) -> None:
    # The worker sends to the job's CLAT address from its own address, which
    # is not in the NAT64 prefix and so has no IPv4 form: the CLAT drops it
    # (never passes it on as IPv6 to the job) and the report counts it.
    name = f"{site.prefix[3:]}u"
    report = tmp_path / "report.json"
    p = site.larkns_popen(
        "run",
        "--name",
        name,
        "--json-report",
        str(report),
        "--",
        "sh",
        "-c",
        "ip -6 -o addr show scope global; cat >/dev/null",
        stdin=True,
        knobs=knobs("bpf"),
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        slaac = ipaddress.IPv6Interface(line.split()[3])
        clat6 = slaac.network.network_address + 0x464
        send = (
            "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            f"for _ in range(4): s.sendto(b'x' * 10, ('{clat6}', 9))"
        )
        sh(PY, "-c", send, ns=site.worker)
    finally:
        p.communicate("", timeout=30)
    assert p.returncode == 0
    rep = json.loads(report.read_text())
    assert rep["clat"] == {"translator": "bpf", "untranslated_packets": 4}


def test_the_kernel_side_clat_runs_no_process_in_the_job(site: World) -> None:
    name = f"{site.prefix[3:]}k"
    p = site.larkns_popen(
        "run", "--name", name, "--", "sh", "-c", "echo ready; cat >/dev/null",
        stdin=True, knobs=knobs("bpf"),
    )  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        pids = sh("ip", "netns", "pids", site.netns_prefix + name).stdout.split()
        comms = sorted(Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids)
        # The job's shell (and its cat, once it has started), nothing else:
        # a job's keeper lives outside its network namespace.
        assert comms and set(comms) <= {"sh", "cat"}, comms
    finally:
        p.communicate("", timeout=30)
    assert p.returncode == 0


def test_a_worker_without_ipv4_and_without_clat_gives_jobs_no_ipv4(
    site: World, tmp_path: Path
) -> None:
    proc, _ = run_job(
        site,
        tmp_path,
        "sh",
        "-c",
        "ip -4 -o addr show",
        LARKNS_NAT64_PREFIX=NAT64,
        LARKNS_CLAT="off",
    )
    assert proc.returncode == 0, proc.stderr
    # The nat pool's address is there, but goes nowhere: no IPv4 uplink.
    assert "198.19." in proc.stdout


def test_a_routed_job_on_an_ipv6_only_worker_gets_ipv4_through_clat_too(
    site: World, tmp_path: Path, translator: str
) -> None:
    routed = "2001:db8:100::/56"
    sh("ip", "-6", "route", "add", routed, "via", "2001:db8:0:1::2", ns=site.site)
    try:
        proc, report = run_job(
            site,
            tmp_path,
            sys.executable,
            PEER,
            "udp",
            SITE4,
            str(PORT),
            "2",
            "10",
            "50",
            extra=("--mode", "routed"),
            LARKNS_NAT64_PREFIX=NAT64,
            LARKNS_ROUTED_IPV6_PREFIX=routed,
            LARKNS_CLAT_TRANSLATOR=translator,
        )
    finally:
        sh("ip", "-6", "route", "del", routed, ns=site.site, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["seen_as"].startswith("198.18.100.")
    assert report["mode"] == "routed"


def test_doctor_says_jobs_get_ipv4_through_a_clat(site: World) -> None:
    out = subprocess.run(
        site.worker_cmd(str(Path(sys.executable).parent / "larkns"), "doctor"),
        env=site.env() | KNOBS,
        capture_output=True,
        text=True,
    ).stdout
    (nat,) = [line for line in out.splitlines() if "mode nat" in line]
    assert nat.startswith("ok") and f"through a CLAT toward NAT64 {NAT64}" in nat, out
    from larkns.kernel import clatbpf

    if clatbpf.unavailable() is None:
        assert "translated in the kernel" in nat, out
    out = subprocess.run(
        site.worker_cmd(str(Path(sys.executable).parent / "larkns"), "doctor"),
        env=site.env() | knobs("tayga"),
        capture_output=True,
        text=True,
    ).stdout
    (nat,) = [line for line in out.splitlines() if "mode nat" in line]
    assert nat.startswith("ok") and "by tayga (a process per job)" in nat, out


def test_the_clat_runs_unprivileged_chrooted_and_without_capabilities(site: World) -> None:
    name = f"{site.prefix[3:]}c"
    p = site.larkns_popen(
        "run",
        "--name",
        name,
        "--",
        "sh",
        "-c",
        "echo ready; cat >/dev/null",
        stdin=True,
        knobs=knobs("tayga"),
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        pids = sh("ip", "netns", "pids", site.netns_prefix + name).stdout.split()
        (tayga,) = [pid for pid in pids if Path(f"/proc/{pid}/comm").read_text().strip() == "tayga"]
        status = Path(f"/proc/{tayga}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines())
        assert all(int(i) != 0 for i in fields["Uid"].split()), fields["Uid"]
        assert all(int(i) != 0 for i in fields["Gid"].split()), fields["Gid"]
        assert "0" not in fields["Groups"].split(), fields["Groups"]
        for caps in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert int(fields[caps], 16) == 0, caps
        root = os.readlink(f"/proc/{tayga}/root")
        assert root != "/" and not os.listdir(f"/proc/{tayga}/root")
    finally:
        p.communicate("", timeout=30)
    assert p.returncode == 0


def test_the_clat_user_falls_back_to_nobody_when_setup_did_not_make_it() -> None:
    from larkns.modes.clat import USER as CLAT_USER
    from larkns.modes.clat import clat_user

    user, group = clat_user()
    try:
        subprocess.run(["id", CLAT_USER], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        assert user == "nobody" and group in ("nogroup", "nobody")
    else:
        assert user == CLAT_USER


def test_without_the_built_programs_clats_fall_back_to_tayga_and_forcing_bpf_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from larkns import config
    from larkns.kernel import clatbpf
    from larkns.modes.base import SetupError
    from larkns.modes.clat import Clat

    # As on a node where clang was missing at install.
    monkeypatch.setattr(clatbpf, "OBJECT", tmp_path / "clat.bpf.o")
    monkeypatch.setattr(clatbpf, "_shared", None)
    monkeypatch.setattr(clatbpf, "_failed", None)

    def clat(choice: str) -> Clat:
        settings = config.load(environ={"LARKNS_CLAT_TRANSLATOR": choice}, condor=False)
        return Clat(SimpleNamespace(settings=settings))  # type: ignore[arg-type]

    assert clat("auto").translator() == "tayga"
    assert clat("tayga").translator() == "tayga"
    with pytest.raises(SetupError, match=r"LARKNS_CLAT_TRANSLATOR=bpf: .*was not built"):
        clat("bpf").translator()


def test_an_object_file_with_anything_else_to_relocate_is_refused() -> None:
    import struct

    from larkns.kernel import clatbpf

    if not clatbpf.OBJECT.exists():
        required("the kernel-side CLAT was not built (no clang at install)")
    elf = bytearray(clatbpf.OBJECT.read_bytes())
    assert set(clatbpf.programs(bytes(elf), 3)) == {"egress", "ingress"}
    with pytest.raises(clatbpf.ObjectError, match="not a 64-bit"):
        clatbpf.programs(b"\x7fELF\x01" + bytes(elf[5:]), 3)
    # The first relocation of a program made another type (a call, say).
    secs = clatbpf._sections(bytes(elf))
    rel = secs[".reltc/egress"]
    at = bytes(elf).index(rel)
    r_offset, r_info = struct.unpack_from("<QQ", rel)
    struct.pack_into("<QQ", elf, at, r_offset, (r_info & ~0xFFFFFFFF) | 10)
    with pytest.raises(clatbpf.ObjectError, match="unexpected relocation"):
        clatbpf.programs(bytes(elf), 3)


def test_the_job_ad_gets_what_the_kernel_side_clat_dropped() -> None:
    from larkns.daemon import chirp
    from larkns.daemon.server import _traffic
    from larkns.traffic import Count, Traffic

    ad = chirp.attributes(_traffic(Traffic(untranslated=Count(packets=7))))
    assert ad["LarkNetworkUntranslatedPackets"] == "7"
    # A job without a CLAT, or whose CLAT dropped nothing, has none.
    assert "LarkNetworkUntranslatedPackets" not in chirp.attributes(_traffic(Traffic()))


def test_ipv4_multicast_from_the_job_is_dropped_and_counted_never_translated(
    site: World, tmp_path: Path
) -> None:
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(3): s.sendto(b'x' * 10, ('224.0.0.251', 5353))"
    )
    proc, report = clat_job(site, tmp_path, "bpf", PY, "-c", send)
    assert proc.returncode == 0, proc.stderr
    assert report["clat"] == {"translator": "bpf", "untranslated_packets": 3}
    assert report["families"]["ipv6"]["packets"]["outgoing"] == 0
