"""A flush of the worker's ruleset (nft flush ruleset, a firewall reload)
while a job runs: larkns puts back the job's counters, NAT, guard and
policy at once, and its counters go on from their last reading."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from larkns import watch
from tests.world import PEER, PORT, SITE4, World, sh

PY = sys.executable


def table_back(
    world: World, name: str, within: float, knobs: dict[str, str] | None = None
) -> float:
    """Seconds until the job's objects are whole again (check passes)."""
    t0 = time.monotonic()
    while True:
        if world.larkns("check", name, knobs=knobs).returncode == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            raise AssertionError(f"job {name} not put back within {within} s")
        time.sleep(0.02)


def stop_if_running(
    job: subprocess.Popen[str], world: World, knobs: dict[str, str] | None = None
) -> None:
    """A job a failed test left running: killed, and what it had removed."""
    if job.poll() is None:
        job.kill()
        job.wait()
        world.larkns("gc", knobs=knobs)


def test_a_flushed_job_is_put_back_at_once_and_its_counters_go_on(
    clean_world: World, tmp_path: Path
) -> None:
    world = clean_world
    report = tmp_path / "report.json"
    burst = f"{PY} {PEER} udp {SITE4} {PORT} 20 100 100"
    job = world.larkns_popen(
        "run", "--name", "lktfl", "--policy", "open", "--json-report", str(report), "--",
        "sh", "-c", f"{burst} && echo ready && read go && {burst}",
        stdin=True,
    )  # fmt: skip
    assert job.stdout is not None and job.stdin is not None
    try:
        first = json.loads(job.stdout.readline())
        assert first["received"] == 20
        assert job.stdout.readline().strip() == "ready"
        # The watcher reads the job's counters every second.
        time.sleep(watch.SAMPLE_INTERVAL * 1.5)
        shown = json.loads(world.larkns("show", "lktfl").stdout)
        before = shown["counters"]["ipv4"]["out"]
        assert before["packets"] == 20, before
        sh("nft", "flush", "ruleset", ns=world.worker)
        # Gone with the flush, and back within a second (the check below
        # runs in a process of its own, ~0.1 s to start: it may find it back).
        assert table_back(world, "lktfl", within=1.0) < 1.0
        after = json.loads(world.larkns("show", "lktfl").stdout)["counters"]["ipv4"]["out"]
        assert after == before  # going on from where they were, never lower
        # NAT, forwarding and the guard work again: the second burst is answered.
        job.stdin.write("go\n")
        job.stdin.flush()
        second = json.loads(job.stdout.readline())
        assert second["received"] == 20
        _, err = job.communicate(timeout=30)
    finally:
        stop_if_running(job, world)
    assert job.returncode == 0, err
    assert "larkns: job lktfl: put back" in err, err
    rep = json.loads(report.read_text())
    assert rep["families"]["ipv4"]["packets"]["outgoing"] == 40, rep["families"]
    assert 0 < rep["uncounted_s"] < 3, rep["uncounted_s"]


def test_a_message_of_a_deleted_table_is_read_for_its_name() -> None:
    """The kernel's NFT_MSG_DELTABLE, as the watcher parses it."""
    import struct

    from larkns.kernel import netlink

    name = b"larkns\0"
    attr = struct.pack("=HH", 4 + len(name), watch.NFTA_TABLE_NAME) + name
    attr += b"\0" * ((4 - len(attr) % 4) % 4)
    body = struct.pack("=BBH", 1, 0, 0) + attr
    mtype = (watch.NFNL_SUBSYS_NFTABLES << 8) | watch.NFT_MSG_DELTABLE
    msg = netlink.HDR.pack(netlink.HDR.size + len(body), mtype, 0, 1, 0) + body
    other = netlink.HDR.pack(netlink.HDR.size + 4, mtype - 1, 0, 2, 0) + b"\0" * 4
    assert watch.deleted_tables(msg + other) == ["larkns"]
    assert watch.deleted_tables(other) == []


def test_a_flushed_job_keeps_its_policy(clean_world: World) -> None:
    """The policy's chain and sets are put back with the job: what it
    refused before the flush it refuses after."""
    from tests.test_policy import EXTERNAL4, KNOBS

    world = clean_world
    sh("ip", "addr", "replace", f"{EXTERNAL4}/32", "dev", "lo", ns=world.site)
    probe = f"{PY} {PEER} tcp {EXTERNAL4} {PORT}"
    job = world.larkns_popen(
        "run", "--name", "lktflp", "--policy", "open -license", "--",
        "sh", "-c", f"{probe}; echo ready; read go; {probe}",
        stdin=True, knobs=KNOBS,
    )  # fmt: skip
    assert job.stdout is not None and job.stdin is not None
    try:
        assert job.stdout.readline().strip() == "ready"  # refused: nothing printed
        time.sleep(watch.SAMPLE_INTERVAL * 1.5)  # its refusal read before the flush
        sh("nft", "flush", "ruleset", ns=world.worker)
        assert table_back(world, "lktflp", within=1.0) < 1.0
        job.stdin.write("go\n")
        job.stdin.flush()
        out, err = job.communicate(timeout=30)
    finally:
        stop_if_running(job, world)
        sh("ip", "addr", "del", f"{EXTERNAL4}/32", "dev", "lo", ns=world.site, check=False)
    assert out.strip() == "", out  # the second connect was refused as well
    assert err.count("ConnectionRefusedError") == 2, err
    assert "refused 2 pkts" in err, err


def test_larknsd_puts_back_its_jobs_after_a_flush(clean_world: World, tmp_path: Path) -> None:
    """Under larknsd (the wrapper's jobs): the same, and the job's ad would
    say how long its traffic may be uncounted."""
    from tests.test_daemon import Larknsd, _launched, _show, json_jobs

    world = clean_world
    go = tmp_path / "go"
    d = Larknsd(world)
    try:
        p = d.job_popen(
            "/bin/sh",
            "-c",
            f"ping -q -c 2 -i 0.2 {SITE4} >/dev/null; echo started;"
            f" while [ ! -e {go} ]; do sleep 0.05; done;"
            f" ping -q -c 1 -W 2 {SITE4} >/dev/null",
        )
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "started"
        _launched(p)
        (name,) = [n[: -len(".json")] for n in json_jobs(world) if n.endswith(".json")]
        time.sleep(watch.SAMPLE_INTERVAL * 1.5)
        before = _show(world, name)["counters"]["ipv4"]
        sh("nft", "flush", "ruleset", ns=world.worker)
        assert table_back(world, name, within=1.0) < 1.0
        assert _show(world, name)["counters"]["ipv4"] == before
        go.touch()
        _out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err  # the last ping was answered: NAT is back
    finally:
        said = d.stop()
    assert d.proc.returncode == 0 and "Traceback" not in said, said
    assert f"larknsd: job {name}: put back" in said, said
