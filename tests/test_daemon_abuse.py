"""larknsd against callers that mean harm or make mistakes: each test performs
an attack that once stopped larknsd or leaked its descriptors."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from larkns.daemon import protocol
from tests.test_daemon import Larknsd, _wait_for, serving
from tests.world import World

ATTACKER = "64510"  # a uid of no user and of no HTCondor job
SO_SNDBUFFORCE = 32  # asm-generic/socket.h; Python's socket module lacks it

# Run as the attacker (system python, no venv): opens N connections to the
# socket and sends nothing; on a line from stdin, waits until larknsd has
# closed each, and prints what larknsd said first on each.
_IDLE = r"""
import json, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setblocking(False)
    deadline = time.monotonic() + 30
    while True:
        try:
            s.connect(path)  # EAGAIN while larknsd's backlog is full
            conns.append(s)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                s.close()
                break
            time.sleep(0.01)
print(len(conns), flush=True)
sys.stdin.readline()
said = []
deadline = time.monotonic() + 30  # larknsd closes idle ones after 5 s
for s in conns:
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        said.append(s.recv(65536).decode())
        while s.recv(65536):  # until larknsd has closed it
            pass
    except OSError as e:
        said.append(f"error {e}")
print(json.dumps(said), flush=True)
"""


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def warm_fd_count(d: Larknsd) -> int:
    """larknsd's descriptors once it has served a job and an `info` request
    (what it opens once, it has opened then)."""
    job = d.job("/bin/true")
    assert job.returncode == 0, job.stderr
    assert _info(d, 1).returncode == 0
    return fd_count(d.proc.pid)


def _info(d: Larknsd, n: int) -> subprocess.CompletedProcess[str]:
    """n `info` requests, from the worker, as the condor user would ask."""
    code = (
        "import sys\n"
        "from larkns.daemon import protocol\n"
        f"for _ in range({n}):\n"
        "    assert protocol.ask(sys.argv[1], {'op': 'info'})['ok']\n"
    )
    return subprocess.run(
        [*d.world.worker_cmd(), "/usr/bin/python3", "-c", code, d.socket],
        env={"PYTHONPATH": str(d.copy)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def settled_fd_count(pid: int, at_most: int) -> int:
    """larknsd's descriptors once they are back to `at_most`, or after 10 s:
    a connection's thread closes its descriptors as it ends, just after its
    peer has seen the end."""
    with contextlib.suppress(AssertionError):
        _wait_for(f"larknsd is back to {at_most} descriptors", lambda: fd_count(pid) <= at_most)
    return fd_count(pid)


class IdleAttacker:
    def __init__(self, d: Larknsd, n: int) -> None:
        self.proc = subprocess.Popen(
            [
                *d.world.worker_cmd(),
                "setpriv",
                f"--reuid={ATTACKER}",
                f"--regid={ATTACKER}",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                _IDLE,
                d.socket,
                str(n),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.connected = int(self.proc.stdout.readline())

    def said(self) -> list[str]:
        """What larknsd said on each connection before it closed it."""
        out, _ = self.proc.communicate("go\n", timeout=120)
        said: list[str] = json.loads(out)
        return said

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture()
def larknsd(clean_world: World) -> Iterator[Larknsd]:
    with serving(clean_world) as d:
        yield d


@pytest.fixture()
def attacked(clean_world: World) -> Iterator[Larknsd]:
    """larknsd serving at most 32 connections of one user at once."""
    with serving(clean_world, LARKNS_MAX_CONNECTIONS_PER_UID="32") as d:
        yield d


def _prlimit(pid: int, nofile: int) -> None:
    """Set larknsd's soft limit of descriptors (the hard one stays: raising
    it back could need more than root has here)."""
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={nofile}:"], check=True)


def _refusal(line: str) -> str:
    """The error of a one-line refusal."""
    assert "\n" not in line, line
    reply = json.loads(line)
    assert reply["ok"] is False and "\n" not in reply["error"], reply
    error: str = reply["error"]
    return error


def test_one_user_s_idle_connections_stop_neither_larknsd_nor_other_users_jobs(
    attacked: Larknsd,
) -> None:
    """One user opens far more connections than its cap (32 here), and more
    than larknsd's own descriptor limit: larknsd refuses those beyond the cap
    at once, closes the idle ones after the request timeout, and another
    user's job runs meanwhile."""
    pid = attacked.proc.pid
    before = warm_fd_count(attacked)
    _prlimit(pid, 128)
    attacker = IdleAttacker(attacked, 300)
    try:
        assert attacker.connected == 300
        job = attacked.job("/bin/sh", "-c", "exit 5")
        assert job.returncode == 5, job.stderr
        assert attacked.proc.poll() is None
        said = attacker.said()
    finally:
        attacker.kill()
    errors = [_refusal(line) for line in said]
    capped = [e for e in errors if "LARKNS_MAX_CONNECTIONS_PER_UID=32" in e]
    idle = [e for e in errors if e.startswith("no request within")]
    assert len(capped) + len(idle) == 300, set(errors)
    assert len(idle) >= 32  # each accepted one, closed for idleness
    assert attacked.proc.poll() is None
    assert settled_fd_count(pid, before) <= before
    job = attacked.job("/bin/sh", "-c", "exit 6")
    assert job.returncode == 6, job.stderr


