"""What a `larkns run` command may do outside its own network: nothing, by
default (real kernel, simulated worker).  Each test performs the attack."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from larkns import run
from tests.test_run import run_job
from tests.world import PEER, PORT, SITE4, World, sh

PY = sys.executable


def _caps(status: str, field: str) -> int:
    (line,) = [x for x in status.splitlines() if x.startswith(field + ":")]
    return int(line.split()[1], 16)


def test_by_default_the_command_cannot_enter_the_workers_network_nor_reset_its_counters(
    clean_world: World, tmp_path: Path
) -> None:
    # The worker's network holds the job's counters (nft) and the host end
    # of its link.  Through the keeper ($PPID, in the worker's network), the
    # worker's namespace file, and the host's (pid 1).
    worker = f"/run/netns/{clean_world.worker}"
    script = (
        "nsenter --net=/proc/$PPID/ns/net nft flush ruleset; echo ppid=$?; "
        f"nsenter --net={worker} nft reset counters; echo file=$?; "
        "nsenter --net=/proc/1/ns/net nft list tables; echo host=$?; "
        f"{PY} -c 'import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f'sys.exit(libc.setns(os.open("{worker}", os.O_RDONLY), 0) != 0)\'; echo setns=$?; '
        f"{PY} {PEER} udp {SITE4} {PORT} 2 100 50 >/dev/null"
    )
    proc, rep = run_job(clean_world, tmp_path, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ppid=1", "file=1", "host=1", "setns=1"], proc.stdout
    # The job's counters were neither flushed nor reset: they counted it all.
    assert rep["families"]["ipv4"]["bytes"]["outgoing"] == 2 * (28 + 100)  # type: ignore[index]


def test_by_default_the_command_cannot_put_a_link_into_the_workers_network(
    clean_world: World, tmp_path: Path
) -> None:
    # CAP_NET_ADMIN reaches past the job's own network: "netns PID" puts a
    # link into PID's.  The keeper ($PPID) lives in the worker's.
    peer = f"{clean_world.prefix}p"
    script = f"ip link add {clean_world.prefix}v type veth peer name {peer} netns $PPID"
    proc, _ = run_job(clean_world, tmp_path, "sh", "-c", script)
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stderr
    assert peer not in sh("ip", "-o", "link", ns=clean_world.worker).stdout


def test_with_privileged_the_command_is_full_root_and_can_leave_its_network(
    clean_world: World, tmp_path: Path
) -> None:
    worker = f"/run/netns/{clean_world.worker}"
    proc, _ = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        f"nsenter --net={worker} nft list tables && ip addr add 198.18.77.1/32 dev lo",
        extra=("--privileged",),
    )
    assert proc.returncode == 0, proc.stderr
    assert "table inet larkns" in proc.stdout


def test_by_default_root_keeps_what_acts_in_its_own_network_and_files(
    clean_world: World, tmp_path: Path
) -> None:
    script = (
        f"ping -c 1 -W 5 {SITE4} >/dev/null && echo ping=ok; "
        f"{PY} -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1); "
        'socket.socket(socket.AF_INET6, socket.SOCK_STREAM).bind(("::", 80)); print("raw=ok")\'; '
        "ip addr add 198.18.77.1/32 dev lo 2>/dev/null || echo addr=refused; "
        "unshare --mount true 2>/dev/null || echo unshare=refused; "
        "cat /proc/self/status"
    )
    proc, _ = run_job(clean_world, tmp_path, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for said in ("ping=ok", "raw=ok", "addr=refused", "unshare=refused"):
        assert said in out, out
    assert "Uid:\t0\t0\t0\t0" in out
    keep = sum(1 << c for c in run.JOB_CAPS)
    assert _caps(out, "CapBnd") == keep and _caps(out, "CapEff") == keep
    assert _caps(out, "CapInh") == 0 and _caps(out, "CapAmb") == 0


def test_with_user_the_command_has_no_capability_and_setuid_programs_stay_bounded(
    clean_world: World, tmp_path: Path
) -> None:
    proc, _ = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        "id -u; cat /proc/self/status",
        extra=("--user", "nobody"),
        # nobody may not enter the checkout, wherever it is (a 0700 parent).
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "65534"
    assert _caps(proc.stdout, "CapEff") == 0 and _caps(proc.stdout, "CapPrm") == 0
    assert _caps(proc.stdout, "CapBnd") == sum(1 << c for c in run.JOB_CAPS)


def _sys_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4].startswith("/sys")]


def test_the_job_sees_its_own_links_in_sys_and_still_its_cgroup(
    clean_world: World, tmp_path: Path
) -> None:
    before = _sys_mounts()
    proc, _ = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        "ls /sys/class/net; echo --; ls /sys/fs/cgroup | head -3",
    )
    assert proc.returncode == 0, proc.stderr
    links, cgroup = proc.stdout.split("--\n")
    assert links.split() == ["eth0", "lo"]
    assert cgroup.split(), "the cgroup tree is carried over"
    # Nothing of it reached the mount namespace larkns ran in.
    assert _sys_mounts() == before
    proc, _ = run_job(
        clean_world, tmp_path, "ls", "/sys/class/net", extra=("--mode", "none", "--privileged")
    )
    assert proc.stdout.split() == ["lo"]


def test_a_jobs_mount_namespace_holds_no_network_namespace_of_other_jobs(
    clean_world: World,
) -> None:
    # /run/netns is shared (as iproute2 makes it): a job's mount namespace,
    # copied from the worker's, would get every later job's namespace
    # mounted into it too (N squared mounts with N jobs), and keep the
    # netns of a job that ended alive were it made private.
    jobs = []
    try:
        for i in range(3):
            p = clean_world.larkns_popen(
                "run", "--name", f"{clean_world.prefix[3:]}m{i}", "--",
                "sh", "-c", "echo $$; cat >/dev/null", stdin=True,
            )  # fmt: skip
            assert p.stdout is not None
            jobs.append((p, int(p.stdout.readline())))
        for _, pid in jobs:
            mounts = [
                ln.split()[4] for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            ]
            assert not [m for m in mounts if m.startswith("/run/netns")], mounts
        # The worker's own /run/netns is whole.
        assert len(netns_mounts := [
            ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if f"/run/netns/{clean_world.netns_prefix}" in ln
        ]) == 3, netns_mounts  # fmt: skip
    finally:
        for p, _ in jobs:
            p.communicate("", timeout=30)
    assert all(p.returncode == 0 for p, _ in jobs)


def _world_writable(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    return d


def test_a_fifo_planted_at_the_report_path_is_refused_at_once(
    clean_world: World, tmp_path: Path
) -> None:
    path = _world_writable(tmp_path) / "report.json"
    os.mkfifo(path)
    marker = tmp_path / "ran"
    proc = clean_world.larkns(
        "run", "--json-report", str(path), "--", "touch", str(marker), timeout=20
    )
    assert proc.returncode == 125
    assert proc.stderr.strip() == f"larkns: error: --json-report: refusing to write {path}: a FIFO"
    assert stat.S_ISFIFO(path.lstat().st_mode) and not marker.exists()


def test_a_symlink_or_hard_link_planted_at_the_report_path_is_refused(
    clean_world: World, tmp_path: Path
) -> None:
    secret = tmp_path / "root-only"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    shared = _world_writable(tmp_path)
    link = shared / "report.json"
    link.symlink_to(secret)
    proc = clean_world.larkns("run", "--json-report", str(link), "--", "true", timeout=20)
    assert proc.returncode == 125
    assert proc.stderr.strip().endswith(f"refusing to write {link}: a symlink"), proc.stderr
    hard = shared / "hard.json"
    os.link(secret, hard)
    proc = clean_world.larkns("run", "--json-report", str(hard), "--", "true", timeout=20)
    assert proc.returncode == 125 and "a file with other names" in proc.stderr, proc.stderr
    assert secret.read_text() == "secret\n"
    # A plain file there is the report's.
    plain = shared / "plain.json"
    plain.write_text("old")
    proc = clean_world.larkns("run", "--json-report", str(plain), "--", "true", timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(plain.read_text())["exit_code"] == 0
