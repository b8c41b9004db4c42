"""Plans, settings, leases, journal and reports: pure logic, no root needed."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from larkns import config, leases, plan, report
from larkns.config import ConfigError, Settings
from larkns.journal import Journal, NameInUse, Process, Record
from larkns.modes import nat
from larkns.modes.none import NoNetwork
from larkns.traffic import Count, Traffic

PREFIX = ipaddress.IPv6Network("fd00:6c6b:7400::/48")


def test_a_slot_gives_a_job_its_own_31_and_64() -> None:
    s = Settings(ipv4_pool=ipaddress.IPv4Network("198.19.0.0/24"))
    p0 = nat.plan(s, "a", 0, PREFIX)
    p5 = nat.plan(s, "b", 5, PREFIX)
    assert str(p0.ipv4_host) == "198.19.0.0/31" and str(p0.ipv4_job) == "198.19.0.1/31"
    assert str(p5.ipv4_host) == "198.19.0.10/31" and str(p5.ipv4_job) == "198.19.0.11/31"
    assert str(p0.ipv6_prefix) == "fd00:6c6b:7400::/64"
    assert str(p5.ipv6_prefix) == "fd00:6c6b:7400:5::/64"
    assert p0.host_mac != p0.job_mac != p5.job_mac


def test_the_slaac_address_is_known_from_the_mac() -> None:
    p = nat.plan(Settings(), "a", 258, PREFIX)
    assert p.job_mac == "06:6c:6b:00:01:02"
    # EUI-64: flip the U/L bit, put ff:fe in the middle.
    assert p.ipv6_job == ipaddress.IPv6Address("fd00:6c6b:7400:102:46c:6bff:fe00:102")
    assert p.host_link_local == ipaddress.IPv6Address("fe80::6c:6bff:fe00:102")


def test_names_fit_the_kernel_limits() -> None:
    p = nat.plan(Settings(), "abcdefghijkl", 0, PREFIX)
    assert p.host_link is not None and len(p.host_link) <= 15
    with pytest.raises(ConfigError, match="--name"):
        config.check_name("abcdefghijklm")
    for bad in ("", "-x", "a/b", "a b", "ä"):
        with pytest.raises(ConfigError):
            config.check_name(bad)


def test_a_plan_survives_the_journal_round_trip() -> None:
    p = nat.plan(Settings(), "a", 3, PREFIX)
    assert plan.JobNetwork.from_dict(p.to_dict()) == p
    n = NoNetwork(name="b", netns="lkt-b")
    assert plan.JobNetwork.from_dict(n.to_dict()) == n
    assert "fd00:6c6b:7400:3" in p.describe()


def test_the_pools_bound_the_number_of_jobs() -> None:
    s = Settings(ipv4_pool=ipaddress.IPv4Network("198.19.0.0/30"))
    assert nat.slot_count(s, PREFIX) == 2
    assert nat.slot_count(Settings(), ipaddress.IPv6Network("fd00::/63")) == 2
    with pytest.raises(ConfigError):
        nat.plan(s, "a", 2, PREFIX)


@pytest.mark.parametrize(
    ("knob", "value", "words"),
    [
        ("LARKNS_NETWORK_TYPE", "bridgy", "unknown network type"),
        ("LARKNS_IPV4_POOL", "198.19.0.1/24", "IPv4 network"),
        ("LARKNS_IPV4_POOL", "198.19.0.0/31", "too small"),
        ("LARKNS_IPV6_PREFIX", "fd00::/64", "too small"),
        ("LARKNS_IPV6_PREFIX", "nonsense", "IPv6 prefix"),
        ("LARKNS_STATE_DIR", "relative/dir", "absolute path"),
        ("LARKNS_SLAAC_TIMEOUT", "soon", "seconds"),
        ("LARKNS_SLAAC_TIMEOUT", "61", "0 to 60 seconds"),
        ("LARKNS_UPDATE_INTERVAL", "0", "more than 0 to 86400 seconds"),
        ("LARKNS_REATTACH_TIMEOUT", "-5", "more than 0"),
        ("LARKNS_INBOUND_PORTS", "80-90", "within 1024-65535"),
        ("LARKNS_INBOUND_PORTS", "41000", "FIRST-LAST"),
        ("LARKNS_INBOUND_PORTS_PER_JOB", "0", "from 1 to 1024"),
        ("LARKNS_ROUTED_IPV6_PREFIX", "2001:db8::/64", "too small"),
        ("LARKNS_PROXY_ND", "a b", "interface name"),
        ("LARKNS_NETNS_PREFIX", "a/b", "characters"),
    ],
)
def test_a_bad_knob_is_named_in_a_one_line_error(knob: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(environ={knob: value})
    assert str(e.value).startswith(knob + ":")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_knobs_come_from_the_environment() -> None:
    s = config.load(
        environ={"LARKNS_IPV4_POOL": "198.19.8.0/22", "LARKNS_NETWORK_TYPE": "NONE", "OTHER": "x"}
    )
    assert s.ipv4_pool == ipaddress.IPv4Network("198.19.8.0/22") and s.mode == "none"


def test_the_host_ula_prefix_is_made_once_and_kept(tmp_path: Path) -> None:
    a = config.host_ula_prefix(tmp_path)
    b = config.host_ula_prefix(tmp_path)
    assert a == b and a.prefixlen == 48 and a.subnet_of(ipaddress.IPv6Network("fd00::/8"))


def _lease_many(state: str, count: int, q: multiprocessing.Queue[int]) -> None:
    j = Journal(Path(state))
    for i in range(count):
        q.put(leases.lease(j, f"p{os.getpid()}-{i}", 1000))


def test_concurrent_leases_never_share_a_slot(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.claim(Record(name="seed", owner=Process(1, 1)))  # makes the directories
    q: multiprocessing.Queue[int] = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_lease_many, args=(str(tmp_path), 25, q)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    got = [q.get(timeout=30) for _ in range(100)]
    for p in procs:
        p.join()
    assert sorted(got) == list(range(100))


def test_a_released_slot_is_leased_again_and_the_pool_runs_out(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.claim(Record(name="seed", owner=Process(1, 1)))
    assert [leases.lease(j, n, 2) for n in ("a", "b")] == [0, 1]
    with pytest.raises(leases.PoolExhausted):
        leases.lease(j, "c", 2)
    leases.release(j, 0, "not-a")  # not a's owner: kept
    assert {s: lease.name for s, lease in leases.leased(j).items()} == {0: "a", 1: "b"}
    leases.release(j, 0, "a")
    assert leases.lease(j, "c", 2) == 0


def test_slots_are_handed_out_round_robin(tmp_path: Path) -> None:
    # A just-released slot is not reused at once: its old link may linger.
    j = Journal(tmp_path)
    j.claim(Record(name="seed", owner=Process(1, 1)))
    assert leases.lease(j, "a", 4) == 0
    leases.release(j, 0, "a")
    assert [leases.lease(j, n, 4) for n in ("b", "c", "d")] == [1, 2, 3]
    assert leases.lease(j, "e", 4) == 0


def test_a_name_is_claimed_once_and_records_round_trip(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    me = Process.of(os.getpid())
    rec = Record(name="a", owner=me, plan=nat.plan(Settings(), "a", 1, PREFIX))
    j.claim(rec)
    with pytest.raises(NameInUse):
        j.claim(Record(name="a", owner=me))
    rec.state = "ready"
    j.write(rec)
    back = j.read("a")
    assert (
        back is not None and back.plan == rec.plan and back.state == "ready" and back.owner.alive()
    )
    assert j.names() == ["a"]
    j.remove("a")
    assert j.read("a") is None and j.names() == []


def test_a_dead_owner_is_not_alive() -> None:
    p = multiprocessing.Process(target=lambda: None)
    p.start()
    proc = Process.of(p.pid)  # type: ignore[arg-type]
    p.join()
    assert not proc.alive()
    assert not Process(os.getpid(), 1).alive()  # same pid, other start time: pid reused


def test_the_report_has_the_stable_keys_and_sums_families() -> None:
    t = Traffic(
        ipv4_in=Count(2, 100), ipv4_out=Count(3, 300), ipv6_in=Count(1, 60), ipv6_out=Count(4, 400)
    )
    rep = report.build(
        name="a",
        mode="nat",
        netns="larkns-a",
        outcome=report.Outcome(signal=15),
        duration_s=1.5,
        setup_s=0.01,
        slaac_s=0.005,
        ipv4="198.19.0.1",
        ipv6=["fd00::1"],
        traffic=t,
    )
    assert rep["bytes"] == {"incoming": 160, "outgoing": 700}
    assert rep["packets"] == {"incoming": 3, "outgoing": 7}
    assert rep["families"]["ipv4"]["bytes"] == {"incoming": 100, "outgoing": 300}
    assert rep["exit_code"] is None and rep["signal"] == 15 and rep["exit_status"] == 143
    assert rep["addresses"] == {"ipv4": "198.19.0.1", "ipv6": ["fd00::1"]}
    text = report.summary(rep)
    assert "killed by SIGTERM" in text and "300 B" in text


def test_the_network_type_can_depend_on_the_job_ad_and_a_job_may_ask_if_allowed() -> None:
    import classad2

    s = config.load(
        environ={
            "LARKNS_NETWORK_TYPE": 'ifThenElse(Owner == "alice", "none", "nat")',
            "LARKNS_ALLOWED_NETWORK_TYPES": "nat, none",
        }
    )
    assert s.job_mode(classad2.parseOne('Owner = "alice"')) == "none"
    assert s.job_mode(classad2.parseOne('Owner = "bob"')) == "nat"
    assert s.job_mode(None) == "nat"
    assert s.job_mode(classad2.parseOne('Owner = "bob"\nLarkNetworkType = "none"')) == "none"
    strict = config.load(environ={})
    with pytest.raises(ConfigError, match="LarkNetworkType: the job asks for 'none'"):
        strict.job_mode(classad2.parseOne('LarkNetworkType = "none"'))
    odd = config.load(environ={"LARKNS_NETWORK_TYPE": "ifThenElse(true, 42, 1)"})
    with pytest.raises(ConfigError, match=r"LARKNS_NETWORK_TYPE: .* gives 42"):
        odd.job_mode(classad2.parseOne("Owner = 1"))
    with pytest.raises(ConfigError, match="LARKNS_ALLOWED_NETWORK_TYPES"):
        config.load(environ={"LARKNS_ALLOWED_NETWORK_TYPES": "nat,bridgy"})


def test_knobs_come_from_the_htcondor_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import htcondor2

    cfg = tmp_path / "condor_config"
    cfg.write_text("LARKNS_IPV4_POOL = 198.19.12.0/22\nLARKNS_ALLOWED_NETWORK_TYPES = none\n")
    monkeypatch.setenv("CONDOR_CONFIG", str(cfg))
    htcondor2.reload_config()
    try:
        s = config.load()
        assert s.ipv4_pool == ipaddress.IPv4Network("198.19.12.0/22") and s.allowed_types == (
            "none",
        )
        monkeypatch.setenv("LARKNS_IPV4_POOL", "198.19.16.0/22")  # the environment wins
        assert config.load().ipv4_pool == ipaddress.IPv4Network("198.19.16.0/22")
    finally:
        monkeypatch.undo()
        htcondor2.reload_config()


def test_traffic_classes_are_named_prefix_lists() -> None:
    s = config.load(
        environ={"LARKNS_CLASSES": "Campus = 198.18.0.0/16, 2001:db8::/32; Cloud=198.19.0.0/16"}
    )
    assert [c[0] for c in s.classes] == ["Campus", "Cloud"]
    assert s.classes[0][1] == (
        ipaddress.IPv4Network("198.18.0.0/16"),
        ipaddress.IPv6Network("2001:db8::/32"),
    )
    for bad, words in (
        ("Campus", "expected NAME = PREFIX"),
        ("9x = 198.18.0.0/16", "expected NAME"),
        ("A = 198.18.0.1/16", "not a prefix"),
        ("A = 198.18.0.0/16, 198.18.1.0/24", "overlap"),
        ("A = 198.18.0.0/24; A = 198.19.0.0/24", "defined twice"),
        # the job ad's attribute names ignore case
        ("Campus = 198.18.0.0/24; campus = 198.19.0.0/24", "defined twice"),
        # LarkNetworkIncomingIPv4 etc. are the families' and relays' bytes
        ("IPv4 = 198.18.0.0/24", "cannot name a class"),
        ("relayed = 198.18.0.0/24", "cannot name a class"),
    ):
        with pytest.raises(ConfigError, match=words):
            config.load(environ={"LARKNS_CLASSES": bad})


# Records as the previous version (1) wrote them: one flat plan dict with
# every type's fields, and an untyped "extra".
V1_NAT = {"version": 1, "name": "NAME", "owner": {"pid": 1, "start": 2}, "state": "ready", "plan": {"name": "NAME", "mode": "nat", "netns": "larkns-NAME", "slot": 7, "host_link": "lk-NAME", "job_link": "eth0", "host_index": 1000007, "job_index": 2, "host_mac": "02:6c:6b:00:00:07", "job_mac": "06:6c:6b:00:00:07", "ipv4_host": "198.19.0.14/31", "ipv4_job": "198.19.0.15/31", "ipv6_prefix": "fd00:6c6b:7400:7::/64", "classes": [], "inbound_ports": None, "bridge": None, "gateway4": None, "site_prefixes": [], "dhcp": False, "nat64_prefix": None}, "job": {"pid": 7, "start": 8}, "client": {"pid": 3, "start": 4}, "keeper": {"pid": 5, "start": 6}, "created": 1.5, "extra": {"sources": ["fd00:6c6b:7400:7::99"], "relays": {"chirp": 9618, "nameservers": ["127.0.0.53"]}, "chirp": {"port": 9618, "cookie": "c00kie", "job_id": "sched#1.0#1"}, "job_id": "sched#1.0#1", "relayed": [10, 20]}}  # noqa: E501  # fmt: skip
V1_BRIDGE = {"version": 1, "name": "NAME", "owner": {"pid": 1, "start": 2}, "state": "ready", "plan": {"name": "NAME", "mode": "bridge", "netns": "larkns-NAME", "slot": 3, "host_link": "lk-NAME", "job_link": "eth0", "host_index": 1000003, "job_index": 2, "host_mac": "fe:6c:6b:00:00:03", "job_mac": "02:11:22:33:44:55", "ipv4_host": None, "ipv4_job": None, "ipv6_prefix": None, "classes": [], "inbound_ports": None, "bridge": "lkbr", "gateway4": None, "site_prefixes": ["2001:db8:1::/64"], "dhcp": True, "nat64_prefix": None}, "job": None, "client": None, "keeper": None, "created": 1.5, "extra": {"dhcp": {"address": "198.18.0.77/24", "router": "198.18.0.1", "server": "198.18.0.1", "seconds": 600, "t1": 300.0, "t2": 525.0, "obtained": 1.0}, "sources": ["2001:db8:1::99"]}}  # noqa: E501  # fmt: skip


def test_a_record_of_the_previous_version_reads_into_typed_fields() -> None:
    from larkns.journal import ChirpAccess, Relays
    from larkns.modes.bridge import BridgeNetwork

    r = Record.from_dict(V1_NAT)
    assert r.plan == nat.plan(Settings(), "NAME", 7, PREFIX)
    assert r.sources == (ipaddress.IPv6Address("fd00:6c6b:7400:7::99"),)
    assert r.relays == Relays(9618, ("127.0.0.53",))
    assert r.chirp == ChirpAccess(9618, "c00kie", "sched#1.0#1")
    assert r.job_id == "sched#1.0#1" and r.relayed == (10, 20)
    # written back, it is a record of this version, and reads the same
    again = Record.from_dict(r.to_dict())
    assert r.to_dict()["version"] == 2 and again == r

    b = Record.from_dict(V1_BRIDGE)
    assert isinstance(b.plan, BridgeNetwork) and b.plan.dhcp and b.plan.bridge == "lkbr"
    assert b.plan.site_prefixes == (ipaddress.IPv6Network("2001:db8:1::/64"),)
    assert b.dhcp is not None and str(b.dhcp.address) == "198.18.0.77/24"
    assert Record.from_dict(b.to_dict()) == b


def test_a_record_this_version_cannot_read_is_kept_for_gc_with_its_reason(
    tmp_path: Path,
) -> None:
    import json

    j = Journal(tmp_path)
    j.ensure_dirs()
    for name, damage in (
        ("newer", {**V1_NAT, "version": 3}),
        ("oddtype", {**V1_NAT, "plan": {**V1_NAT["plan"], "mode": "vxlan"}}),  # type: ignore[dict-item]
        ("badfield", {**V1_NAT, "plan": {**V1_NAT["plan"], "ipv4_job": "not an address"}}),  # type: ignore[dict-item]
    ):
        j.path(name).write_text(json.dumps({**damage, "name": name}))
        r = j.read(name)
        assert r is not None and r.plan is None and not r.owner.alive(), name
        assert r.state == "unreadable" and len(r.problems) == 1, (name, r)
    assert "record version 3" in (j.read("newer") or Record("", Process(0, 0))).problems[0]


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({"LARKNS_BRIDGE_IPV4_POOL": "198.18.0.128/25"}, "set, but LARKNS_BRIDGE"),
        ({"LARKNS_BRIDGE_IPV4": "dhcp"}, "set, but LARKNS_BRIDGE"),
        ({"LARKNS_BRIDGE": "br0", "LARKNS_BRIDGE_IPV4": "static"}, "static needs"),
        ({"LARKNS_PROXY_ND": "eth1"}, "LARKNS_PROXY_ND: set LARKNS_ROUTED"),
        (
            {"LARKNS_CLAT": "on", "LARKNS_ROUTED_IPV4_POOL": "198.18.5.0/24"},
            "routed jobs need LARKNS_ROUTED_IPV6_PREFIX",
        ),
    ],
)
def test_settings_that_cannot_work_together_are_refused_at_start(
    knobs: dict[str, str], words: str
) -> None:
    from larkns.engine import Engine

    with pytest.raises(ConfigError, match=words):
        Engine.validate(config.load(environ=knobs))


def test_every_network_type_has_a_driver() -> None:
    from larkns import modes

    assert set(modes.TYPES) == set(config.MODES)
    for mode in modes.TYPES:
        driver = modes.driver_class(mode)
        assert driver.mode == mode
        assert driver.table is None or driver.table in modes.TABLES


def test_a_lease_on_a_node_of_thousands_of_jobs_does_not_list_their_leases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A setup's cost must not grow with the jobs alive; the slots after the
    # cursor are free, so none of the 3,000 leases is looked at.
    j = Journal(tmp_path)
    j.claim(Record(name="seed", owner=Process(1, 1)))
    for slot in range(3000):
        (j.slots / str(slot)).write_text(leases.Lease(f"j{slot}", 1).encode())
    (j.slots / "next").write_text("3000")
    listed: list[str] = []
    real = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    assert leases.lease(j, "new", 4096) == 3000
    assert str(j.slots) not in listed
    # Past the cursor, a full stretch is found by listing, not by 3,000 tries.
    (j.slots / "next").write_text("0")
    assert leases.lease(j, "newer", 4096) == 3001
    assert str(j.slots) in listed
