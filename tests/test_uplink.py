"""The node's uplink shared among jobs by weight, both directions (real
kernel, simulated site and worker; the worker's uplink is up0).

Rates are TCP payload as the receiving end counts it, after the first
second; the uplink's capacity is link-layer bytes, of which bulk TCP payload
is 1448 of every 1514 (tests/test_shaping.py says more).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from larkns import config, shaping
from larkns.config import ConfigError, Settings
from larkns.kernel import bpf, tc, uplink
from larkns.plan import JobNetwork, LinkedNetwork
from tests.test_run import run_job
from tests.test_shaping import PY, SINK_PORT, sink_world, transfers
from tests.world import RATE, SITE4, SITE6, World, sh

UPLINK = 40_000_000
KNOBS = {"LARKNS_UPLINK_BANDWIDTH": "40mbit", "LARKNS_UPLINK": "up0"}
SECONDS = 6
# Link-layer bytes of a full TCP segment (timestamps on) per payload byte.
L2 = 1514 / 1448
# tests/rate.py's bins: bytes a tenth of a second.
BIN = 0.1
# Each job's (download, upload, report).
Runs = list[tuple[dict[str, Any], dict[str, Any], dict[str, object]]]


# -- what needs no kernel -------------------------------------------------


@pytest.mark.parametrize("raw", ["0", "-1", "0.5", "101", "1e3", "50 * 3", "1.5.2"])
def test_a_bad_weight_is_one_line_naming_the_knob(raw: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load({"LARKNS_WEIGHT": raw}, condor=False)
    msg = str(e.value)
    assert msg.startswith("LARKNS_WEIGHT:") and "from 1 to 100" in msg and "\n" not in msg


def test_a_weight_is_a_number_or_a_classad_expression_per_job() -> None:
    assert config.load({"LARKNS_WEIGHT": "2.5"}, condor=False).weight == 2.5
    assert config.load({"LARKNS_WEIGHT": "2 * 2"}, condor=False).weight == 4.0
    assert config.load({"LARKNS_WEIGHT": ""}, condor=False).weight == 1.0
    assert Settings().weight == 1.0
    classad2 = pytest.importorskip("classad2")
    s = config.load({"LARKNS_WEIGHT": 'ifThenElse(AcctGroup =?= "group_cms", 3, 1)'}, condor=False)
    assert s.weight_expr is not None
    assert s.job_weight(classad2.ClassAd({"AcctGroup": "group_cms"})) == 3.0
    assert s.job_weight(classad2.ClassAd({"AcctGroup": "group_atlas"})) == 1.0
    assert s.job_weight(None) == 1.0  # larkns run: no ad
    # an attribute the job does not have: the default
    bare = config.load({"LARKNS_WEIGHT": "LarkWeight"}, condor=False)
    assert bare.job_weight(classad2.ClassAd({})) == 1.0
    assert bare.job_weight(classad2.ClassAd({"LarkWeight": 7})) == 7.0
    for bad in (0, 500, "heavy", True):
        with pytest.raises(ConfigError, match=r"^LARKNS_WEIGHT \(LarkWeight for this job\)"):
            bare.job_weight(classad2.ClassAd({"LarkWeight": bad}))


@pytest.mark.parametrize(
    ("knob", "raw", "words"),
    [
        ("LARKNS_UPLINK_BANDWIDTH", "fast", "expected a rate"),
        ("LARKNS_UPLINK_BANDWIDTH", "0mbit", "rate of 0"),
        ("LARKNS_UPLINK", "not a link!", "interface name"),
    ],
)
def test_a_bad_uplink_knob_is_one_line_naming_it(knob: str, raw: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load({knob: raw}, condor=False)
    msg = str(e.value)
    assert msg.startswith(f"{knob}:") and words in msg and "\n" not in msg


def test_the_weight_is_journaled_with_the_plan() -> None:
    import dataclasses

    from larkns.modes import nat

    plan = nat.plan(Settings(), "lktuj", 3, ipaddress.IPv6Network("fd00:6c6b:7400::/48"))
    shared = dataclasses.replace(plan, weight=2.5)
    back = JobNetwork.from_dict(json.loads(json.dumps(shared.to_dict())))
    assert isinstance(back, LinkedNetwork) and back.weight == 2.5 and back == shared
    assert JobNetwork.from_dict(plan.to_dict()).weight is None  # type: ignore[attr-defined]


def test_a_jobs_class_and_tag_come_from_its_slot_and_its_quantum_from_its_weight() -> None:
    assert uplink.classid(0) == 0x4C4B0002 and uplink.classid(7) & 0xFFFF == 9
    with pytest.raises(ValueError):
        uplink.classid(0xFFFE)  # its minor would not fit
    # 64 KiB a turn per unit of weight: a veth's packets are up to 64 KiB
    assert uplink.quantum(1) == 65536 and uplink.quantum(3) == 3 * uplink.quantum(1)
    assert uplink.quantum(shaping.MAX_WEIGHT) == 100 * 65536


def test_a_jobs_classes_in_the_share_hold_a_fifo_whatever_the_kernel_has() -> None:
    """Not fq_codel even where the kernel has it (uplink.LEAF says why):
    the FIFO sized for the class's ceiling, 20 ms of it or two 64 KiB
    packets."""
    shared = uplink.Shared("up0", 2, 0, 3, 4, (400_000_000, 40_000_000))
    leaves = [r for r in uplink.class_requests(shared, 0, 3.0, None) if r.type == tc.RTM_NEWQDISC]
    assert [r.what for r in leaves] == ["add bfifo to lkshare.down", "add bfifo to lkshare.up"]
    limits = [struct.unpack_from("=I", r.body, len(r.body) - 4)[0] for r in leaves]
    assert limits == [1_000_000, 2 * 65536]


def test_the_kernel_verifier_takes_both_classifiers() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: loads eBPF programs")
    for prog in (bpf.download(7, uplink.classid(3), 5), bpf.upload(uplink.MAJOR)):
        assert len(prog) % 8 == 0 and len(prog) <= 9 * 8
        os.close(bpf.load(prog, "lktu"))
    with pytest.raises(OSError, match=r"bpf.*R0 !read_ok"):
        bpf.load(bytes.fromhex("9500000000000000"), "lktu")  # exit without a result


# -- the kernel side --------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield from sink_world("lktu")


def _until(when: float) -> str:
    """A command that waits until the wall-clock time `when`."""
    return f"{PY} -c 'import time; time.sleep(max(0, {when} - time.time()))'"


def _jobs(
    world: World,
    tmp_path: Path,
    weights: list[str],
    extra: tuple[tuple[str, ...], ...] = (),
    knobs: dict[str, str] = KNOBS,
    ready_in: float = 3,
) -> Runs:
    """Jobs of these weights (and `extra` options, each its own) at once,
    each downloading (IPv4), then uploading (IPv6): (download, upload,
    report) of each."""
    # All start each transfer at once, whatever their setup took (a bridged
    # job's SLAAC, a loaded VM): a job that ran alone for a while would get
    # more than its share of the whole.
    # `ready_in`: more than the slowest job's setup takes.
    start = time.time() + ready_in
    procs = []
    for i, weight in enumerate(weights):
        report = tmp_path / f"report{i}.json"
        more = extra[i] if extra else ()
        procs.append(
            (
                world.larkns_popen(
                    "run", "--json-report", str(report), "--weight", weight, *more, "--",
                    "sh", "-c",
                    f"{_until(start)} && {PY} {RATE} get {SITE4} {SINK_PORT} {SECONDS} && "
                    f"{_until(start + SECONDS + 1)} && "
                    f"{PY} {RATE} put {SITE6} {SINK_PORT} {SECONDS}",
                    knobs=knobs,
                ),
                report,
            )
        )  # fmt: skip
    out = []
    for proc, report in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        down, up = transfers(stdout)
        out.append((down, up, json.loads(report.read_text())))
    return out


def _together(ts: list[dict[str, Any]]) -> list[float]:
    """Each transfer's bits/s while all of them were busy: from a second
    after the last one's first byte (TCP's slow start) to the first one's
    last second, on one clock (rate.py's "start" is CLOCK_MONOTONIC, which
    every namespace shares).  Each transfer's own seconds 1 to 6 are not
    enough: when one starts late (a slow setup, a loaded CPU), the other
    then has the uplink alone for a while inside its own window.  In a
    Debian guest under emulation, uploads that started 1.4-2.0 s apart gave
    weight 1 of 1:9 0.27-0.38 so counted, 0.11-0.21 counted together."""
    lo = max(t["start"] for t in ts) + 1
    hi = min(t["start"] for t in ts) + SECONDS
    assert hi - lo >= 2, f"the transfers were busy together for {hi - lo:.1f} s only"
    return [
        8 * sum(b for i, b in enumerate(t["bins"]) if lo <= t["start"] + i * BIN < hi) / (hi - lo)
        for t in ts
    ]


def _shares(runs: Runs) -> list[tuple[float, float]]:
    """Each job's part of the jobs' total while all were busy, (download,
    upload)."""
    down = _together([r[0] for r in runs])
    up = _together([r[1] for r in runs])
    return [(d / sum(down), u / sum(up)) for d, u in zip(down, up, strict=True)]


def test_one_job_alone_gets_the_whole_uplink_both_ways(clean_world: World, tmp_path: Path) -> None:
    ((down, up, rep),) = _jobs(clean_world, tmp_path, ["1"])
    for t, what in ((down, "download"), (up, "upload")):
        # at least 90% of the uplink, at most all of it
        assert 0.9 <= t["steady_bps"] * L2 / UPLINK <= 1.03, (what, t)
    assert rep["weight"] == 1.0


def test_two_jobs_of_equal_weight_get_half_each_both_ways(
    clean_world: World, tmp_path: Path
) -> None:
    runs = _jobs(clean_world, tmp_path, ["1", "1"])
    for down, up in _shares(runs):
        assert 0.45 <= down <= 0.55 and 0.45 <= up <= 0.55, _shares(runs)
    # together they fill it
    total = sum(_together([r[0] for r in runs])) * L2 / UPLINK
    assert 0.9 <= total <= 1.03, total


def test_weights_1_and_3_get_a_quarter_and_three_quarters_both_ways(
    clean_world: World, tmp_path: Path
) -> None:
    runs = _jobs(clean_world, tmp_path, ["1", "3"])
    (light_down, light_up), (heavy_down, heavy_up) = _shares(runs)
    assert 0.225 <= light_down <= 0.275 and 0.225 <= light_up <= 0.275, _shares(runs)
    assert 0.725 <= heavy_down <= 0.775 and 0.725 <= heavy_up <= 0.775, _shares(runs)
    assert [r[2]["weight"] for r in runs] == [1.0, 3.0]


def test_a_bridged_job_and_a_nat_job_share_a_bridged_uplink(tmp_path: Path) -> None:
    """A worker whose uplink (up0) is a port of the bridge that bridged
    jobs join: a bridged job's frames pass up0 alone, a nat job's packets
    the bridge too (which they come in from).  Both are in the share."""
    from tests.test_bridge import KNOBS as BRIDGED
    from tests.test_bridge import bridged_world, without_leftovers

    for bridged in bridged_world("lktu"):
        with bridged.rate_sink(SINK_PORT):
            for world in without_leftovers(bridged):
                # A bridged job waits for its SLAAC (up to LARKNS_SLAAC_TIMEOUT,
                # 5 s) and DHCP: once, under a loaded CI, it started after the
                # other and ran alone at the end of its window (0.34 for 0.25).
                runs = _jobs(
                    world,
                    tmp_path,
                    ["1", "3"],
                    (("--mode", "bridge"), ()),
                    KNOBS | BRIDGED,
                    ready_in=10,
                )
                ((light_down, light_up), _) = _shares(runs)
                assert 0.225 <= light_down <= 0.275 and 0.225 <= light_up <= 0.275, _shares(runs)
                assert [r[2]["mode"] for r in runs] == ["bridge", "nat"]


def test_a_capped_job_keeps_its_cap_and_the_other_takes_the_rest(
    clean_world: World, tmp_path: Path
) -> None:
    """Sharing lends what a job leaves idle: a job capped at 10 of the 40
    Mbit/s leaves 30 to the other, whatever their equal weights say."""
    capped = clean_world.larkns_popen(
        "run", "--bandwidth", "10mbit", "--", PY, RATE, "get", SITE4, str(SINK_PORT), str(SECONDS),
        knobs=KNOBS,
    )  # fmt: skip
    proc, _ = run_job(
        clean_world, tmp_path, PY, RATE, "get", SITE4, str(SINK_PORT), str(SECONDS),
        LARKNS_UPLINK_BANDWIDTH="40mbit", LARKNS_UPLINK="up0",
    )  # fmt: skip
    out, err = capped.communicate(timeout=60)
    assert capped.returncode == 0 and proc.returncode == 0, (err, proc.stderr)
    (little,), (rest,) = transfers(out), transfers(proc.stdout)
    assert 0.8 <= little["steady_bps"] * L2 / 10_000_000 <= 1.05, little
    assert 0.8 <= rest["steady_bps"] * L2 / 30_000_000 <= 1.15, rest


def test_the_nodes_own_traffic_is_not_shared(clean_world: World) -> None:
    """HTCondor's own transfers (the worker's, not a job's) are not in the
    jobs' share: they pass the uplink unshaped while a job is in it."""
    job = clean_world.serving("run", "--", "sh", "-c", "echo ready; exec sleep 30", knobs=KNOBS)
    try:
        assert "lkshare.up" in sh("ip", "-o", "link", ns=clean_world.worker).stdout
        for verb, host in (("get", SITE4), ("put", SITE6)):
            own = subprocess.run(
                clean_world.worker_cmd(PY, RATE, verb, host, str(SINK_PORT), "2"),
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            (t,) = transfers(own.stdout)
            assert t["steady_bps"] > 2 * UPLINK, (verb, t)
    finally:
        job.terminate()
        job.communicate(timeout=30)


@pytest.mark.parametrize(
    ("link", "which"),
    [("lkshare.down", "root"), ("lkshare.up", "root"), ("up0", "clsact")],
)
def test_the_share_deleted_on_the_host_side_is_put_back_at_once(
    clean_world: World, link: str, which: str
) -> None:
    """`tc qdisc del` on the worker: larkns hears it and puts the share
    (the IFBs' HTB, the jobs' classes, the uplink's filter) back whole."""

    def share() -> list[str]:
        text = "".join(
            sh("tc", *what, ns=clean_world.worker, check=False).stdout
            for what in (
                ("class", "show", "dev", "lkshare.down"),
                ("class", "show", "dev", "lkshare.up"),
                ("filter", "show", "dev", "up0", "egress"),
            )
        )
        # A leaf's handle, the program's id and the action's index are new
        # each time.
        text = re.sub(r"leaf \w+: | id \d+", "", text)
        return [line for line in text.splitlines() if not line.strip().startswith("index ")]

    job = clean_world.serving(
        "run", "--weight", "2", "--", "sh", "-c", "echo ready; exec sleep 30", knobs=KNOBS
    )
    try:
        whole = share()
        assert any("4c4b:2" in line for line in whole), whole
        sh("tc", "qdisc", "del", "dev", link, which, ns=clean_world.worker)
        deadline = time.monotonic() + 1.0
        while share() != whole:
            assert time.monotonic() < deadline, (share(), whole)
            time.sleep(0.02)
    finally:
        job.terminate()
        _, err = job.communicate(timeout=30)
    assert "larkns: the uplink's share put back" in err, err


def test_an_uplink_that_is_not_there_fails_the_job_in_one_line(
    clean_world: World, tmp_path: Path
) -> None:
    proc, _ = run_job(
        clean_world, tmp_path, "true", LARKNS_UPLINK_BANDWIDTH="40mbit", LARKNS_UPLINK="lktnosuch"
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "LARKNS_UPLINK: no link 'lktnosuch'" in lines[0], proc.stderr
