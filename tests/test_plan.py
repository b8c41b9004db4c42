"""Plans, settings, leases, journal and reports: pure logic, no root needed."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
from pathlib import Path

import pytest

from larkns import config, leases, plan, report
from larkns.config import ConfigError, Settings
from larkns.journal import Journal, NameInUse, Process, Record
from larkns.traffic import Count, Traffic

PREFIX = ipaddress.IPv6Network("fd00:6c6b:7400::/48")


def test_a_slot_gives_a_job_its_own_31_and_64() -> None:
    s = Settings(ipv4_pool=ipaddress.IPv4Network("198.19.0.0/24"))
    p0 = plan.build(s, "a", "nat", 0, PREFIX)
    p5 = plan.build(s, "b", "nat", 5, PREFIX)
    assert str(p0.ipv4_host) == "198.19.0.0/31" and str(p0.ipv4_job) == "198.19.0.1/31"
    assert str(p5.ipv4_host) == "198.19.0.10/31" and str(p5.ipv4_job) == "198.19.0.11/31"
    assert str(p0.ipv6_prefix) == "fd00:6c6b:7400::/64"
    assert str(p5.ipv6_prefix) == "fd00:6c6b:7400:5::/64"
    assert p0.host_mac != p0.job_mac != p5.job_mac


def test_the_slaac_address_is_known_from_the_mac() -> None:
    p = plan.build(Settings(), "a", "nat", 258, PREFIX)
    assert p.job_mac == "06:6c:6b:00:01:02"
    # EUI-64: flip the U/L bit, put ff:fe in the middle.
    assert p.ipv6_job == ipaddress.IPv6Address("fd00:6c6b:7400:102:46c:6bff:fe00:102")
    assert p.host_link_local == ipaddress.IPv6Address("fe80::6c:6bff:fe00:102")


def test_names_fit_the_kernel_limits() -> None:
    p = plan.build(Settings(), "abcdefghijkl", "nat", 0, PREFIX)
    assert p.host_link is not None and len(p.host_link) <= 15
    with pytest.raises(ConfigError, match="--name"):
        config.check_name("abcdefghijklm")
    for bad in ("", "-x", "a/b", "a b", "ä"):
        with pytest.raises(ConfigError):
            config.check_name(bad)


def test_a_plan_survives_the_journal_round_trip() -> None:
    p = plan.build(Settings(), "a", "nat", 3, PREFIX)
    assert plan.JobNetwork.from_dict(p.to_dict()) == p
    n = plan.build(Settings(), "b", "none", None, None)
    assert plan.JobNetwork.from_dict(n.to_dict()) == n
    assert "fd00:6c6b:7400:3" in p.describe()


def test_the_pools_bound_the_number_of_jobs() -> None:
    s = Settings(ipv4_pool=ipaddress.IPv4Network("198.19.0.0/30"))
    assert plan.slot_count(s, PREFIX) == 2
    assert plan.slot_count(Settings(), ipaddress.IPv6Network("fd00::/63")) == 2
    with pytest.raises(ConfigError):
        plan.build(s, "a", "nat", 2, PREFIX)


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
    rec = Record(name="a", owner=me, plan=plan.build(Settings(), "a", "nat", 1, PREFIX))
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
    ):
        with pytest.raises(ConfigError, match=words):
            config.load(environ={"LARKNS_CLASSES": bad})
