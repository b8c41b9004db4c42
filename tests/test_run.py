"""`larkns run` end to end, in a simulated worker node and site (real kernel)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from larkns import cli
from tests.world import PEER, PORT, SITE4, SITE6, WORKER4, WORKER6, World, sh

PY = sys.executable


def run_job(
    world: World,
    tmp_path: Path,
    *cmd: str,
    name: str | None = None,
    extra: tuple[str, ...] = (),
    cwd: str | None = None,
    **knobs: str,
) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)  # an earlier run's, in the same tmp_path
    args = ["run", "--json-report", str(report), *extra]
    if name:
        args += ["--name", name]
    proc = world.larkns(*args, "--", *cmd, cwd=cwd, knobs=knobs)
    text = report.read_text() if report.exists() else ""
    data = json.loads(text) if text else {}
    return proc, data


def _strs(d: dict[str, object]) -> dict[str, str]:
    return {k: str(v) for k, v in d.items()}


def lines_json(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_job_reaches_the_site_over_both_families_and_the_site_sees_the_worker(
    clean_world: World, tmp_path: Path
) -> None:
    proc, rep = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        f"{PY} {PEER} tcp {SITE4} {PORT} && {PY} {PEER} tcp {SITE6} {PORT}",
    )
    assert proc.returncode == 0, proc.stderr
    v4, v6 = (_strs(d) for d in lines_json(proc.stdout))
    assert v4["seen_as"] == WORKER4  # NAT44: the site sees the worker, not the job
    assert v6["seen_as"] == WORKER6  # NAT66 likewise
    assert ipaddress.ip_address(v4["local"]) in ipaddress.ip_network(clean_world.ipv4_pool)
    assert ipaddress.ip_address(v6["local"]) in ipaddress.ip_network(clean_world.ipv6_prefix)
    assert rep["addresses"]["ipv4"] == v4["local"]  # type: ignore[index]
    assert v6["local"] in rep["addresses"]["ipv6"]  # type: ignore[index]
    assert rep["exit_code"] == 0 and rep["mode"] == "nat"


def test_the_jobs_ipv6_address_and_route_come_from_larkns_router_advertisement(
    clean_world: World, tmp_path: Path
) -> None:
    proc, rep = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        "ip -6 -o addr show dev eth0 scope global; ip -6 route show default",
    )
    assert proc.returncode == 0, proc.stderr
    addr_line, route_line = proc.stdout.strip().splitlines()
    # "dynamic" = a lifetime from a prefix option; "proto ra" = the route came from an RA.
    assert "dynamic" in addr_line
    assert "proto ra" in route_line and "via fe80::" in route_line
    addr = ipaddress.ip_interface(addr_line.split()[3])
    assert addr.network.prefixlen == 64
    assert addr.network.subnet_of(ipaddress.ip_network(clean_world.ipv6_prefix))  # type: ignore[arg-type]
    # larkns waited for it: usable before the command started (the time it
    # takes is measured in bench/ and tests/test_ra.py, not asserted here)
    assert rep["slaac_s"] is not None


def test_counters_equal_the_bytes_the_job_sent_and_received(
    clean_world: World, tmp_path: Path
) -> None:
    n4, size4, reply4 = 20, 1000, 500
    n6, size6, reply6 = 10, 700, 1200
    proc, rep = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        f"{PY} {PEER} udp {SITE4} {PORT} {n4} {size4} {reply4} && "
        f"{PY} {PEER} udp {SITE6} {PORT} {n6} {size6} {reply6}",
    )
    assert proc.returncode == 0, proc.stderr
    fam = rep["families"]
    # L3 bytes: IPv4 header 20 + UDP 8; IPv6 header 40 + UDP 8.
    assert fam["ipv4"]["bytes"] == {"outgoing": n4 * (28 + size4), "incoming": n4 * (28 + reply4)}  # type: ignore[index]
    assert fam["ipv4"]["packets"] == {"outgoing": n4, "incoming": n4}  # type: ignore[index]
    assert fam["ipv6"]["bytes"] == {"outgoing": n6 * (48 + size6), "incoming": n6 * (48 + reply6)}  # type: ignore[index]
    assert fam["ipv6"]["packets"] == {"outgoing": n6, "incoming": n6}  # type: ignore[index]
    assert rep["bytes"] == {
        "outgoing": n4 * (28 + size4) + n6 * (48 + size6),
        "incoming": n4 * (28 + reply4) + n6 * (48 + reply6),
    }
    # Neighbour and router discovery happened, and was kept apart.
    assert rep["link_control"]["packets"]["incoming"] > 0  # type: ignore[index]
    assert "ipv4" in proc.stderr and "addresses" in proc.stderr  # the human summary


@pytest.mark.parametrize(
    ("script", "status", "code", "sig"),
    [
        ("exit 0", 0, 0, None),
        ("exit 3", 3, 3, None),
        ("kill -TERM $$", 143, None, 15),
        ("kill -KILL $$", 137, None, 9),
    ],
)
def test_exit_status_and_signals_pass_through(
    clean_world: World, tmp_path: Path, script: str, status: int, code: int | None, sig: int | None
) -> None:
    proc, rep = run_job(clean_world, tmp_path, "sh", "-c", script)
    assert proc.returncode == status, proc.stderr
    assert rep["exit_code"] == code and rep["signal"] == sig and rep["exit_status"] == status


def test_a_missing_command_exits_127_and_a_non_executable_one_126(
    clean_world: World, tmp_path: Path
) -> None:
    proc, rep = run_job(clean_world, tmp_path, "/nonexistent/lkt-cmd")
    assert proc.returncode == 127
    assert "not found" in proc.stderr
    script = tmp_path / "lkt-not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    proc, rep = run_job(clean_world, tmp_path, str(script))
    assert proc.returncode == 126
    assert rep["exit_status"] == 126


def test_a_signal_to_larkns_reaches_the_command(clean_world: World, tmp_path: Path) -> None:
    p = clean_world.larkns_popen("run", "--name", "lktsig", "--", "sleep", "30")
    try:
        _wait_state(clean_world, "lktsig", "running")
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=10)
        assert p.returncode == 128 + signal.SIGTERM, err
        assert "killed by SIGTERM" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_the_job_runs_as_the_user_given(clean_world: World, tmp_path: Path) -> None:
    proc, _ = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        "id -u; grep CapEff /proc/self/status",
        extra=("--user", "nobody"),
        cwd="/",  # the job starts in larkns's cwd, which nobody may not enter
    )
    assert proc.returncode == 0, proc.stderr
    uid, cap = proc.stdout.strip().splitlines()
    assert uid == "65534"
    assert cap.split()[1] == "0000000000000000"


def test_mode_none_has_loopback_only_and_no_route_out(clean_world: World, tmp_path: Path) -> None:
    proc, rep = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        f"ip -o link; ip route; ip -6 route; {PY} {PEER} tcp {SITE4} {PORT}",
        extra=("--mode", "none"),
    )
    assert proc.returncode != 0
    links = [line for line in proc.stdout.splitlines() if ": " in line]
    assert len(links) == 1 and ": lo:" in links[0]
    assert "unreachable" in proc.stderr.lower()
    assert rep["mode"] == "none" and rep["addresses"] == {"ipv4": None, "ipv6": []}


def test_while_a_job_runs_its_objects_exist_and_are_listed(
    clean_world: World, tmp_path: Path
) -> None:
    p = clean_world.larkns_popen("run", "--name", "lktlive", "--", "sleep", "30")
    try:
        _wait_state(clean_world, "lktlive", "running")
        assert f"{clean_world.netns_prefix}lktlive" in sh("ip", "netns", "list").stdout
        assert "lk-lktlive" in sh("ip", "-o", "link", ns=clean_world.worker).stdout
        rules = sh("nft", "list", "table", "inet", "larkns", ns=clean_world.worker).stdout
        assert "counter lktlive-out4" in rules and '"lk-lktlive" : "lktlive-out4"' in rules
        listing = clean_world.larkns("list")
        assert "lktlive" in listing.stdout and "running" in listing.stdout
        shown = json.loads(clean_world.larkns("show", "lktlive").stdout)
        assert shown["problems"] == [] and shown["plan"]["host_link"] == "lk-lktlive"
        assert clean_world.larkns("check", "lktlive").returncode == 0
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)


def _wait_state(world: World, name: str, state: str, timeout: float = 10) -> dict[str, object]:
    path = world.state_dir / "jobs" / f"{name}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rec = json.loads(path.read_text())
            if rec["state"] == state:
                return rec  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"job {name} never reached state {state}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before or while reading
        return False


def test_sigkill_while_the_command_runs_then_gc_leaves_nothing(
    clean_world: World, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    p = clean_world.larkns_popen(
        "run",
        "--name",
        "lktkill",
        "--",
        "sh",
        "-c",
        f"sleep 300 & echo $! > {pids}; echo $$ >> {pids}; wait",
    )
    _wait_state(clean_world, "lktkill", "running")
    deadline = time.monotonic() + 5
    while len(pids.read_text().split()) < 2 if pids.exists() else True:
        got = pids.read_text() if pids.exists() else "(no file)"
        assert time.monotonic() < deadline, f"the command never wrote its pids: {got!r}"
        time.sleep(0.01)
    background, shell = (int(x) for x in pids.read_text().split())
    p.kill()
    # not communicate(): the job's processes hold larkns's stdout until gc
    p.wait()
    # The command itself dies with larkns (parent-death signal) ...
    deadline = time.monotonic() + 5
    while _alive(shell):
        assert time.monotonic() < deadline, "the command outlived larkns"
        time.sleep(0.01)
    # ... and gc finds the rest through the journal: processes, netns, link, rules.
    gc = clean_world.larkns("gc")
    assert gc.returncode == 0, gc.stderr
    assert "job lktkill" in gc.stdout
    assert not _alive(background)
    for f in (p.stdout, p.stderr):
        assert f is not None
        f.close()


def test_a_command_that_execs_a_file_capability_program_dies_with_larkns(
    clean_world: World,
) -> None:
    """ping has cap_net_raw: exec'ing it clears a parent-death signal, so only
    the keeper's watch on larkns can kill it."""
    if not os.path.exists("/usr/bin/ping"):
        pytest.skip("no /usr/bin/ping")
    # cwd "/": nobody may not enter the checkout (a clone in a 0700 directory).
    p = clean_world.larkns_popen(
        "run", "--name", "lktcap", "--user", "nobody", "--", "ping", "-q", "-i", "0.2", SITE4,
        cwd="/",
    )  # fmt: skip
    _wait_state(clean_world, "lktcap", "running")
    show = json.loads(clean_world.larkns("show", "lktcap").stdout)
    job = show["job"]["pid"]
    assert Path(f"/proc/{job}/comm").read_text().strip() == "ping"
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while _alive(job):
        assert time.monotonic() < deadline, "ping outlived larkns"
        time.sleep(0.01)
    gc = clean_world.larkns("gc")
    assert gc.returncode == 0 and "job lktcap" in gc.stdout, gc.stderr
    for f in (p.stdout, p.stderr):
        assert f is not None
        f.close()


