"""Destination policies (larkns/policy.py): parsing, the site's settings,
and what a job may reach, on a real kernel inside the simulated world.

The site namespace gets an "external" address (198.18.1.1,
2001:db8:0:2::1) beside its internal one (the Site class): its server
listens on both.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from larkns import config, policy
from larkns.config import ConfigError
from tests.world import PORT, SITE4, SITE6, World, sh

EXTERNAL4 = "198.18.1.1"
EXTERNAL6 = "2001:db8:0:2::1"
KNOBS = {
    "LARKNS_CLASSES": "Site = 198.18.0.0/24, 2001:db8:0:1::/64",
    "LARKNS_INTERNAL_CLASSES": "Site",
    "LARKNS_DESTINATIONS": f"license = {EXTERNAL4}/32, {EXTERNAL6}/128 tcp {PORT}",
}
HOSTS = (SITE4, EXTERNAL4, SITE6, EXTERNAL6)

# For each host: "ok", or the error and how long the connect took.
PROBE = f"""
import socket, sys, time
for host in sys.argv[1:]:
    t = time.monotonic()
    try:
        socket.create_connection((host, {PORT}), timeout=5).close()
        print(host, "ok")
    except OSError as e:
        print(host, e.errno, round(time.monotonic() - t, 3))
"""


# -- the words -----------------------------------------------------------------


def test_a_policy_is_a_base_and_terms() -> None:
    p = policy.parse("open -license", "LARKNS_POLICY")
    assert p == policy.Policy("open", (), ("license",)) and not p.unrestricted
    assert policy.parse('"Internal-Only +a -b +a"', "x").text() == "internal-only -b +a"
    assert policy.parse("open", "x").unrestricted
    for bad, words in (
        ("", "expected a policy"),
        ("anywhere", "expected a policy"),
        ("open license", r"is not \+SET or -SET"),
        ("open +a -a", "both allowed and denied"),
        ("open +a_b", r"is not \+SET"),
    ):
        with pytest.raises(ConfigError, match=words):
            policy.parse(bad, "--policy")


def test_destination_sets_and_their_errors() -> None:
    (d,) = policy.parse_destinations("K", "lic = 198.18.5.10/32, 2001:db8:5::/64 tcp 27000-27010")
    assert d.protocol == "tcp" and d.ports == (27000, 27010) and len(d.nets) == 2
    (dns,) = policy.parse_destinations("K", "dns = 198.18.0.53/32 udp 53")
    assert dns.ports == (53, 53)
    (any_port,) = policy.parse_destinations("K", "web = 198.18.7.0/24")
    assert any_port.protocol is None and any_port.ports is None
    for bad, words in (
        ("lic 198.18.5.10/32", "expected NAME = PREFIX"),
        ("lic = 198.18.5.10/33", "is not a prefix"),
        ("lic = tcp 80", "no prefix"),
        ("lic = 198.18.5.10/32 tcp 0", "within 1-65535"),
        ("lic = 198.18.5.10/32 tcp 90-80", "within 1-65535"),
        ("lic = 198.18.5.10/32 tcp 80 81", "one port range"),
        ("a = 198.18.5.10/32; a = 198.18.5.11/32", "defined twice"),
    ):
        with pytest.raises(ConfigError, match=words):
            policy.parse_destinations("LARKNS_DESTINATIONS", bad)


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({"LARKNS_POLICY": "open -nosuch"}, "no destination set nosuch"),
        ({"LARKNS_POLICY": "internal-only"}, "needs LARKNS_INTERNAL_CLASSES"),
        ({"LARKNS_INTERNAL_CLASSES": "Campus"}, "no class Campus in LARKNS_CLASSES"),
        ({"LARKNS_POLICY": "everywhere"}, "LARKNS_POLICY: expected a policy"),
    ],
)
def test_policy_settings_that_cannot_work_are_refused_at_start(
    knobs: dict[str, str], words: str
) -> None:
    from larkns.engine import Engine

    with pytest.raises(ConfigError, match=words):
        Engine.validate(config.load(environ=knobs))


def test_the_policy_can_depend_on_the_job_ad() -> None:
    import classad2

    s = config.load(
        environ={
            **KNOBS,
            "LARKNS_POLICY": 'ifThenElse(Owner == "alice", "open", "open -license")',
        }
    )
    assert s.job_policy(classad2.parseOne('Owner = "alice"')).unrestricted
    assert s.job_policy(classad2.parseOne('Owner = "bob"')).deny == ("license",)
    odd = config.load(environ={**KNOBS, "LARKNS_POLICY": 'ifThenElse(Owner == "a", 1, "x")'})
    with pytest.raises(ConfigError, match="gives 1 for this job"):
        odd.job_policy(classad2.parseOne('Owner = "a"'))
    with pytest.raises(ConfigError, match="expected a policy"):
        odd.job_policy(classad2.parseOne('Owner = "b"'))


# -- on the kernel -------------------------------------------------------------


@pytest.fixture()
def site(clean_world: World) -> Iterator[World]:
    addrs = (f"{EXTERNAL4}/32", f"{EXTERNAL6}/128")
    for a in addrs:
        sh("ip", "addr", "replace", a, "dev", "lo", ns=clean_world.site)
    try:
        yield clean_world
    finally:
        for a in addrs:
            sh("ip", "addr", "del", a, "dev", "lo", ns=clean_world.site, check=False)


def _probe(world: World, tmp_path: Path, *options: str) -> tuple[dict[str, str], dict[str, Any]]:
    report = tmp_path / "report.json"
    proc = world.larkns(
        "run", *options, "--json-report", str(report), "--",
        sys.executable, "-c", PROBE, *HOSTS, knobs=KNOBS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reached = {}
    for line in proc.stdout.splitlines():
        host, _, rest = line.partition(" ")
        reached[host] = rest
    return reached, json.loads(report.read_text())


def _refused_at_once(result: str) -> bool:
    errno_text, _, seconds = result.partition(" ")
    return int(errno_text) == 111 and float(seconds) < 0.5  # ECONNREFUSED, no timeout


def test_an_internal_only_job_reaches_the_site_and_is_refused_outside_at_once(
    site: World, tmp_path: Path
) -> None:
    reached, report = _probe(site, tmp_path, "--policy", "internal-only")
    assert reached[SITE4] == "ok" and reached[SITE6] == "ok", reached
    assert _refused_at_once(reached[EXTERNAL4]) and _refused_at_once(reached[EXTERNAL6]), reached
    assert report["policy"] == "internal-only"
    assert report["refused"]["packets"] == 2 and report["refused"]["bytes"] > 0


def test_a_set_refused_to_one_job_is_open_to_another(site: World, tmp_path: Path) -> None:
    """The license server: "open -license" for one owner, "open" for the other."""
    barred, report = _probe(site, tmp_path, "--policy", "open -license")
    assert barred[SITE4] == "ok" and barred[SITE6] == "ok"
    assert _refused_at_once(barred[EXTERNAL4]) and _refused_at_once(barred[EXTERNAL6]), barred
    assert report["refused"]["packets"] == 2
    admitted, report = _probe(site, tmp_path, "--policy", "open")
    assert all(v == "ok" for v in admitted.values()), admitted
    assert report["policy"] == "open" and report["refused"]["packets"] == 0
    # closed, with the one set let through
    only, _ = _probe(site, tmp_path, "--policy", "closed +license")
    assert only[EXTERNAL4] == "ok" and only[EXTERNAL6] == "ok", only
    assert _refused_at_once(only[SITE4]) and _refused_at_once(only[SITE6]), only


def test_a_job_with_a_policy_checks_whole_and_leaves_nothing(site: World, tmp_path: Path) -> None:
    job = site.serving(
        "run", "--policy", "internal-only", "--name", "lktpol", "--",
        "sh", "-c", "echo ready; exec sleep 30", knobs=KNOBS,
    )  # fmt: skip
    try:
        check = site.larkns("check", "lktpol", knobs=KNOBS)
        assert check.returncode == 0, check.stderr
        shown = json.loads(site.larkns("show", "lktpol", knobs=KNOBS).stdout)
        assert shown["plan"]["policy"] == "internal-only" and shown["problems"] == []
        listing = sh("nft", "-j", "list", "map", "inet", "larkns", "policies", ns=site.worker)
        assert "lk-lktpol" in listing.stdout
    finally:
        job.terminate()
        job.wait(10)
    # (clean_world: no namespace, link, table or state left)


def test_a_bridge_mode_job_cannot_have_a_policy_and_nothing_is_built(
    site: World, tmp_path: Path
) -> None:
    proc = site.larkns(
        "run", "--mode", "bridge", "--policy", "internal-only", "--", "true",
        knobs={**KNOBS, "LARKNS_BRIDGE": "up0"},
    )  # fmt: skip
    assert proc.returncode == 125, proc.stderr
    assert "bridge-mode jobs can only be open" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists(site.state_dir / "jobs") or not os.listdir(site.state_dir / "jobs")


def test_a_table_made_before_policies_gets_their_chains_once() -> None:
    """A table of an older larkns, its jobs still running, gets the policy
    chains and maps in place; one that has them gets nothing."""
    from larkns.kernel.nft import INET, POLICY_MARKER, Ruleset
    from larkns.kernel.nftexpr import feature_update

    chains = ("forward", "input", "output", "postrouting", "prerouting", "guard", "control_out")
    old_table: list[dict[str, Any]] = [{"chain": {"name": c}} for c in (*chains, "fence")]
    added = feature_update(Ruleset.FEATURES, old_table)
    assert {"add": INET.counter(POLICY_MARKER)} in added
    made = [c["add"]["chain"]["name"] for c in added if "chain" in c.get("add", {})]
    assert made == ["policy_refused", "policy"]
    assert feature_update(Ruleset.FEATURES, [*old_table, {"chain": {"name": "policy"}}]) == []
