"""`larkns run`: build a job's network, run a command in it, report, tear down.

The command's exit status becomes larkns's (128+N when killed by signal N, 126
when it cannot be executed, 127 when not found; 125 for larkns's own
failures), every signal larkns gets is passed on to the command, and the
command dies with larkns (PR_SET_PDEATHSIG), as with `unshare --kill-child`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from larkns import core, report
from larkns.config import ConfigError, Settings
from larkns.engine import Engine
from larkns.journal import Process
from larkns.kernel import netns
from larkns.traffic import Traffic

# Signals passed on to the command.  SIGTSTP/TTIN/TTOU keep their default: the
# terminal stops larkns and the command together, as they share a group.
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)
# A terminal sends these to its whole foreground process group, the command
# included: passing them on again would deliver them twice.
_FROM_TERMINAL = (signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class RunRequest:
    argv: list[str]
    mode: str
    name: str
    user: str | None = None
    json_report: str | None = None


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: list[int]
    env: dict[str, str]


def identity(user: str | None, env: Mapping[str, str]) -> Identity | None:
    if user is None:
        return None
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigError(f"--user: no such user {user!r}") from None
    new_env = dict(env)
    new_env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir)
    return Identity(pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid), new_env)


def resolve(cmd: str, env: Mapping[str, str]) -> str | None:
    if "/" in cmd:
        return os.path.abspath(cmd) if os.path.exists(cmd) else None
    return shutil.which(cmd, path=env.get("PATH", os.defpath))


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While the network is built, a forwarded signal aborts the setup cleanly."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in FORWARDED}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Teardown runs to the end: a second ^C must not leave half a network."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _in_terminal_foreground() -> bool:
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _wait(spawn: Callable[[], tuple[int, int]]) -> report.Outcome:
    """Start the command and wait for it, passing on every signal larkns gets.

    Forwarded signals are blocked on entry (since the end of setup), so one
    that arrives before the command exists waits and is passed on after.
    """
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    old = {s: signal.signal(s, lambda *_: None) for s in FORWARDED}
    pidfd = -1
    try:
        try:
            _pid, pidfd = spawn()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        while True:
            ready, _, _ = select.select([pidfd, rfd], [], [])
            if rfd in ready:
                try:
                    data = os.read(rfd, 64)
                except BlockingIOError:
                    data = b""
                for signum in data:
                    if signum in _FROM_TERMINAL and _in_terminal_foreground():
                        continue
                    try:
                        core.pidfd_send_signal(pidfd, signum)
                    except ProcessLookupError:
                        pass
                    except OSError as e:
                        if e.errno != errno.ESRCH:
                            raise
            if pidfd in ready:
                info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
                assert info is not None
                if info.si_code == os.CLD_EXITED:
                    return report.Outcome(exit_code=info.si_status)
                return report.Outcome(signal=info.si_status)
    finally:
        # Signals stay blocked from here to larkns's exit: teardown must finish.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        for s, h in old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(old_wakeup)
        os.close(rfd)
        os.close(wfd)
        if pidfd >= 0:
            os.close(pidfd)


def run(settings: Settings, req: RunRequest, err: object = sys.stderr) -> int:
    """Run req.argv in a network of its own; returns the exit status for larkns."""
    env = dict(os.environ)
    ident = identity(req.user, env)
    job_env = ident.env if ident else env
    path = resolve(req.argv[0], job_env)

    advertiser = None
    if req.mode == "nat":
        from larkns.kernel.ra import Advertiser

        advertiser = Advertiser()
    engine = Engine(settings, advertiser)
    t0 = time.monotonic()
    outcome = report.Outcome()
    traffic = Traffic()
    addresses: tuple[str | None, list[str]] = (None, [])
    slaac: float | None = None
    setup_s = duration = 0.0
    plan = None
    try:
        with _signals_raise():
            plan = engine.setup(req.name, req.mode, Process.of(os.getpid()))
            slaac = engine.wait_ready(plan, settings.slaac_timeout)
            if slaac is None:
                print(
                    f"larkns: warning: job {req.name} got no IPv6 address by SLAAC within "
                    f"{settings.slaac_timeout} s; IPv6 may not work",
                    file=sys.stderr,
                )
            setup_s = time.monotonic() - t0
            addresses = engine.job_addresses(plan)
            ns_fd = os.open(netns.path(plan.netns), os.O_RDONLY | os.O_CLOEXEC)
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        started = time.monotonic()
        try:
            if path is None:
                outcome = report.Outcome(exit_code=127, error=f"{req.argv[0]}: command not found")
            else:
                outcome = _spawn_and_wait(engine, req, path, job_env, ident, ns_fd)
        finally:
            os.close(ns_fd)
        duration = time.monotonic() - started
    except Interrupted as e:
        with _signals_blocked():
            if plan is not None:
                engine.teardown(req.name)
        engine.close()
        if advertiser is not None:
            advertiser.close()
        print(
            f"larkns: interrupted by {e} while setting up job {req.name}; nothing is left",
            file=sys.stderr,
        )
        return 128 + e.signum
    except BaseException:
        # setup() already removed what it built; anything later is ours to undo.
        with _signals_blocked():
            if plan is not None:
                engine.teardown(req.name)
        engine.close()
        if advertiser is not None:
            advertiser.close()
        raise
    with _signals_blocked():  # already blocked after a spawn; not after "not found"
        traffic = engine.stats(req.name)
        engine.teardown(req.name)
        engine.close()
        if advertiser is not None:
            advertiser.close()
    rep = report.build(
        name=req.name,
        mode=req.mode,
        netns=plan.netns,
        outcome=outcome,
        duration_s=duration,
        setup_s=setup_s,
        slaac_s=slaac,
        ipv4=addresses[0],
        ipv6=addresses[1],
        traffic=traffic,
    )
    if outcome.error:
        print(f"larkns: {outcome.error}", file=sys.stderr)
    print(report.summary(rep), file=sys.stderr)
    if req.json_report:
        report.write_json(rep, req.json_report)
    return outcome.status


def _spawn_and_wait(
    engine: Engine,
    req: RunRequest,
    path: str,
    env: Mapping[str, str],
    ident: Identity | None,
    ns_fd: int,
) -> report.Outcome:
    spec = core.SpawnSpec(
        path=path,
        argv=req.argv,
        env=env,
        ns_fds=[ns_fd],
        uid=ident.uid if ident else None,
        gid=ident.gid if ident else None,
        groups=ident.groups if ident else None,
        cwd=os.getcwd(),
        pdeathsig=signal.SIGKILL,
    )

    def spawn() -> tuple[int, int]:
        pid, pidfd = core.spawn(spec)
        record = engine.journal.read(req.name)
        if record is not None:
            # The job's pid lets `larkns show` and gc tell it apart; a command
            # that has already exited has no start time left to record.
            with contextlib.suppress(ProcessLookupError):
                record.job = Process.of(pid)
            record.state = "running"
            engine.journal.write(record)
        return pid, pidfd

    try:
        return _wait(spawn)
    except core.SpawnError as e:
        if e.stage != "exec":
            return report.Outcome(exit_code=125, error=str(e))
        code = 127 if e.errno == errno.ENOENT else 126
        return report.Outcome(exit_code=code, error=str(e))