def test_sigkill_at_any_moment_of_setup_then_gc_leaves_nothing(
    clean_world: World, tmp_path: Path
) -> None:
    # Setup takes ~10-20 ms from the moment the job's record appears: kill
    # larkns at a spread of instants after that, and once before it.  Whatever
    # it had built by then, gc must remove.
    delays = [None, 0, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.012, 0.015]
    states = []
    for i, delay in enumerate(delays):
        name = f"lktk{i}"
        record = clean_world.state_dir / "jobs" / f"{name}.json"
        p = clean_world.larkns_popen("run", "--name", name, "--", "sleep", "5")
        if delay is not None:
            while not record.exists():
                assert p.poll() is None, p.communicate()
                time.sleep(0.0002)
            time.sleep(delay)
        p.kill()
        p.wait()
        try:
            states.append(json.loads(record.read_text())["state"])
        except (FileNotFoundError, ValueError):
            states.append("none")
        gc = clean_world.larkns("gc")
        assert gc.returncode == 0, gc.stderr
        left = clean_world.wait_no_leftovers()
        assert not left, f"after a kill in state {states[-1]}: {left}"
        for f in (p.stdout, p.stderr):
            assert f is not None
            f.close()
    # The kills did land inside setup, not only before or after it.
    assert {"claimed", "building", "ready"} & set(states), states


