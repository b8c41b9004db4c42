"""The engine's verbs, in-process, inside the simulated worker (real kernel)."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from larkns import config, leases
from larkns.engine import Engine, SetupError, TeardownError
from larkns.journal import Process, Record
from larkns.kernel import netns
from larkns.kernel.nft import Ruleset
from larkns.kernel.ra import Advertiser
from larkns.modes.nat import NatNetwork
from tests.world import World, sh


@pytest.fixture()
def engine(clean_world: World) -> Iterator[Engine]:
    settings = config.Settings(
        ipv4_pool=ipaddress.IPv4Network(clean_world.ipv4_pool),
        ipv6_prefix=ipaddress.IPv6Network(clean_world.ipv6_prefix),
        state_dir=clean_world.state_dir,
        netns_prefix=clean_world.netns_prefix,
    )
    with netns.entered(clean_world.worker):
        advertiser = Advertiser()
        eng = Engine(settings, advertiser)
        try:
            yield eng
        finally:
            for name in eng.journal.names():
                eng.teardown(name)
            eng.close()
            advertiser.close()


def me() -> Process:
    return Process.of(os.getpid())


def test_setup_builds_what_check_verifies_and_teardown_removes_it(
    engine: Engine, clean_world: World
) -> None:
    plan = engine.setup("lkte1", "nat", me())
    assert isinstance(plan, NatNetwork)
    assert engine.check("lkte1") == []
    assert netns.exists(plan.netns)
    assert engine.wait_ready(plan, 2.0) is not None
    ipv4, ipv6 = engine.job_addresses(plan)
    assert ipv4 == str(plan.ipv4_job.ip) if plan.ipv4_job else False
    assert ipv6 == [str(plan.ipv6_job)]  # SLAAC formed exactly the planned EUI-64 address
    assert engine.teardown("lkte1") is True
    assert engine.teardown("lkte1") is False  # idempotent: nothing left to remove
    assert engine.check("lkte1") == ["job lkte1: no record"]


def test_check_names_what_is_missing(engine: Engine, clean_world: World) -> None:
    plan = engine.setup("lkte2", "nat", me())
    assert isinstance(plan, NatNetwork)
    sh("ip", "link", "set", plan.host_link, "down", ns=clean_world.worker)
    assert engine.check("lkte2") == [f"link {plan.host_link} is not up"]
    Ruleset().remove_job("lkte2", plan.host_link)
    assert engine.check("lkte2") == [
        f"link {plan.host_link} is not up",
        "nft counters of lkte2 are missing",
    ]
    # teardown of a half-gone job succeeds and removes the rest
    assert engine.teardown("lkte2") is True


def test_teardown_of_a_job_whose_objects_are_partly_gone(
    engine: Engine, clean_world: World
) -> None:
    plan = engine.setup("lkte3", "nat", me())
    sh("ip", "netns", "del", plan.netns)
    assert engine.teardown("lkte3") is True
    assert engine.journal.read("lkte3") is None
    assert leases.leased(engine.journal) == {}


def test_gc_removes_orphans_without_records_and_spares_live_jobs(
    engine: Engine, clean_world: World
) -> None:
    live = engine.setup("lkte4", "nat", me())
    dead = engine.setup("lkte5", "nat", me())
    assert isinstance(dead, NatNetwork)
    # lkte5's record vanishes (as if its journal entry were lost): its
    # namespace, link, counters and lease are now orphans without a record.
    engine.journal.remove("lkte5")
    assert dead.slot is not None
    # its lease names a leaser that is gone (a lease whose leaser lives is
    # spared: its record is about to be claimed)
    (engine.journal.slots / str(dead.slot)).write_text(leases.Lease("lkte5", 2**22 + 1).encode())
    # and a record whose owner is dead (a pid that cannot exist now)
    engine.journal.claim(Record(name="lkte6", owner=Process(2**22 + 1, 1)))
    removed, left = engine.gc()
    assert left == []
    assert f"netns {dead.netns}" in removed
    assert f"link {dead.host_link}" in removed or not _link_exists(clean_world, dead.host_link)
    assert "nft counters of lkte5" in removed
    assert any(r.startswith("address slot") and "lkte5" in r for r in removed)
    assert any("job lkte6" in r for r in removed)
    assert engine.check("lkte4") == []  # the live job is untouched
    assert netns.exists(live.netns)
    assert engine.gc() == ([], [])  # nothing more to do


def _link_exists(world: World, name: str | None) -> bool:
    return (
        bool(name)
        and sh("ip", "link", "show", str(name), ns=world.worker, check=False).returncode == 0
    )


def test_a_failed_setup_leaves_nothing(engine: Engine, clean_world: World) -> None:
    # A link that takes the job's host link name makes setup fail midway
    # (the name check only covers links larkns knows about: this one is
    # someone else's, of another kind).
    sh("ip", "link", "add", "lk-lkte7", "type", "bridge", ns=clean_world.worker)
    try:
        with pytest.raises(SetupError, match="lk-lkte7 exists and is not larkns's"):
            engine.setup("lkte7", "nat", me())
        # the bridge is someone else's: left alone
        assert "bridge" in sh("ip", "-d", "link", "show", "lk-lkte7", ns=clean_world.worker).stdout
        assert engine.journal.read("lkte7") is None
        assert not netns.exists(f"{clean_world.netns_prefix}lkte7")
        assert leases.leased(engine.journal) == {}
    finally:
        sh("ip", "link", "del", "lk-lkte7", ns=clean_world.worker, check=False)


def test_names_and_pools_are_enforced(engine: Engine, clean_world: World) -> None:
    engine.setup("lkte8", "nat", me())
    with pytest.raises(SetupError, match="in use"):
        engine.setup("lkte8", "nat", me())
    assert len(leases.leased(engine.journal)) == 1  # the refused setup gave its lease back


def test_doctor_reports_what_this_kernel_has(clean_world: World) -> None:
    proc = subprocess.run(
        clean_world.worker_cmd(str(Path(sys.executable).parent / "larkns"), "doctor"),
        capture_output=True,
        text=True,
        env=clean_world.env(),
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for line in ("network namespaces", "veth", "nftables", "qdisc htb", "qdisc tbf", "ifb"):
        assert any(line in x and x.startswith("ok") for x in out.splitlines()), (line, out)
    # What the kernel sizes for every namespace at once: said, never changed.
    conntrack = sh("sysctl", "-n", "net.netfilter.nf_conntrack_max", ns=clean_world.worker)
    shared = [x for x in out.splitlines() if "kernel tables shared by all jobs" in x]
    assert shared and f"conntrack max {conntrack.stdout.strip()} flows" in shared[0], out
    assert "ipv6 neighbours gc_thresh3" in shared[0], out
    # fq_codel is missing here and present on distribution kernels: what the
    # doctor says must be what the kernel does.
    probe = f"{clean_world.prefix}-fq"
    sh("ip", "netns", "add", probe)
    try:
        has = sh("tc", "qdisc", "add", "dev", "lo", "root", "fq_codel", ns=probe, check=False)
    finally:
        sh("ip", "netns", "del", probe)
    said = [x for x in out.splitlines() if "qdisc fq_codel" in x]
    assert said and said[0].startswith("ok") == (has.returncode == 0), (said, has.stderr)
    assert "can run here (modes: nat, none)" in out
    assert not [n for n in netns.names() if n.startswith("lkdoctor-")]
    lines = out.splitlines()
    # The worker has both uplinks; routed is not configured here.
    assert any(x.startswith("ok") and "mode nat" in x and "IPv4, IPv6" in x for x in lines), out
    assert any(not x.startswith("ok") and "mode routed" in x for x in lines), out


def test_doctor_names_the_modes_the_configuration_offers(clean_world: World) -> None:
    proc = subprocess.run(
        clean_world.worker_cmd(str(Path(sys.executable).parent / "larkns"), "doctor"),
        capture_output=True,
        text=True,
        env=clean_world.env() | {"LARKNS_ROUTED_IPV6_PREFIX": "2001:db8:100::/56"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "can run here (modes: nat, routed, none)" in proc.stdout
    assert "routes 2001:db8:100::/56" in proc.stdout


def test_a_teardown_that_cannot_remove_an_object_says_so_and_gc_tries_again(
    engine: Engine, clean_world: World
) -> None:
    plan = engine.setup("lkte7", "nat", me())
    assert plan.slot is not None
    path = netns.path(plan.netns)

    def hold() -> None:
        # One more mount on the job's namespace file: teardown detaches the
        # top one, and the file, still a mount point, cannot be unlinked (EBUSY).
        subprocess.run(["mount", "--bind", path, path], check=True)

    hold()
    try:
        with pytest.raises(TeardownError) as failed:
            engine.teardown("lkte7")
        assert [p for p in failed.value.problems if plan.netns in p], failed.value.problems
        record = engine.journal.read("lkte7")
        assert record is not None and record.state == "teardown-failed"
        assert record.problems == tuple(failed.value.problems)
        # Its slot stays taken while something of the job is left.
        assert leases.leased(engine.journal)[plan.slot].name == "lkte7"
        assert engine.check("lkte7") == [f"teardown left {p}" for p in record.problems]
        listed = clean_world.larkns("list")
        assert "teardown-failed" in listed.stdout, listed.stdout + listed.stderr
        hold()
        again = clean_world.larkns("teardown", "lkte7")
        assert again.returncode == 1 and plan.netns in again.stderr, again.stderr
        assert "larkns gc" in again.stderr
    finally:
        # The file is deletable again once only its own mount is left.
        while subprocess.run(["umount", path], capture_output=True).returncode == 0:
            pass
    swept = engine.gc()
    assert swept.left == [], swept.left
    assert "job lkte7 (what its teardown had left)" in swept.removed, swept.removed
    assert engine.journal.read("lkte7") is None
    assert not os.path.exists(path)
    assert leases.leased(engine.journal) == {}


# A record as larkns wrote it before records had typed fields (version 1):
# every type's plan fields in one flat dict, and an untyped "extra".
V1_PLAN_KEYS = (
    "name", "mode", "netns", "slot", "host_link", "job_link", "host_index", "job_index",
    "host_mac", "job_mac", "ipv4_host", "ipv4_job", "ipv6_prefix", "classes",
    "inbound_ports", "bridge", "gateway4", "site_prefixes", "dhcp", "nat64_prefix",
)  # fmt: skip


def _as_version_1(record: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    plan = {k: record["plan"].get(k) for k in V1_PLAN_KEYS}
    plan.update(site_prefixes=[], dhcp=False)
    old = {k: record[k] for k in ("name", "owner", "state", "job", "client", "keeper", "created")}
    return {"version": 1, **old, "plan": plan, "extra": extra}


def test_a_job_recorded_by_the_previous_version_is_taken_over_and_torn_down(
    engine: Engine, clean_world: World
) -> None:
    plan = engine.setup("lkte8", "nat", me())
    assert isinstance(plan, NatNetwork) and plan.ipv6_prefix is not None
    path = engine.journal.path("lkte8")
    taken = plan.ipv6_prefix.network_address + 0x99
    engine.table(Ruleset).allow(plan.host_link, [taken])  # as the old version did
    old = _as_version_1(json.loads(path.read_text()), {"sources": [str(taken)]})
    path.write_text(json.dumps(old))
    record = engine.journal.read("lkte8")
    assert record is not None and record.plan == plan and record.state == "ready"
    assert record.sources == (taken,)
    engine.adopt(plan)
    assert engine.check("lkte8") == []
    assert engine.table(Ruleset).job_objects().sources[plan.host_link].count(taken) == 1
    assert engine.teardown("lkte8") is True
    # The address it took is out of the guard with everything else.
    assert "lkte8" not in engine.table(Ruleset).job_objects().jobs


def test_a_record_of_a_newer_version_is_refused_with_a_reason_and_left_to_gc(
    engine: Engine, clean_world: World
) -> None:
    plan = engine.setup("lkte9", "nat", me())
    path = engine.journal.path("lkte9")
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 99}))
    record = engine.journal.read("lkte9")
    assert record is not None and record.state == "unreadable" and record.plan is None
    assert engine.check("lkte9") == [
        "job lkte9: record version 99: not one this larkns reads (1, 2)"
    ]
    swept = engine.gc()
    assert swept.left == [] and any("job lkte9" in r for r in swept.removed), swept
    assert not netns.exists(plan.netns)
    assert engine.journal.read("lkte9") is None


def test_removals_pass_over_what_is_gone_and_name_what_was_refused() -> None:
    from larkns.kernel.nft import NftError, remove_all
    from larkns.kernel.nftnl import NftnlError

    done: list[str] = []

    def run(ops: list[str]) -> None:
        if len(ops) > 1:
            raise NftnlError(errno.ENOENT, "batch")  # the kernel refuses the whole
        if ops[0] == "gone":
            raise NftnlError(errno.ENOENT, "delete gone")
        if ops[0] == "busy":
            raise NftnlError(errno.EBUSY, "delete busy")
        done.append(ops[0])

    assert remove_all(["a", "gone", "b"], run, NftnlError) is True
    with pytest.raises(NftError, match="delete busy: Device or resource busy"):
        remove_all(["a", "busy", "gone", "b"], run, NftnlError)
    # every other removal was still tried
    assert done == ["a", "b", "a", "b"]


def _dynamic_unicast_neighbours(ns: str | None, dev: str) -> list[str]:
    """Neighbour entries on `dev` that count against the kernel's global
    gc_thresh3 (all but permanent ones), multicast aside (those are
    reclaimed at once when the table is full)."""
    out = subprocess.run(
        [*(["ip", "-n", ns] if ns else ["ip"]), "neigh", "show", "dev", dev, "nud", "all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        x
        for x in out.splitlines()
        if x.strip() and "PERMANENT" not in x and not x.startswith("ff02:")
    ]


def test_a_job_talking_on_both_families_takes_no_entry_of_the_kernels_neighbour_tables(
    engine: Engine, clean_world: World
) -> None:
    # The tables are one for all namespaces, capped at gc_thresh3 (1024 by
    # default, host-wide): a node of thousands of jobs must not spend them.
    plan = engine.setup("lkte1", "nat", me())
    assert isinstance(plan, NatNetwork)
    assert engine.wait_ready(plan, 2.0) is not None
    for site in ("198.18.0.1", "2001:db8:0:1::1"):
        ping = sh("ping", "-c", "1", "-W", "2", site, ns=plan.netns, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    assert _dynamic_unicast_neighbours(plan.netns, "eth0") == []
    assert _dynamic_unicast_neighbours(clean_world.worker, plan.host_link) == []
    engine.teardown("lkte1")
