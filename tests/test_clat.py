"""IPv6-only workers: jobs still get IPv4, through a CLAT toward the site's
NAT64 (464XLAT), (real kernel, simulated site).

The worker has no IPv4 on its uplink.  The site runs a NAT64 (tayga) for
NAT64 (a network-specific prefix inside 2001:db8::/32: tayga refuses the
well-known 64:ff9b::/96 toward benchmark-range IPv4) and an IPv4 server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sites import NAT64, missing, required, v6only_site
from tests.test_run import run_job
from tests.world import PEER, PORT, SITE4, World, sh

KNOBS = {"LARKNS_NAT64_PREFIX": NAT64}


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


def test_on_an_ipv6_only_worker_a_job_reaches_an_ipv4_server_through_clat_and_nat64(
    site: World, tmp_path: Path
) -> None:
    script = (
        f"{sys.executable} {PEER} udp {SITE4} {PORT} 3 100 50 && "
        f"{sys.executable} {PEER} tcp {SITE4} {PORT}"
    )
    proc, report = run_job(site, tmp_path, "sh", "-c", script, extra=(), **KNOBS)
    assert proc.returncode == 0, proc.stderr
    udp, tcp = (json.loads(line) for line in proc.stdout.splitlines())
    # The job has IPv4 (the CLAT's), the server sees the site's NAT64.
    assert udp["local"] == "192.0.0.1" and report["addresses"]["ipv4"] == "192.0.0.1"  # type: ignore[index]
    assert udp["seen_as"].startswith("198.18.100.") and tcp["seen_as"].startswith("198.18.100.")
    fam = report["families"]
    # Counted once, as what left the job's link: IPv6 (20 bytes more per
    # packet than the IPv4 the job sent).
    assert fam["ipv4"]["bytes"] == {"incoming": 0, "outgoing": 0}  # type: ignore[index]
    udp_out = 3 * (48 + 100)
    assert fam["ipv6"]["bytes"]["outgoing"] >= udp_out  # type: ignore[index]
    assert report["dropped"] == {"packets": 0, "bytes": 0}


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
    site: World, tmp_path: Path
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
        knobs=KNOBS,
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
