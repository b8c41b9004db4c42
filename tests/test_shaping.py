"""A cap per job, both directions (real kernel, simulated site and worker).

Rates are TCP payload as the receiving end counts it; the cap is on
link-layer bytes, of which bulk TCP payload is ~95% (1448 of 1514 bytes a
frame).  Tolerances are wide: the VM these run on has 2 loaded cores.  None
of them assumes what the kernel lacks: fq_codel or sfq, where present, are
the leaf.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from larkns import config, shaping
from larkns.config import ConfigError, Settings
from larkns.kernel import tc
from larkns.plan import JobNetwork, LinkedNetwork
from tests.test_run import run_job
from tests.world import RATE, SITE4, SITE6, World, sh

PY = sys.executable
SINK_PORT = 7780
CAP = 20_000_000
UP_CAP = 10_000_000
SECONDS = 4


# -- what needs no kernel -------------------------------------------------


def test_rates_read_as_tc_writes_them_and_up_defaults_to_down() -> None:
    assert shaping.parse_cap("100mbit", "X") == (100_000_000, 100_000_000)
    assert shaping.parse_cap("1gbit/500kbit", "X") == (1_000_000_000, 500_000)
    assert shaping.parse_cap(" 2.5Mbit / 1mbit ", "X") == (2_500_000, 1_000_000)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0mbit", "rate of 0"),
        ("fast", "expected a rate"),
        ("100", "expected a rate"),
        ("10kbps", "kilobytes"),
        ("10mbit/", "DOWN[/UP]"),
        ("-1mbit", "expected a rate"),
        ("1bit", "8kbit"),
        ("2000gbit", "1000gbit"),
    ],
)
def test_a_bad_rate_is_one_line_naming_the_knob(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load({"LARKNS_BANDWIDTH": text}, condor=False)
    msg = str(e.value)
    assert msg.startswith("LARKNS_BANDWIDTH:") and words in msg and "\n" not in msg


def test_a_job_gets_its_own_cap_within_the_maximum_else_the_default_else_the_maximum() -> None:
    most = Settings(bandwidth_max=(100_000_000, 50_000_000))
    assert shaping.job_cap(most, (10_000_000, 10_000_000)) == (10_000_000, 10_000_000)
    assert shaping.job_cap(most, None) == (100_000_000, 50_000_000)
    both = dataclasses.replace(most, bandwidth=(20_000_000, 5_000_000))
    assert shaping.job_cap(both, None) == (20_000_000, 5_000_000)
    assert shaping.job_cap(Settings(), None) is None  # not shaped
    with pytest.raises(ConfigError, match=r"--bandwidth: .* above LARKNS_BANDWIDTH_MAX.*up"):
        shaping.job_cap(most, (100_000_000, 60_000_000))
    with pytest.raises(ConfigError, match=r"LARKNS_BANDWIDTH: .* above LARKNS_BANDWIDTH_MAX"):
        config.load({"LARKNS_BANDWIDTH": "2gbit", "LARKNS_BANDWIDTH_MAX": "1gbit"}, condor=False)


def test_a_classad_expression_gives_each_job_its_cap_within_the_maximum() -> None:
    classad2 = pytest.importorskip("classad2")
    # HTCondor hands out a node's bandwidth as a custom machine resource
    # (MACHINE_RESOURCE_Bandwidth); a job asks with request_bandwidth.
    settings = config.load(
        {
            "LARKNS_BANDWIDTH": 'strcat(RequestBandwidth, "mbit")',
            "LARKNS_BANDWIDTH_MAX": "1gbit",
        },
        condor=False,
    )
    assert settings.bandwidth is None and settings.bandwidth_expr is not None
    asked = settings.job_bandwidth(classad2.ClassAd({"RequestBandwidth": 100}))
    assert asked == (100_000_000, 100_000_000)
    assert shaping.job_cap(settings, asked) == asked
    # a job that asks nothing gets the maximum, never more
    assert settings.job_bandwidth(classad2.ClassAd({})) is None
    assert shaping.job_cap(settings, None) == (10**9, 10**9)
    above = settings.job_bandwidth(classad2.ClassAd({"RequestBandwidth": 2000}))
    with pytest.raises(ConfigError, match="above LARKNS_BANDWIDTH_MAX"):
        shaping.job_cap(settings, above, "the job's cap")
    with pytest.raises(ConfigError, match=r"LARKNS_BANDWIDTH \(.*\): expected a rate"):
        settings.job_bandwidth(classad2.ClassAd({"RequestBandwidth": "lots"}))
    with pytest.raises(ConfigError, match="LARKNS_BANDWIDTH"):
        settings.job_bandwidth(classad2.ExprTree("[RequestBandwidth = 1 / 0]").eval())
    # a bare word is a misspelt rate, not an attribute
    with pytest.raises(ConfigError, match="expected a rate"):
        config.load({"LARKNS_BANDWIDTH": "fast"}, condor=False)


def test_the_burst_lets_the_first_second_exceed_the_cap_by_little() -> None:
    for rate in (500_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000, 10**11):
        assert shaping.burst(rate) * 8 <= 0.1 * rate, rate
    # ... and is never below two full frames, nor HTB would wait to send one
    assert shaping.burst(10**6) >= 2 * 1514


def test_the_cap_is_journaled_with_the_plan() -> None:
    from larkns.modes import nat

    plan = nat.plan(Settings(), "lktsj", 3, ipaddress.IPv6Network("fd00:6c6b:7400::/48"))
    capped = dataclasses.replace(plan, bandwidth=(CAP, UP_CAP))
    back = JobNetwork.from_dict(json.loads(json.dumps(capped.to_dict())))
    assert isinstance(back, LinkedNetwork) and back.bandwidth == (CAP, UP_CAP)
    assert back == capped
    assert len(capped.shaper_link) <= 15 and capped.shaper_link == "lkblktsj"
    assert JobNetwork.from_dict(plan.to_dict()).bandwidth is None  # type: ignore[attr-defined]


# -- the kernel side --------------------------------------------------------


def sink_world(prefix: str) -> Iterator[World]:
    """A world with tests/rate.py's sink on its site, for a module's tests
    (conftest's clean_world checks it for leaks)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    w = World(prefix)
    try:
        with w.rate_sink(SINK_PORT):
            yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield from sink_world("lkts")


def transfers(out: str) -> list[dict[str, float]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def assert_near_cap(t: dict[str, float], cap: int, what: str) -> None:
    # Payload is ~95% of the link-layer cap.  Below it: a sender starved of
    # CPU on a VM that others load too (the lower bounds are loose); above
    # it: the shaper's own fault.
    steady, whole = t["steady_bps"] / cap, t["bps"] / cap
    assert 0.8 <= steady <= 1.05, (what, steady, t)
    assert 0.7 <= whole <= 1.05, (what, whole, t)
    # no CNI-style burst: the first second stays within the cap (+15%)
    assert t["first_bps"] <= 1.15 * cap, (what, t["first_bps"], cap)


def test_a_capped_jobs_download_and_upload_each_run_near_the_cap(
    clean_world: World, tmp_path: Path
) -> None:
    proc, rep = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        f"{PY} {RATE} get {SITE4} {SINK_PORT} {SECONDS} && "
        f"{PY} {RATE} put {SITE6} {SINK_PORT} {SECONDS}",
        extra=("--bandwidth", "20mbit/10mbit"),
    )
    assert proc.returncode == 0, proc.stderr
    down, up = transfers(proc.stdout)
    assert_near_cap(down, CAP, "download over IPv4")
    assert_near_cap(up, UP_CAP, "upload over IPv6")
    assert rep["bandwidth"] == {"down_bps": CAP, "up_bps": UP_CAP, "leaf_qdisc": tc.leaf()}
    assert tc.leaf() in (*tc.LEAVES, tc.FIFO)
    assert "capped at 20 Mbit/s down, 10 Mbit/s up" in proc.stderr


def _host_side(world: World, name: str) -> tuple[str, str, str]:
    """(the host end's qdiscs, its filters, the IFB's qdiscs) in the worker."""
    qd = sh("tc", "qdisc", "show", "dev", f"lk-{name}", ns=world.worker, check=False).stdout
    filt = sh(
        "tc", "filter", "show", "dev", f"lk-{name}", "ingress", ns=world.worker, check=False
    ).stdout
    ifb = sh("tc", "qdisc", "show", "dev", f"lkb{name}", ns=world.worker, check=False).stdout
    return qd, filt, ifb


def test_a_privileged_job_that_deletes_its_qdiscs_keeps_its_cap(
    clean_world: World, tmp_path: Path
) -> None:
    name = "lktspriv"
    job = clean_world.serving(
        "run",
        "--name",
        name,
        "--privileged",
        "--bandwidth",
        "20mbit/10mbit",
        "--",
        "sh",
        "-c",
        # What a job can do to its own end: none of it is where the cap is.
        "tc qdisc del dev eth0 root; tc qdisc del dev eth0 ingress;"
        " tc qdisc add dev eth0 root pfifo; echo ready;"
        # the families the other test does not use in each direction
        f" {PY} {RATE} get {SITE6} {SINK_PORT} {SECONDS} &&"
        f" {PY} {RATE} put {SITE4} {SINK_PORT} {SECONDS}",
    )
    qd, filt, ifb = _host_side(clean_world, name)
    assert "htb 1: root" in qd and "clsact ffff:" in qd, qd
    assert "mirred" in filt and f"lkb{name}" in filt, filt
    assert "htb 1: root" in ifb and tc.leaf() in qd and tc.leaf() in ifb, ifb
    assert (
        f"lkb{name}" in sh("ip", "-o", "link", "show", "type", "ifb", ns=clean_world.worker).stdout
    )
    out, _ = _finish(job)
    down, up = transfers(out)
    assert_near_cap(down, CAP, "download over IPv6 after tc qdisc del in the job")
    assert_near_cap(up, UP_CAP, "upload over IPv4 after tc qdisc del in the job")
    assert _host_side(clean_world, name) == ("", "", "")  # gone with the job


def _finish(job: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    return out, err


def test_an_uncapped_job_has_no_qdisc_and_no_ifb(clean_world: World, tmp_path: Path) -> None:
    name = "lktsfree"
    job = clean_world.serving("run", "--name", name, "--", "sh", "-c", "echo ready; sleep 30")
    try:
        qd, filt, ifb = _host_side(clean_world, name)
        assert qd.split()[:2] == ["qdisc", "noqueue"] and "clsact" not in qd, qd
        assert filt == "" and ifb == ""
        ifbs = sh("ip", "-o", "link", "show", "type", "ifb", ns=clean_world.worker).stdout
        assert ifbs == ""
    finally:
        job.terminate()
        job.communicate(timeout=30)


def test_a_site_default_cap_applies_and_a_job_above_the_maximum_is_refused(
    clean_world: World, tmp_path: Path
) -> None:
    def run(*extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
        return run_job(
            clean_world,
            tmp_path,
            "true",
            extra=extra,
            LARKNS_BANDWIDTH="10mbit/5mbit",
            LARKNS_BANDWIDTH_MAX="50mbit",
        )

    proc, rep = run()
    assert proc.returncode == 0, proc.stderr
    assert rep["bandwidth"]["down_bps"] == 10_000_000  # type: ignore[index]
    assert rep["bandwidth"]["up_bps"] == 5_000_000  # type: ignore[index]
    proc, rep = run("--bandwidth", "50mbit")
    assert proc.returncode == 0 and rep["bandwidth"]["down_bps"] == 50_000_000  # type: ignore[index]
    proc, rep = run_job(clean_world, tmp_path, "true")
    assert proc.returncode == 0 and rep["bandwidth"] is None


def test_bad_caps_are_one_line_exit_125_and_build_nothing(
    clean_world: World, tmp_path: Path
) -> None:
    cases: list[tuple[tuple[str, ...], dict[str, str], str]] = [
        (("--bandwidth", "0"), {}, "--bandwidth"),
        (("--bandwidth", "0mbit"), {}, "--bandwidth"),
        (("--bandwidth", "lots"), {}, "--bandwidth"),
        (("--bandwidth", "1gbit"), {"LARKNS_BANDWIDTH_MAX": "100mbit"}, "LARKNS_BANDWIDTH_MAX"),
        (("--bandwidth", "10mbit/1gbit"), {"LARKNS_BANDWIDTH_MAX": "100mbit"}, "up 1gbit"),
        ((), {"LARKNS_BANDWIDTH": "10mbps"}, "LARKNS_BANDWIDTH"),
        ((), {"LARKNS_BANDWIDTH_MAX": "0kbit"}, "LARKNS_BANDWIDTH_MAX"),
    ]
    for extra, knobs, word in cases:
        proc = clean_world.larkns("run", *extra, "--", "true", knobs=knobs)
        assert proc.returncode == 125, (extra, knobs, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and word in err[0], (extra, knobs, proc.stderr)
        assert clean_world.leftovers() == []


def test_a_killed_capped_job_is_shown_with_its_cap_and_gc_removes_its_ifb(
    clean_world: World, tmp_path: Path
) -> None:
    name = "lktskill"
    job = clean_world.serving(
        "run", "--name", name, "--bandwidth", "30mbit", "--", "sh", "-c", "echo ready; sleep 300"
    )
    show = json.loads(clean_world.larkns("show", name).stdout)
    assert show["plan"]["bandwidth"] == [30_000_000, 30_000_000]
    assert show["problems"] == []
    job.kill()
    job.wait()
    for f in (job.stdout, job.stderr):
        assert f is not None
        f.close()
    assert f"lkb{name}" in sh("ip", "-o", "link", "show", ns=clean_world.worker).stdout
    gc = clean_world.larkns("gc")
    assert gc.returncode == 0, gc.stderr
    assert f"job {name}" in gc.stdout
    assert f"lkb{name}" not in sh("ip", "-o", "link", "show", ns=clean_world.worker).stdout


def test_gc_removes_an_ifb_whose_job_has_no_record(clean_world: World) -> None:
    sh("ip", "link", "add", "lkblktsorph", "type", "ifb", ns=clean_world.worker)
    # Not larkns's: another kind, or another prefix.
    sh("ip", "link", "add", "lktsother", "type", "ifb", ns=clean_world.worker)
    try:
        gc = clean_world.larkns("gc")
        assert gc.returncode == 0, gc.stderr
        assert "link lkblktsorph" in gc.stdout
        ifbs = sh("ip", "-o", "link", "show", "type", "ifb", ns=clean_world.worker).stdout
        assert "lkblktsorph" not in ifbs and "lktsother" in ifbs
    finally:
        sh("ip", "link", "del", "lktsother", ns=clean_world.worker, check=False)
        sh("ip", "link", "del", "lkblktsorph", ns=clean_world.worker, check=False)


def test_shaping_a_link_that_is_not_there_fails_naming_it_and_builds_nothing(
    clean_world: World,
) -> None:
    from larkns.kernel import netns
    from larkns.kernel.rtnl import Rtnl

    with netns.entered(clean_world.worker), Rtnl() as r:
        with pytest.raises(OSError, match="lk-lktsnone"):
            tc.shape(r, "lk-lktsnone", "lkblktsnone", 0, (CAP, CAP))
        assert r.link_index("lkblktsnone") is None
        assert tc.unshape(r, "lkblktsnone") is False  # removing what is not there succeeds


def test_a_rate_above_32_bits_of_bytes_per_second_is_kept_whole() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds links in a throwaway namespace")
    from larkns.kernel import netns
    from larkns.kernel.rtnl import Rtnl

    with netns.throwaway(), Rtnl() as r:
        subprocess.run(
            ["ip", "link", "add", "lk-lktsbig", "type", "veth", "peer", "name", "lktspeer"],
            check=True,
        )
        tc.shape(r, "lk-lktsbig", "lkblktsbig", 0, (100 * 10**9, 40 * 10**9))
        down = subprocess.run(
            ["tc", "class", "show", "dev", "lk-lktsbig"], capture_output=True, text=True
        ).stdout
        up = subprocess.run(
            ["tc", "class", "show", "dev", "lkblktsbig"], capture_output=True, text=True
        ).stdout
    assert "rate 100Gbit ceil 100Gbit" in down, down
    assert "rate 40Gbit ceil 40Gbit" in up, up


def test_the_leaf_is_the_best_qdisc_the_kernel_has() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: probes in a throwaway namespace")
    have = tc.probe((*tc.LEAVES, "htb", "lkts-no-such-qdisc"))
    assert have["htb"] and not have["lkts-no-such-qdisc"]
    best = next((k for k in tc.LEAVES if have[k]), tc.FIFO)
    assert tc.leaf() == best


def test_a_daemon_keeps_a_finished_jobs_ifb_for_its_next_capped_job(
    clean_world: World,
) -> None:
    from larkns.engine import Engine
    from larkns.journal import Process
    from larkns.kernel import netns
    from larkns.kernel.rtnl import Rtnl

    settings = Settings(
        ipv4_pool=ipaddress.IPv4Network(clean_world.ipv4_pool),
        ipv6_prefix=ipaddress.IPv6Network(clean_world.ipv6_prefix),
        state_dir=clean_world.state_dir,
        netns_prefix=clean_world.netns_prefix,
    )
    me = Process.of(os.getpid())
    worker = clean_world.worker

    def ifbs() -> str:
        return sh("ip", "-o", "link", "show", "type", "ifb", ns=worker).stdout

    with netns.entered(worker), Rtnl() as r, Engine(settings, clean_when_idle=False) as eng:
        first = eng.setup("lktsa", "nat", me, bandwidth=(CAP, CAP))
        assert isinstance(first, LinkedNetwork)
        index = r.link_index(first.shaper_link)
        eng.teardown("lktsa")
        spare = f"lkb.{index}"
        assert r.link_index(first.shaper_link) is None
        assert r.link_index(spare) == index
        assert "htb" not in sh("tc", "qdisc", "show", "dev", spare, ns=worker).stdout

        second = eng.setup("lktsb", "nat", me, bandwidth=(2 * CAP, UP_CAP))
        assert isinstance(second, LinkedNetwork)
        assert r.link_index(second.shaper_link) == index  # the same IFB, renamed
        assert r.link_index(spare) is None
        assert eng.check("lktsb") == []
        classes = sh("tc", "class", "show", "dev", second.shaper_link, ns=worker).stdout
        assert "rate 10Mbit ceil 10Mbit" in classes, classes
        eng.teardown("lktsb")
        assert f"{spare}:" in ifbs()
        # A larknsd started again takes the spares the previous one kept.
        with Engine(settings, clean_when_idle=False) as again:
            third = again.setup("lktsc", "nat", me, bandwidth=(CAP, CAP))
            assert isinstance(third, LinkedNetwork) and again.check("lktsc") == []
            assert r.link_index(third.shaper_link) == index
            again.teardown("lktsc")
            # A spare someone removed meanwhile: the next job makes a new IFB.
            sh("ip", "link", "del", spare, ns=worker)
            fourth = again.setup("lktsd", "nat", me, bandwidth=(CAP, CAP))
            assert isinstance(fourth, LinkedNetwork) and again.check("lktsd") == []
            assert r.link_index(fourth.shaper_link) != index
            again.teardown("lktsd")
    # gc, with no job left, removes the spare; so does a daemon stopping.
    assert "lkb." in ifbs()
    gc = clean_world.larkns("gc")
    assert gc.returncode == 0 and "spare upload shaper" in gc.stdout, gc
    assert ifbs() == ""


@pytest.fixture(scope="module")
def bridged() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    from tests.test_bridge import bridged_world

    for w in bridged_world("lkts"):
        with w.rate_sink(SINK_PORT):
            yield w


def test_a_bridged_job_is_capped_both_ways_too(bridged: World, tmp_path: Path) -> None:
    from tests.test_bridge import KNOBS, without_leftovers

    for world in without_leftovers(bridged):
        proc, rep = run_job(
            world,
            tmp_path,
            "sh",
            "-c",
            f"{PY} {RATE} get {SITE4} {SINK_PORT} {SECONDS} && "
            f"{PY} {RATE} put {SITE4} {SINK_PORT} {SECONDS}",
            extra=("--mode", "bridge", "--bandwidth", "20mbit/10mbit"),
            **KNOBS,
        )
        assert proc.returncode == 0, proc.stderr
        down, up = transfers(proc.stdout)
        assert_near_cap(down, CAP, "a bridged job's download")
        assert_near_cap(up, UP_CAP, "a bridged job's upload")
        assert rep["bandwidth"]["up_bps"] == UP_CAP  # type: ignore[index]


@pytest.mark.parametrize(
    "deleted",
    [
        ("lk-{name}", "root"),  # the download's HTB
        ("lk-{name}", "clsact"),  # the upload's redirect
        ("lkb{name}", "root"),  # the upload's HTB
    ],
)
def test_a_qdisc_deleted_on_the_host_side_is_put_back_at_once(
    clean_world: World, deleted: tuple[str, str]
) -> None:
    """`tc qdisc del` on the worker (an admin, a network service): larkns
    hears it (rtnetlink's TC group) and puts the job's shapers back whole."""
    import time

    name = "lktsdel"
    job = clean_world.serving(
        "run", "--name", name, "--bandwidth", "20mbit/10mbit", "--",
        "sh", "-c", "echo ready; exec sleep 30",
    )  # fmt: skip

    def shapers() -> list[str]:
        # The mirred action's index is a new one each time it is added.
        text = "\n".join(_host_side(clean_world, name))
        return [line for line in text.splitlines() if not line.strip().startswith("index ")]

    try:
        whole = shapers()
        link, which = deleted
        sh("tc", "qdisc", "del", "dev", link.format(name=name), which, ns=clean_world.worker)
        deadline = time.monotonic() + 1.0
        while shapers() != whole:
            assert time.monotonic() < deadline, (shapers(), whole)
            time.sleep(0.02)
    finally:
        job.terminate()
        _, err = job.communicate(timeout=30)
    assert f"larkns: job {name}: its shapers put back" in err, err