def test_larknsd_keeps_descriptors_in_reserve_under_a_flood(larknsd: Larknsd) -> None:
    """Under its per-user cap, a user cannot take larknsd's last descriptors
    either: with a limit of 100, larknsd refuses what would eat into its
    reserve, and serves again once the idle ones are gone."""
    d = larknsd
    pid = d.proc.pid
    before = warm_fd_count(d)
    _prlimit(pid, 100)
    attacker = IdleAttacker(d, 300)
    try:
        said = attacker.said()
    finally:
        attacker.kill()
    errors = [_refusal(line) for line in said]
    short = [e for e in errors if "short of file descriptors" in e]
    idle = [e for e in errors if e.startswith("no request within")]
    assert len(short) + len(idle) == 300, set(errors)
    assert short and idle
    assert d.proc.poll() is None
    assert settled_fd_count(pid, before) <= before
    job = d.job("/bin/sh", "-c", "exit 4")
    assert job.returncode == 4, job.stderr


def test_larknsd_out_of_descriptors_waits_and_serves_again(attacked: Larknsd) -> None:
    """accept(2) failing (EMFILE: not one descriptor left below the limit)
    does not end larknsd: it says so once, waits, and serves the connections
    that waited in the backlog once descriptors are back."""
    pid = attacked.proc.pid
    # 0, 1 and 2 are open: no descriptor is left below this limit.
    _prlimit(pid, 3)
    attacker = IdleAttacker(attacked, 20)
    try:
        assert attacker.connected == 20  # in the listening socket's backlog
        # Before it, maybe the refusal of the one connection whose accept(2)
        # was waiting when the limit fell (with its descriptor, but none left
        # to serve it with), or what other work of larknsd's could not open.
        said = [_said(attacked)]
        while "cannot accept connections" not in said[-1]:
            assert len(said) < 10 and said[-1], said
            said.append(_said(attacked))
        assert not any("cannot accept" in line for line in said[:-1]), said
        _prlimit(pid, 1024)
        # Other work of larknsd's that fell in the window (its gc pass) may
        # say it could not open a file first.
        said = [_said(attacked)]
        while "accepting connections again" not in said[-1]:
            assert len(said) < 10 and "cannot accept" not in said[-1], said
            said.append(_said(attacked))
        job = attacked.job("/bin/sh", "-c", "exit 3")
        assert job.returncode == 3, job.stderr
        errors = [_refusal(line) for line in attacker.said()]
    finally:
        _prlimit(pid, 1024)
        attacker.kill()
    idle = [e for e in errors if e.startswith("no request within")]
    assert len(idle) >= 19, set(errors)


def _said(d: Larknsd) -> str:
    """larknsd's next line on stderr (within 30 s)."""
    stderr = d.proc.stderr
    assert stderr is not None
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: lines.put(stderr.readline()), daemon=True).start()
    try:
        return lines.get(timeout=30)
    except queue.Empty:
        raise AssertionError("larknsd said nothing") from None


def _raw(path: str, data: bytes, fds: list[int]) -> list[bytes]:
    """Send one message of `data` with `fds`; every message larknsd sends
    back until it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(30)
        s.connect(path)
        # Room for a message of the largest size (root may exceed wmem_max).
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 * protocol.MAX_MESSAGE)
        socket.send_fds(s, [data], fds)
        out: list[bytes] = []
        while True:
            msg, got, _flags, _ = socket.recv_fds(s, protocol.MAX_MESSAGE, 4)
            for fd in got:
                os.close(fd)
            if not msg:
                return out
            out.append(msg)


def test_deeply_nested_json_with_descriptors_leaks_nothing(larknsd: Larknsd) -> None:
    """A message nested too deeply for the JSON parser, sent with three
    descriptors, 100 times: a one-line refusal each time, and larknsd closes
    every descriptor it got."""
    pid = larknsd.proc.pid
    before = warm_fd_count(larknsd)
    r, w = os.pipe()
    try:
        for _ in range(100):
            replies = _raw(larknsd.socket, b"[" * 100000, [r, w, r])
            assert [_refusal(m.decode()) for m in replies] == ["not JSON"]
    finally:
        os.close(r)
        os.close(w)
    assert larknsd.proc.poll() is None
    assert settled_fd_count(pid, before) <= before


def test_a_busy_node_s_larknsd_keeps_its_descriptor_count(larknsd: Larknsd) -> None:
    """500 jobs and 500 `info` requests: larknsd ends with the descriptors it
    had after the first few (pyroute2 once kept a netlink socket for every
    thread that asked it anything)."""
    import concurrent.futures

    pid = larknsd.proc.pid

    def launch(i: int) -> None:
        job = larknsd.job("/bin/sh", "-c", f"exit {i % 3}")
        assert job.returncode == i % 3, job.stderr

    def info(n: int) -> None:
        proc = _info(larknsd, n)
        assert proc.returncode == 0, proc.stderr

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(launch, range(8)))
        info(8)
        warm = fd_count(pid)
        list(pool.map(launch, range(500)))
        info(500)
    assert larknsd.proc.poll() is None
    assert settled_fd_count(pid, warm) <= warm
