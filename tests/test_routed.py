"""routed mode: no NAT, addresses the site routes to the worker (real kernel).

The site (a namespace) routes ROUTED4/ROUTED6 to the worker, or, for the
proxy-ND case, takes them for on-link and asks for them by ARP/ND.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from larkns.modes.routing import RoutingNetwork
from larkns.plan import JobNetwork
from tests.test_run import run_job
from tests.world import PEER, PORT, SITE4, SITE6, WORKER4, WORKER6, World, sh

ROUTED4 = "198.18.128.0/24"
ROUTED6 = "2001:db8:100::/56"
KNOBS = {"LARKNS_ROUTED_IPV4_POOL": ROUTED4, "LARKNS_ROUTED_IPV6_PREFIX": ROUTED6}


@pytest.fixture()
def routed_site(clean_world: World) -> Iterator[World]:
    """The site routes the routed prefixes to the worker."""
    sh("ip", "route", "add", ROUTED4, "via", WORKER4, ns=clean_world.site)
    sh("ip", "-6", "route", "add", ROUTED6, "via", WORKER6, ns=clean_world.site)
    try:
        yield clean_world
    finally:
        sh("ip", "route", "del", ROUTED4, ns=clean_world.site, check=False)
        sh("ip", "-6", "route", "del", ROUTED6, ns=clean_world.site, check=False)


@pytest.fixture()
def onlink_site(clean_world: World) -> Iterator[World]:
    """The site takes the routed prefixes for on-link: it asks for each address."""
    sh("ip", "route", "add", ROUTED4, "dev", "down0", ns=clean_world.site)
    sh("ip", "-6", "route", "add", ROUTED6, "dev", "down0", ns=clean_world.site)
    try:
        yield clean_world
    finally:
        sh("ip", "route", "del", ROUTED4, ns=clean_world.site, check=False)
        sh("ip", "-6", "route", "del", ROUTED6, ns=clean_world.site, check=False)


def test_a_routed_job_reaches_the_site_with_its_own_addresses(
    routed_site: World, tmp_path: Path
) -> None:
    script = (
        f"{sys.executable} {PEER} udp {SITE4} {PORT} 3 100 100 && "
        f"{sys.executable} {PEER} udp {SITE6} {PORT} 3 100 100"
    )
    proc, report = run_job(
        routed_site, tmp_path, "sh", "-c", script, extra=("--mode", "routed"), **KNOBS
    )
    assert proc.returncode == 0, proc.stderr
    v4, v6 = (json.loads(line) for line in proc.stdout.splitlines())
    addresses: dict[str, object] = report["addresses"]  # type: ignore[assignment]
    ipv4 = ipaddress.IPv4Address(str(addresses["ipv4"]))
    assert ipv4 in ipaddress.IPv4Network(ROUTED4)
    assert ipv4 != ipaddress.IPv4Network(ROUTED4).network_address
    (ipv6,) = (ipaddress.IPv6Address(a) for a in addresses["ipv6"])  # type: ignore[attr-defined]
    assert ipv6 in ipaddress.IPv6Network(ROUTED6)
    # No NAT: the site sees the job itself.
    assert v4["seen_as"] == str(ipv4) and v6["seen_as"] == str(ipv6)
    assert report["mode"] == "routed"


def _serve_in_job(world: World, name: str, knobs: dict[str, str]) -> subprocess.Popen[str]:
    return world.serving(
        "run", "--mode", "routed", "--name", name, "--", sys.executable, PEER, "serve", str(PORT),
        knobs=knobs,
    )  # fmt: skip


def _job_addresses(world: World, name: str) -> tuple[str, str]:
    show = json.loads(world.larkns("show", name).stdout)
    plan = JobNetwork.from_dict(show["plan"])
    assert isinstance(plan, RoutingNetwork)
    assert plan.ipv4_job is not None and plan.ipv6_job is not None
    return str(plan.ipv4_job.ip), str(plan.ipv6_job)


def _from_site(world: World, host: str) -> dict[str, str]:
    deadline = time.monotonic() + 5
    while True:
        out = sh(sys.executable, PEER, "tcp", host, str(PORT), ns=world.site, check=False)
        if out.returncode == 0:
            seen: dict[str, str] = json.loads(out.stdout)
            return seen
        assert time.monotonic() < deadline, f"the site cannot reach {host}: {out.stderr}"
        time.sleep(0.1)


@pytest.mark.parametrize("site", ["routed_site", "onlink_site"])
def test_the_site_reaches_a_server_in_a_routed_job(
    site: str, request: pytest.FixtureRequest
) -> None:
    world: World = request.getfixturevalue(site)
    knobs = dict(KNOBS)
    if site == "onlink_site":
        knobs["LARKNS_PROXY_ND"] = "up0"
    p = _serve_in_job(world, "lktsrv", knobs)
    try:
        ipv4, ipv6 = _job_addresses(world, "lktsrv")
        # The job sees the site's own addresses: nothing is translated.
        assert _from_site(world, ipv4)["seen_as"] == SITE4
        assert _from_site(world, ipv6)["seen_as"] == SITE6
        if site == "onlink_site":
            proxies = sh("ip", "neigh", "show", "proxy", ns=world.worker).stdout
            assert ipv4 in proxies and ipv6 in proxies
    finally:
        p.terminate()
        p.communicate(timeout=10)
    if site == "onlink_site":
        # The proxy entries went with the job.
        assert sh("ip", "neigh", "show", "proxy", ns=world.worker).stdout.strip() == ""


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({}, "set LARKNS_ROUTED_IPV6_PREFIX and/or LARKNS_ROUTED_IPV4_POOL"),
        ({"LARKNS_ROUTED_IPV6_PREFIX": "2001:db8:100::/64"}, "too small"),
        ({"LARKNS_ROUTED_IPV4_POOL": "198.19.0.0/25"}, "overlaps LARKNS_IPV4_POOL"),
        ({"LARKNS_ROUTED_IPV4_POOL": "198.18.128.1/24"}, "LARKNS_ROUTED_IPV4_POOL"),
        ({**KNOBS, "LARKNS_PROXY_ND": "lktnosuch0"}, "LARKNS_PROXY_ND: no link"),
    ],
)
def test_bad_routed_config_gets_a_one_line_error_and_nothing_is_built(
    clean_world: World, tmp_path: Path, knobs: dict[str, str], words: str
) -> None:
    proc, _ = run_job(clean_world, tmp_path, "true", extra=("--mode", "routed"), **knobs)
    assert proc.returncode == 125, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