def test_bad_input_is_one_line_exit_125_and_builds_nothing(
    clean_world: World, tmp_path: Path
) -> None:
    cases = [
        (("run", "--mode", "bridgy", "--", "true"), "--mode"),
        (("run", "--name", "bad/name", "--", "true"), "--name"),
        (("run", "--ipv4-pool", "198.18.0.0/31", "--", "true"), "--ipv4-pool"),
        (("run", "--ipv6-prefix", "fd00::/64", "--", "true"), "--ipv6-prefix"),
        (("run", "--user", "lkt-no-such-user", "--", "true"), "--user"),
        (("run",), "no command"),
        (("run", "--name", "lkt\n", "--", "true"), "--name"),
        (("run", "--name", "", "--", "true"), "--name"),
        (("show", "../jobs/x"), "NAME"),
        (("run", "--json-report", "/nonexistent/lkt/report.json", "--", "true"), "--json-report"),
        (("frobnicate",), "invalid choice"),
    ]
    for args, word in cases:
        proc = clean_world.larkns(*args)
        assert proc.returncode == 125, (args, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and word in err[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_a_duplicate_name_and_an_exhausted_pool_are_refused(
    clean_world: World, tmp_path: Path
) -> None:
    env_pool = ("--ipv4-pool", "198.19.1.0/30")  # two /31s: two jobs
    a = clean_world.larkns_popen("run", *env_pool, "--name", "lkta", "--", "sleep", "30")
    b = clean_world.larkns_popen("run", *env_pool, "--name", "lktb", "--", "sleep", "30")
    try:
        _wait_state(clean_world, "lkta", "running")
        _wait_state(clean_world, "lktb", "running")
        dup = clean_world.larkns("run", *env_pool, "--name", "lkta", "--", "true")
        assert dup.returncode == 125 and "in use" in dup.stderr
        full = clean_world.larkns("run", *env_pool, "--name", "lktc", "--", "true")
        assert full.returncode == 125 and "exhausted" in full.stderr
        assert len(full.stderr.strip().splitlines()) == 1
        assert "lktc" not in clean_world.larkns("list").stdout
    finally:
        for p in (a, b):
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=10)


def test_not_root_and_missing_nftables_are_refused(
    clean_world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In-process, as a user would see it from the command line (the code
    # tree may not be readable by an unprivileged user in every checkout).
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    assert cli.main(["run", "--", "true"]) == 125
    err = capsys.readouterr().err
    assert "must run as root" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "nftables.py").write_text("raise ImportError('lkt: no nftables here')\n")
    env = clean_world.env() | {"PYTHONPATH": str(shadow)}
    proc = subprocess.run(
        clean_world.worker_cmd(sys.executable, "-m", "larkns.cli", "run", "--", "true"),
        capture_output=True,
        text=True,
        env=env,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 125, proc.stderr
    assert "nftables" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_jobs_started_back_to_back_with_one_name_both_run(
    clean_world: World, tmp_path: Path
) -> None:
    # The first job's link (and its index) may still be going away when the
    # second one is built: no waiting in between.
    for _ in range(3):
        proc = clean_world.larkns("run", "--name", "lktbb", "--", "true")
        assert proc.returncode == 0, proc.stderr


def test_two_jobs_starting_at_once_on_an_idle_node_count_once(
    clean_world: World, tmp_path: Path
) -> None:
    procs = [
        clean_world.larkns_popen("run", "--name", f"lktc{i}", "--", "sleep", "2") for i in range(2)
    ]
    try:
        for i in range(2):
            _wait_state(clean_world, f"lktc{i}", "running")
        forward = sh(
            "nft", "list", "chain", "inet", "larkns", "forward", ns=clean_world.worker
        ).stdout
        # declared once: 5 link-control rules, 4 per-family counters
        assert forward.count("goto control_") == 5, forward
        assert forward.count("counter name") == 4, forward
    finally:
        for p in procs:
            p.communicate(timeout=10)
            assert p.returncode == 0


def test_sigint_from_another_process_reaches_the_command(
    clean_world: World, tmp_path: Path
) -> None:
    p = clean_world.larkns_popen("run", "--name", "lktint", "--", "sleep", "30")
    _wait_state(clean_world, "lktint", "running")
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=10)
    assert p.returncode == 128 + signal.SIGINT, err
    assert "killed by SIGINT" in err


def test_a_real_time_signal_is_reported_by_number(clean_world: World, tmp_path: Path) -> None:
    rt = signal.SIGRTMIN + 1
    proc, rep = run_job(clean_world, tmp_path, PY, "-c", f"import os; os.kill(os.getpid(), {rt})")
    assert proc.returncode == 128 + rt, proc.stderr
    assert rep["signal"] == rt and rep["signal_name"] == "SIGRTMIN+1"


@pytest.mark.parametrize("sig", [signal.SIGWINCH, signal.SIGTERM])
def test_a_signal_while_the_network_is_built_is_handled_and_leaves_nothing(
    clean_world: World, tmp_path: Path, sig: int
) -> None:
    # Sent as soon as the job's record appears, i.e. while larkns builds the
    # network (or, if it is quicker, just after the command started).
    record = clean_world.state_dir / "jobs" / "lktsb.json"
    p = clean_world.larkns_popen("run", "--name", "lktsb", "--", "sleep", "0.5")
    while not record.exists():
        assert p.poll() is None
        time.sleep(0.0002)
    p.send_signal(sig)
    _out, err = p.communicate(timeout=10)
    if sig == signal.SIGWINCH:
        assert p.returncode == 0, err  # a window resize does not end a job
    else:
        assert p.returncode == 128 + sig, err


def test_teardown_of_an_unknown_job_succeeds(clean_world: World) -> None:
    proc = clean_world.larkns("teardown", "lktnothere")
    assert proc.returncode == 0 and "nothing to remove" in proc.stderr


def test_a_bad_report_path_is_refused_before_the_command_runs(
    clean_world: World, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    proc = clean_world.larkns(
        "run",
        "--json-report",
        str(tmp_path / "no" / "such" / "dir.json"),
        "--",
        "touch",
        str(marker),
    )
    assert proc.returncode == 125 and "--json-report" in proc.stderr
    assert not marker.exists()
    link = tmp_path / "report-link.json"
    link.symlink_to(tmp_path / "target.json")
    proc = clean_world.larkns("run", "--json-report", str(link), "--", "true")
    assert proc.returncode == 125  # never written through a symlink
    assert not (tmp_path / "target.json").exists()


def test_traffic_is_counted_per_admin_defined_class(clean_world: World, tmp_path: Path) -> None:
    classes = "Site = 198.18.0.0/24, 2001:db8:0:1::/64; Elsewhere = 198.19.255.0/24"
    n, size, reply = 10, 500, 300
    proc, rep = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        f"{PY} {PEER} udp {SITE4} {PORT} {n} {size} {reply} && "
        f"{PY} {PEER} udp {SITE6} {PORT} {n} {size} {reply}",
        LARKNS_CLASSES=classes,
    )
    assert proc.returncode == 0, proc.stderr
    site = rep["classes"]["Site"]  # type: ignore[index]
    assert site["bytes"] == {
        "outgoing": n * (28 + size) + n * (48 + size),
        "incoming": n * (28 + reply) + n * (48 + reply),
    }
    assert site["bytes"] == rep["bytes"]  # all of it went to the site
    assert rep["classes"]["Elsewhere"]["bytes"] == {"outgoing": 0, "incoming": 0}  # type: ignore[index]
