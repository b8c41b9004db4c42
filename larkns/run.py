"""`larkns run`: build a job's network, run a command in it, report, tear down.

The command's exit status becomes larkns's (128+N when killed by signal N, 126
when it cannot be executed, 127 when not found; 125 for larkns's own
failures), every signal larkns gets is passed on to the command, and the
command dies with larkns, as with `unshare --kill-child`: its parent is a
keeper (core.spawn_kept) that kills it when larkns ends, even when the
command runs a setuid or file-capability program (which clears a parent-death
signal).

Signals are never handled asynchronously here: from the start every signal
that matters is blocked (in every thread), and taken with sigwaitinfo when
larkns is ready for it.  So no signal can cut a teardown short, one that
arrives before the command exists waits and is passed on, and the siginfo
tells a terminal's ^C (which reached the command too) from a kill(1).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import pwd
import signal
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from larkns import core, modes, report, signals
from larkns.config import ConfigError, Settings
from larkns.engine import Engine, TeardownError
from larkns.journal import Process, Record
from larkns.kernel import netns
from larkns.plan import JobNetwork
from larkns.watch import Watcher

# Before the command exists, these end larkns (it tears down, exits 128+N).
ABORTING = {
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
}
# Every other signal from outside is passed on (see larkns.signals).
FORWARDED = signals.FORWARDED
# A terminal sends these to its whole foreground process group, the command
# included: passing them on again would deliver them twice.
_FROM_TERMINAL = {signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH}
SI_KERNEL = 0x80  # si_code of a signal the kernel (the tty) generated

# What root may still do in a job (without --privileged): own files, change
# ids (su, setpriv), ping and raw sockets, low ports, chroot.  Everything
# else goes, from every capability set, the bounding set included, so no
# setuid or file-capability program in the job brings it back.  Above all:
# - CAP_SYS_ADMIN: setns(2) into another namespace (nsenter into the
#   worker's network, where the job's counters are) and mount(2);
# - CAP_NET_ADMIN: it reaches past the job's own network, since the job's
#   namespace belongs to the host's user namespace: a link made or moved
#   "netns PID" lands in PID's network (the worker's, the host's), and
#   IFLA_TARGET_NETNSID changes links of any network the job's has an id for;
# - CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH (open_by_handle_at), CAP_SYS_MODULE,
#   CAP_SYS_RAWIO, CAP_MKNOD (a node of the host's disk), CAP_BPF,
#   CAP_SYS_TIME, CAP_KILL (other users' processes), CAP_SETFCAP, ...
JOB_CAPS = frozenset(
    {
        core.CAP_CHOWN,
        core.CAP_DAC_OVERRIDE,
        core.CAP_FOWNER,
        core.CAP_FSETID,
        core.CAP_SETGID,
        core.CAP_SETUID,
        core.CAP_NET_BIND_SERVICE,
        core.CAP_NET_RAW,
        core.CAP_SYS_CHROOT,
        core.CAP_AUDIT_WRITE,
    }
)


@dataclass(frozen=True)
class RunRequest:
    argv: list[str]
    mode: str
    name: str
    user: str | None = None
    json_report: str | None = None
    privileged: bool = False  # every capability of root (see JOB_CAPS)
    bandwidth: tuple[int, int] | None = None  # (down, up) bits/s the job asks for


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
        numeric = user.isascii() and user.isdigit()
        pw = pwd.getpwuid(int(user)) if numeric else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise ConfigError(f"--user: no such user {user!r}") from None
    new_env = dict(env)
    new_env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir)
    return Identity(pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid), new_env)


def resolve(cmd: str, env: Mapping[str, str]) -> str | None:
    if "/" in cmd:
        return os.path.abspath(cmd) if os.path.exists(cmd) else None
    # shutil.which's search, without importing shutil (with bz2 and lzma:
    # ~2 ms of every `larkns run`).
    seen = set()
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        if d in seen:
            continue
        seen.add(d)
        found = os.path.join(d, cmd)
        if os.path.exists(found) and os.access(found, os.X_OK) and not os.path.isdir(found):
            return found
    return None


def open_report(path: str) -> int:
    """Open the JSON report's file before anything runs: a bad path is larkns's
    error (125), not something found after the command did its work.

    larkns runs as root, often in a directory anyone can write (/tmp), where
    another user may have put something at the path first: never follow a
    symlink, never block (a FIFO with no reader would hold larkns forever:
    O_NONBLOCK makes that open fail with ENXIO instead), and write only to a
    regular file with no other name (a hard link to a file of root's is not
    the report's to overwrite).  Anything else is refused, untouched."""
    head, name = os.path.split(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        dir_fd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"--json-report: refusing to write {path}: a symlink") from None
        if e.errno == errno.ENXIO:
            raise ConfigError(f"--json-report: refusing to write {path}: a FIFO") from None
        raise ConfigError(f"--json-report: cannot write {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "a file with other names" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise ConfigError(f"--json-report: refusing to write {path}: {what}")
    os.ftruncate(fd, 0)
    return fd


def _aborting() -> int | None:
    """An aborting signal that is pending, taken; or None."""
    if not ABORTING & signal.sigpending():
        return None
    info = signal.sigtimedwait(ABORTING, 0)
    return None if info is None else info.si_signo


def run(settings: Settings, req: RunRequest) -> int:
    """Run req.argv in a network of its own; returns the exit status for larkns."""
    Engine.validate(settings, [req.mode])
    env = dict(os.environ)
    ident = identity(req.user, env)
    job_env = ident.env if ident else env
    path = resolve(req.argv[0], job_env)
    report_fd = open_report(req.json_report) if req.json_report else None

    # Blocked before any thread exists: threads inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED | {signal.SIGCHLD})
    advertiser = None
    if modes.driver_class(req.mode).advertises:  # bridge mode: the site's router advertises
        from larkns.kernel.ra import Advertiser

        advertiser = Advertiser()
    engine = Engine(settings, advertiser)
    try:
        return _run(engine, settings, req, path, job_env, ident, report_fd)
    finally:
        engine.close()
        if advertiser is not None:
            advertiser.close()
        if report_fd is not None:
            os.close(report_fd)


def _run(
    engine: Engine,
    settings: Settings,
    req: RunRequest,
    path: str | None,
    env: Mapping[str, str],
    ident: Identity | None,
    report_fd: int | None,
) -> int:
    t0 = time.monotonic()
    try:
        plan = engine.setup(
            req.name,
            req.mode,
            Process.of(os.getpid()),
            policy=settings.job_policy(None),
            bandwidth=req.bandwidth,
        )
    except BaseException:
        # setup() removed what it had built; a killed setup leaves it to gc.
        _remove_unless_others(engine, req.name)
        raise
    try:
        slaac = engine.wait_ready(
            plan, settings.slaac_timeout, cancel=lambda: bool(ABORTING & signal.sigpending())
        )
        signum = _aborting()
        if signum is not None:
            _teardown(engine, req.name)
            print(
                f"larkns: {report.signal_name(signum)} while setting up job {req.name}; "
                "nothing is left",
                file=sys.stderr,
            )
            return 128 + signum
        if slaac is None and plan.waits_for_slaac:
            print(
                f"larkns: warning: job {req.name} got no IPv6 address by SLAAC within "
                f"{settings.slaac_timeout} s; IPv6 may not work",
                file=sys.stderr,
            )
        setup_s = time.monotonic() - t0
        addresses = engine.job_addresses(plan)
        started = time.monotonic()
        started_at = time.time()
        sampler = (
            None if settings.ledger_path is None else _Sampler(engine, settings, req, started_at)
        )
        if path is None:
            outcome = report.Outcome(exit_code=127, error=f"{req.argv[0]}: command not found")
        else:
            # Puts back the job's table objects should the ruleset be
            # flushed while it runs.
            watcher = Watcher(engine, lambda: _own(engine, req.name))
            try:
                outcome = _spawn_and_wait(engine, req, plan, path, env, ident, sampler)
            finally:
                watcher.close()
                if sampler is not None:
                    sampler.close()
        duration = time.monotonic() - started
        traffic = engine.stats(req.name)
        ended = engine.journal.read(req.name)
        uncounted = ended.uncounted if ended is not None else 0.0
    finally:
        _teardown(engine, req.name)
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
        inbound_ports=plan.forwarded_ports,
        policy=plan.destination_policy,
        bandwidth=getattr(plan, "bandwidth", None),
        shaper_leaf=engine.shaper_leaf,
        weight=getattr(plan, "weight", None),
        uncounted_s=uncounted,
        clat=getattr(plan, "translator", None),
    )
    if outcome.error:
        print(f"larkns: {outcome.error}", file=sys.stderr)
    print(report.summary(rep), file=sys.stderr)
    if report_fd is not None:
        report.write_json(rep, report_fd)
    if settings.ledger_path is not None:
        _keep(settings, req, ident, rep, started_at)
    return outcome.status


def _keep(
    settings: Settings,
    req: RunRequest,
    ident: Identity | None,
    rep: dict[str, Any],
    started_at: float,
) -> None:
    """The job's row in the ledger, from its report; a ledger that cannot
    be written is said, and changes nothing of the job's exit status.
    sqlite3 is imported here, after the command ended (~2-3 ms)."""
    from larkns import ledger

    cap = rep.get("bandwidth")
    job = ledger.JobEnd(
        name=req.name,
        started=started_at,
        ended=started_at + rep["duration_s"],
        source="run",
        type=req.mode,
        traffic=rep,
        owner=_user_name(ident.uid if ident else os.getuid()),
        ipv4=rep["addresses"]["ipv4"],
        ipv6=tuple(rep["addresses"]["ipv6"]),
        cap=None if not cap else (cap["down_bps"], cap["up_bps"]),
        exit_code=rep["exit_code"],
        signal=rep["signal"],
    )
    try:
        with ledger.Ledger(
            settings.ledger_path or "", settings.ledger_days, settings.ledger_gid
        ) as db:
            db.add_job(job)
    except ledger.LedgerError as e:
        print(f"larkns: warning: job {req.name} is not in the ledger: {e}", file=sys.stderr)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class _Sampler:
    """The job's counters into the ledger every LARKNS_UPDATE_INTERVAL while
    it runs (opened at the first sample: a job shorter than the interval
    costs nothing here)."""

    def __init__(self, engine: Engine, settings: Settings, req: RunRequest, started: float) -> None:
        self.engine = engine
        self.settings = settings
        self.name = req.name
        self.started = started
        self.interval = settings.update_interval
        self._ledger: Any = None
        self._failed = False

    def __call__(self) -> None:
        if self._failed:
            return
        from larkns import ledger

        with self.engine.lock:
            t = self.engine.stats(self.name)
        traffic = {
            "bytes": {"incoming": t.incoming.bytes, "outgoing": t.outgoing.bytes},
            "packets": {"incoming": t.incoming.packets, "outgoing": t.outgoing.packets},
        }
        try:
            if self._ledger is None:
                s = self.settings
                self._ledger = ledger.Ledger(s.ledger_path or "", s.ledger_days, s.ledger_gid)
            self._ledger.add_sample(self.name, self.started, time.time(), traffic)
        except ledger.LedgerError as e:
            self._failed = True
            print(
                f"larkns: warning: job {self.name}: no samples in the ledger: {e}", file=sys.stderr
            )

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()


def _remove_unless_others(engine: Engine, name: str) -> None:
    """After a failed setup: remove what is ours of job `name`, never another's."""
    record = engine.journal.read(name)
    if record is None or record.owner.pid == os.getpid():
        _teardown(engine, name)


def _own(engine: Engine, name: str) -> list[Record]:
    """This process's job's record (none once it is gone)."""
    record = engine.journal.read(name)
    return [] if record is None else [record]


def _teardown(engine: Engine, name: str) -> None:
    """Remove job `name`'s network; what is left is said, and stays in the
    journal for `larkns gc`."""
    try:
        engine.teardown(name)
    except TeardownError as e:
        for p in e.problems:
            print(
                f"larkns: job {name}: still there: {p} (`larkns gc` tries again)", file=sys.stderr
            )


def _spawn_and_wait(
    engine: Engine,
    req: RunRequest,
    plan: JobNetwork,
    path: str,
    env: Mapping[str, str],
    ident: Identity | None,
    sampler: _Sampler | None = None,
) -> report.Outcome:
    ns_fd = os.open(netns.path(plan.netns), os.O_RDONLY | os.O_CLOEXEC)
    me = os.pidfd_open(os.getpid())
    status_dir = os.open(engine.journal.jobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    engine.journal.exit_path(req.name).unlink(missing_ok=True)  # an earlier job's
    try:
        spec = core.SpawnSpec(
            path=path,
            argv=req.argv,
            env={**env, **plan.job_env()},
            ns_fds=[ns_fd],
            uid=ident.uid if ident else None,
            gid=ident.gid if ident else None,
            groups=ident.groups if ident else None,
            cwd=os.getcwd(),
            pdeathsig=signal.SIGKILL,
            own_sysfs=True,
            caps=None if req.privileged else JOB_CAPS,
        )
        try:
            # The keeper watches this process: if larkns is killed, so is
            # the command.
            kept = core.spawn_kept(spec, status_dir, f"{req.name}.exit", watch_pidfd=me)
        except core.SpawnError as e:
            if e.stage != "exec":
                return report.Outcome(exit_code=125, error=str(e))
            return report.Outcome(exit_code=127 if e.errno == errno.ENOENT else 126, error=str(e))
    finally:
        for fd in (ns_fd, me, status_dir):
            os.close(fd)
    # The `larkns` program starts without a garbage collector (cli.console);
    # from here on larkns waits, maybe for days, while its threads work.
    gc.enable()
    try:
        with engine.lock:  # a DHCP renewer may write the record too
            _record_started(engine, req.name, kept)
        _wait(kept.keeper_pidfd, kept.job_pidfd, sampler)
    finally:
        os.close(kept.job_pidfd)
        os.close(kept.keeper_pidfd)
    return _outcome(engine, req.name)


def _record_started(engine: Engine, name: str, kept: core.Kept) -> None:
    record = engine.journal.read(name)
    if record is not None:
        # The job's pid lets `larkns show` and gc tell it apart; a command
        # that has already exited has no start time left to record.
        with contextlib.suppress(ProcessLookupError):
            record.job = Process.of(kept.job_pid)
        with contextlib.suppress(ProcessLookupError):
            record.keeper = Process.of(kept.keeper_pid)
        record.state = "running"
        engine.journal.write(record)


def _outcome(engine: Engine, name: str) -> report.Outcome:
    """How the command ended, as its keeper wrote it down."""
    end = engine.journal.exit_status(name)
    if end is None:
        # Killed with its keeper (parent-death signal), or by gc/teardown.
        print(
            f"larkns: the keeper of job {name} was killed, and the command with it",
            file=sys.stderr,
        )
        return report.Outcome(signal=signal.SIGKILL)
    if "code" in end:
        return report.Outcome(exit_code=end["code"])
    return report.Outcome(signal=end["signal"])


def _wait(keeper_fd: int, job_fd: int, sampler: _Sampler | None = None) -> None:
    """Pass every signal on to the command until it has ended (its keeper,
    which has written down how, has exited); meanwhile the sampler's
    samples, at its interval."""
    waited = FORWARDED | {signal.SIGCHLD}
    next_sample = time.monotonic() + (sampler.interval if sampler else 0.0)
    while True:
        # The keeper may have ended before its SIGCHLD was waited for.
        info = os.waitid(os.P_PIDFD, keeper_fd, os.WEXITED | os.WNOHANG)
        if info is not None and info.si_pid:
            return
        if sampler is None:
            sig = signal.sigwaitinfo(waited)
        else:
            got = signal.sigtimedwait(waited, max(0.0, next_sample - time.monotonic()))
            if got is None:
                sampler()
                next_sample = time.monotonic() + sampler.interval
                continue
            sig = got
        if sig.si_signo == signal.SIGCHLD:
            continue
        if sig.si_signo in _FROM_TERMINAL and sig.si_code == SI_KERNEL:
            continue
        try:
            signal.pidfd_send_signal(job_fd, sig.si_signo)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
