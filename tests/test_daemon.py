"""larknsd and the job wrapper, without HTCondor (real kernel, simulated worker)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from larkns.daemon import protocol
from tests.jobside import entries, wrapper_copy, wrapper_script
from tests.world import SITE4, World, sh


class Larknsd:
    """larknsd in the world's worker namespace, with the job-side programs
    (`wrapper`) against it, its knobs from the environment; or, made with
    `under_condor`, from an HTCondor configuration alone."""

    def __init__(self, world: World, **knobs: str) -> None:
        socket_path = f"/tmp/{world.prefix}-larknsd.sock"
        env = world.env() | {"LARKNS_SOCKET": socket_path} | knobs
        self._init(world, env, wrapper_copy())

    @classmethod
    def under_condor(cls, world: World, condor_config: Path, copy: Path) -> Larknsd:
        """larknsd as condor_master or systemd starts it: CONDOR_CONFIG and no
        LARKNS_* knob in its environment; the job-side programs in `copy`, as
        larkns-condor-config installed them."""
        self = cls.__new__(cls)
        clean = {k: v for k, v in world.env().items() if not k.startswith("LARKNS_")}
        self._init(world, clean | {"CONDOR_CONFIG": str(condor_config)}, copy)
        return self

    def _init(self, world: World, env: dict[str, str], copy: Path) -> None:
        self.world = world
        self.socket = f"/tmp/{world.prefix}-larknsd.sock"
        self.env = env
        self.copy = copy
        self.wrapper = wrapper_script(self.copy, self.socket)
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.world.worker_cmd(str(Path(sys.executable).parent / "larknsd")),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready" not in line:
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"larknsd did not start: {line} {err}")
        return proc

    def down(self, sig: int = signal.SIGKILL) -> str:
        """Stop larknsd with `sig`, its jobs running on; what it said."""
        self.proc.send_signal(sig)
        _out, err = self.proc.communicate(timeout=20)
        return err

    def up(self) -> None:
        """A new larknsd on the same socket (it takes the jobs over)."""
        self.proc = self._start()

    def restart(self, sig: int = signal.SIGKILL) -> str:
        """Stop larknsd with `sig` and start it anew; what the old one said."""
        err = self.down(sig)
        self.up()
        return err

    def close(self) -> str:
        """Stop larknsd if it runs (a test may have left it down); what it said."""
        if self.proc.poll() is None:
            return self.stop()
        shutil.rmtree(self.copy, ignore_errors=True)
        return ""

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=20)
        shutil.rmtree(self.copy, ignore_errors=True)
        return err

    def job(self, *cmd: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """The wrapper started as HTCondor would, in the worker (as root, or as `user`)."""
        prefix = self.world.worker_cmd()
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return subprocess.run(
            [*prefix, str(self.wrapper), *cmd], capture_output=True, text=True, cwd="/", timeout=30
        )

    def job_popen(self, *cmd: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.world.worker_cmd(), str(self.wrapper), *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )


@contextlib.contextmanager
def serving(world: World, **knobs: str) -> Iterator[Larknsd]:
    """larknsd for the while: it must then stop cleanly, having said no
    traceback."""
    d = Larknsd(world, **knobs)
    try:
        yield d
    finally:
        err = d.stop()
        assert d.proc.returncode == 0, err
        assert "Traceback" not in err, err


@pytest.fixture()
def larknsd(clean_world: World) -> Iterator[Larknsd]:
    with serving(clean_world) as d:
        yield d


def test_the_job_runs_in_its_own_network_and_keeps_its_exit_code(
    larknsd: Larknsd, clean_world: World
) -> None:
    worker_ns = sh("readlink", "/proc/self/ns/net", ns=clean_world.worker).stdout.strip()
    proc = larknsd.job(
        "/bin/sh", "-c", "readlink /proc/self/ns/net; ip -o link | cut -d: -f2; exit 3"
    )
    assert proc.returncode == 3, proc.stderr
    ns, *links = proc.stdout.split("\n")
    assert ns != worker_ns
    names = [x.strip().split("@")[0] for x in links if x.strip()]
    assert names == ["lo", "eth0"]  # not the worker's links


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGKILL])
def test_the_wrapper_dies_of_the_signal_that_killed_the_job(larknsd: Larknsd, sig: int) -> None:
    proc = larknsd.job("/bin/sh", "-c", f"kill -{sig} $$")
    assert proc.returncode == -sig, proc.stderr


def test_a_signal_to_the_wrapper_reaches_the_job(larknsd: Larknsd, clean_world: World) -> None:
    p = larknsd.job_popen("/bin/sh", "-c", "echo started; exec sleep 30")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "started"
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=10)
    assert p.returncode == -signal.SIGTERM


def test_when_the_wrapper_dies_the_job_dies_and_its_network_goes(
    larknsd: Larknsd, clean_world: World
) -> None:
    p = larknsd.job_popen("/bin/sh", "-c", "echo $$; exec sleep 300")
    assert p.stdout is not None
    job_pid = int(p.stdout.readline())
    p.kill()
    p.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{job_pid}").exists():
        assert time.monotonic() < deadline, "the job outlived its wrapper"
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    while json_jobs(clean_world):
        assert time.monotonic() < deadline, "the job's network outlived it"
        time.sleep(0.02)


def json_jobs(world: World) -> list[str]:
    d = world.state_dir / "jobs"
    return [p.name for p in d.iterdir()] if d.exists() else []


def test_a_caller_that_is_no_htcondor_job_is_refused(larknsd: Larknsd) -> None:
    proc = larknsd.job("/bin/true", user="65534")
    assert proc.returncode == 125
    assert "not a job of this node's HTCondor starter" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_without_the_daemon_the_job_does_not_run(larknsd: Larknsd, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = entries(larknsd.copy, "/tmp/lkt-no-such.sock", "nosock") / "larkns-wrapper"
    proc = subprocess.run(
        [*larknsd.world.worker_cmd(), str(script), "/bin/touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 125 and "cannot reach larknsd" in proc.stderr
    assert not marker.exists()


def test_a_malformed_request_gets_a_one_line_error(larknsd: Larknsd) -> None:
    code = (
        "import socket,json,sys\n"
        "s=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET); s.connect(sys.argv[1])\n"
        "s.send(json.dumps({'v':1,'op':'launch','argv':'nope'}).encode())\n"
        "print(s.recv(4096).decode())\n"
    )
    proc = subprocess.run(
        [*larknsd.world.worker_cmd(), "/usr/bin/python3", "-c", code, larknsd.socket],
        capture_output=True,
        text=True,
        timeout=30,
    )
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and reply["error"].startswith("argv:")


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("argv", ["/bin/true", "a\0b"], "argv: contains a NUL byte"),
        ("path", "/bin/tr\0ue", "path: contains a NUL byte"),
        ("cwd", "/\0", "cwd: contains a NUL byte"),
        ("env", ["A=b\0c"], "env: contains a NUL byte"),
        ("env", ["=x"], "env: a variable without a name"),
        ("argv", ["/bin/true", "\ud800"], "argv: not encodable as bytes"),
    ],
)
def test_a_launch_that_execve_could_not_take_gets_a_one_line_reason(
    larknsd: Larknsd, field: str, value: object, error: str
) -> None:
    request = {"v": 1, "op": "launch", "argv": ["/bin/true"], "path": "/bin/true", "cwd": "/"}
    request |= {"env": ["PATH=/bin"], field: value}
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET); s.connect(sys.argv[1])\n"
        "socket.send_fds(s, [sys.argv[2].encode()], [0, 1, 2])\n"
        "print(s.recv(4096).decode())\n"
    )
    # With the job's stdio, as the wrapper sends it: the request gets as far
    # as a request can.
    proc = subprocess.run(
        [
            *larknsd.world.worker_cmd(),
            *("/usr/bin/python3", "-c", code, larknsd.socket, json.dumps(request)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and reply["error"] == error, reply
    # (the fixture checks that larknsd logged no traceback)


def test_thirty_two_jobs_start_at_once_without_errors(larknsd: Larknsd) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: larknsd.job("/bin/sh", "-c", f"exit {i % 7}"), range(32)))
    assert [r.returncode for r in results] == [i % 7 for i in range(32)], [
        r.stderr for r in results
    ]


def _show(world: World, name: str) -> dict[str, Any]:
    proc = world.larkns("show", name)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _launched(p: subprocess.Popen[str]) -> None:
    """Wait until the wrapper `p` holds its job's pidfd: larknsd has answered
    its launch (the job may print before that)."""

    def holds_pidfd() -> bool:
        fds = Path(f"/proc/{p.pid}/fd")
        with contextlib.suppress(OSError):
            return any(os.readlink(fd) == "anon_inode:[pidfd]" for fd in fds.iterdir())
        return False

    _wait_for("the wrapper has its job's pidfd", holds_pidfd)


def _wait_for(what: str, cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_restarted_larknsd_takes_over_a_running_job(
    clean_world: World, tmp_path: Path, stop: int
) -> None:
    """The job runs on while no larknsd runs: the same process, the same
    network and counters; signals still reach it; the wrapper attaches to
    the new larknsd and ends as the job does."""
    go = tmp_path / "go"
    d = Larknsd(clean_world)
    try:
        p = d.job_popen(
            "/bin/sh",
            "-c",
            f"trap 'echo usr1' USR1; ping -q -c 2 -i 0.2 {SITE4} >/dev/null; echo $$;"
            f" while [ ! -e {go} ]; do sleep 0.05; done;"
            f" ping -q -c 1 {SITE4} >/dev/null; exit 7",
        )
        assert p.stdout is not None and p.stderr is not None
        job_pid = int(p.stdout.readline())
        _launched(p)
        (name,) = [n[: -len(".json")] for n in json_jobs(clean_world) if n.endswith(".json")]
        before = _show(clean_world, name)
        assert before["counters"]["ipv4"]["out"]["bytes"] >= 2 * 84
        d.down(stop)
        assert "went away; the job runs on" in p.stderr.readline()
        # No larknsd now: the job lives on, and the wrapper passes signals on.
        assert Path(f"/proc/{job_pid}").exists()
        p.send_signal(signal.SIGUSR1)
        assert p.stdout.readline().strip() == "usr1"
        d.up()
        assert "attached to larknsd again" in p.stderr.readline()
        during = _show(clean_world, name)
        # The job's own counters go on from where they were (the link's
        # control traffic grows: the new larknsd advertises its prefix again).
        for fam in ("ipv4", "ipv6"):
            assert during["counters"][fam] == before["counters"][fam]
        assert during["plan"] == before["plan"]
        assert during["owner"]["pid"] == d.proc.pid
        go.touch()
        _out, err = p.communicate(timeout=20)
        assert p.returncode == 7, err
    finally:
        err = d.close()
        assert "Traceback" not in err, err


def test_a_job_that_ends_while_no_larknsd_runs_is_reported_by_the_next(
    clean_world: World,
) -> None:
    d = Larknsd(clean_world)
    try:
        p = d.job_popen("/bin/sh", "-c", "echo $$; exec sleep 300")
        assert p.stdout is not None
        job_pid = int(p.stdout.readline())
        _launched(p)
        d.down()
        os.kill(job_pid, signal.SIGTERM)  # ends the job while no larknsd runs
        _wait_for("the job is gone", lambda: not Path(f"/proc/{job_pid}").exists())
        d.up()
        _out, err = p.communicate(timeout=20)
        assert p.returncode == -signal.SIGTERM, err
    finally:
        err = d.close()
        assert "Traceback" not in err, err


def test_a_wrapper_killed_while_no_larknsd_runs_takes_its_job_along(
    clean_world: World,
) -> None:
    d = Larknsd(clean_world)
    try:
        p = d.job_popen("/bin/sh", "-c", "echo $$; exec sleep 300")
        assert p.stdout is not None
        job_pid = int(p.stdout.readline())
        _launched(p)
        d.down()
        p.kill()
        p.communicate(timeout=10)
        # Its keeper kills the job, though no larknsd runs.
        _wait_for("the job is gone", lambda: not Path(f"/proc/{job_pid}").exists())
        # The next larknsd removes its network at start.
        d.up()
        _wait_for("the job's network is gone", lambda: not json_jobs(clean_world))
    finally:
        err = d.close()
        assert "Traceback" not in err, err


def test_only_its_own_wrapper_may_attach_to_a_job(larknsd: Larknsd, clean_world: World) -> None:
    p = larknsd.job_popen("/bin/sh", "-c", "echo $$; exec sleep 300")
    assert p.stdout is not None
    int(p.stdout.readline())
    (name,) = [n[: -len(".json")] for n in json_jobs(clean_world) if n.endswith(".json")]
    code = (
        "import socket,json,sys\n"
        "s=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET); s.connect(sys.argv[1])\n"
        "s.send(json.dumps({'v':1,'op':'attach','name':sys.argv[2]}).encode())\n"
        "print(s.recv(4096).decode())\n"
    )
    try:
        proc = subprocess.run(
            [*larknsd.world.worker_cmd(), "/usr/bin/python3", "-c", code, larknsd.socket, name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        reply = json.loads(proc.stdout)
        assert reply["ok"] is False and "no job of this caller's" in reply["error"]
    finally:
        p.kill()
        p.communicate(timeout=10)


def test_the_job_joins_its_wrapper_s_pid_namespace(larknsd: Larknsd) -> None:
    """As with HTCondor's USE_PID_NAMESPACES: the wrapper is the first
    process of a pid namespace of its own, and the job is in it too."""
    p = subprocess.Popen(
        [
            *larknsd.world.worker_cmd(),
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            str(larknsd.wrapper),
            "/bin/sh",
            "-c",
            "readlink /proc/self/ns/pid; echo $$; exec sleep 300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    try:
        job_ns = p.stdout.readline().strip()
        job_pid_inside = int(p.stdout.readline())
        (wrapper,) = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        assert job_ns == os.readlink(f"/proc/{wrapper}/ns/pid")
        assert job_ns != os.readlink("/proc/self/ns/pid")
        assert job_pid_inside < 10  # numbered inside the wrapper's namespace
    finally:
        p.kill()
        p.communicate(timeout=10)


def test_the_job_s_end_reaches_a_client_that_asks_for_counters_all_the_time(
    larknsd: Larknsd,
) -> None:
    """A client asks for the job's counters every millisecond: the job's end,
    sent as larknsd closes the connection, must not be lost to a request
    that fails on the closed connection (a unix socket closed with unread
    messages resets its peer)."""
    null = os.open("/dev/null", os.O_RDWR)
    try:
        for _ in range(15):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(larknsd.socket)
                msg = {
                    "op": "launch",
                    "argv": ["/bin/sh", "-c", "sleep 0.05; exit 3"],
                    "path": "/bin/sh",
                    "cwd": "/",
                    "env": ["PATH=/usr/bin:/bin"],
                }
                protocol.send(s, msg, [null, null, null])
                reply, fds = protocol.receive(s, max_fds=1)
                assert reply is not None and reply["ok"], reply
                for fd in fds:
                    os.close(fd)
                end = None
                while end is None:
                    with contextlib.suppress(OSError):
                        protocol.send(s, {"op": "stats"})
                    ready, _, _ = select.select([s], [], [], 0.001)
                    while ready:
                        got, _ = protocol.receive(s, max_fds=0)
                        if got is None or "exit" in got:
                            end = got
                            break
                        ready, _, _ = select.select([s], [], [], 0)
                assert end is not None and end["exit"] == {"code": 3}, end
    finally:
        os.close(null)


def test_a_network_that_cannot_be_built_gets_a_one_line_reason(clean_world: World) -> None:
    # One block of forwarded ports: one nat job at a time.
    d = Larknsd(clean_world, LARKNS_INBOUND_PORTS="40000-40003")
    first = d.job_popen("/bin/sh", "-c", "echo started; exec sleep 60")
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "started"
        proc = d.job("/bin/true")
    finally:
        first.kill()
        first.communicate(timeout=30)
        err = d.stop()
    assert proc.returncode == 125
    (line,) = proc.stderr.strip().splitlines()
    assert "address pool exhausted" in line and "internal error" not in line, line
    assert "Traceback" not in err and "internal error" not in err, err
