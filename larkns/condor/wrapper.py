"""The USER_JOB_WRAPPER: asks larknsd to start the job in a network of its own,
then stands in for it.

HTCondor runs the wrapper as the job's owner, in the job's cgroup and mount
namespace, and watches and signals the wrapper's pid as the job.  So the
wrapper passes every signal it gets on to the job (through the job's pidfd,
which larknsd hands over), and ends the way the job ended: the same exit code,
or killed by the same signal.  If the wrapper dies, the job dies (its keeper,
the job's parent, watches the wrapper).

larknsd may restart while the job runs: the job runs on, and the wrapper
attaches again to the new larknsd (trying for LARKNS_REATTACH_TIMEOUT
seconds, default 300, as larknsd said), passing signals on meanwhile.  If no larknsd comes
back, the wrapper gives up with exit code 125, and the job is killed.

The job's counters reach its ad through larknsd, not the wrapper: the
wrapper runs as the job's owner, whose processes could stop or trace it, and
the counts must come by a path the job cannot write.

HTCondor starts the wrapper through larkns-entry (csrc/entry.c), which hands
it larknsd's socket as root configured it and the job's environment, to pass
on to the job: nothing of the job's environment steers the wrapper itself.

Standard library only, and no import of larkns's C core or kernel layer: it
runs as an unprivileged user, possibly with the system's python3.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

from larkns import signals
from larkns.daemon import protocol

# typing costs a few ms at every job's start, and is wanted for checking only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


# What a wrapper cannot do without larknsd: the job must not run without the
# network it was meant to have (the hold path is the PREPARE_JOB hook).
EXIT_NO_NETWORK = 125
FORWARDED = signals.FORWARDED
DEFAULT_REATTACH_TIMEOUT = 300.0


# Every import here costs the start of every job (HTCondor starts the
# wrapper anew for each): the standard library's heavier modules (shutil,
# subprocess, contextlib) are left out or imported when needed.


def which(cmd: str, path: str) -> str | None:
    """shutil.which, for an executable file on `path` (the job's PATH)."""
    for d in path.split(os.pathsep):
        found = os.path.join(d or ".", cmd)
        if os.access(found, os.X_OK) and not os.path.isdir(found):
            return found
    return None


def _fail(msg: str) -> int:
    print(f"larkns-wrapper: {msg}", file=sys.stderr)
    return EXIT_NO_NETWORK


def _seconds(reply: dict[str, Any], key: str, default: float) -> float:
    """A knob larknsd passed on (checked there), or the default."""
    value = reply.get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else default


def main(args: list[str], sock_path: str, environ: dict[str, str]) -> int:
    """Run the job `args` through larknsd at `sock_path`, with the job's
    environment `environ`."""
    if not args:
        return _fail("no job to run (usage: larkns-wrapper EXECUTABLE [ARG...])")
    path = args[0] if "/" in args[0] else which(args[0], environ.get("PATH", os.defpath))
    if path is None:
        return _fail(f"{args[0]}: command not found")
    path = os.path.abspath(path)
    # Signals wait (blocked) until the job exists, then are passed on.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.connect(sock_path)
    except OSError as e:
        return _fail(f"cannot reach larknsd at {sock_path}: {e.strerror}")
    with sock:
        request = {
            "op": "launch",
            "argv": args,
            "path": path,
            "cwd": os.getcwd(),
            "env": [f"{k}={v}" for k, v in environ.items()],
        }
        try:
            protocol.send(sock, request, [0, 1, 2])
            reply, fds = protocol.receive(sock, max_fds=1)
        except (OSError, protocol.ProtocolError) as e:
            return _fail(f"larknsd: {e}")
        if reply is None:
            return _fail("larknsd closed the connection without an answer")
        if not reply.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return _fail(f"larknsd: {reply.get('error', 'refused')}")
        reattach = _seconds(reply, "reattach_timeout", DEFAULT_REATTACH_TIMEOUT)
        link = Link(sock_path, sock, str(reply.get("name", "")), reattach)
        try:
            end = _relay(link, fds[0])
        finally:
            link.close()
    if end is None:
        return _fail("larknsd went away before the job ended")
    return _end_like(end["exit"])


class Link:
    """The wrapper's connection to larknsd, taken up again with a new
    larknsd when the old one goes away."""

    def __init__(self, path: str, sock: socket.socket, name: str, timeout: float) -> None:
        self.path = path
        self.sock: socket.socket | None = sock
        self.name = name
        self.timeout = timeout

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def reattach(self, wait: Any) -> bool:
        """Attach to a (restarted) larknsd within the timeout; `wait(seconds)`
        passes the time between tries (and signals on).  False if none came."""
        self.close()
        print("larkns-wrapper: larknsd went away; the job runs on", file=sys.stderr)
        deadline = time.monotonic() + self.timeout
        why = "no answer"
        while time.monotonic() < deadline:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(30)
                sock.connect(self.path)
                protocol.send(sock, {"op": "attach", "name": self.name})
                reply, _ = protocol.receive(sock, max_fds=0)
                if reply is not None and reply.get("ok"):
                    sock.settimeout(None)
                    self.sock = sock
                    print("larkns-wrapper: attached to larknsd again", file=sys.stderr)
                    return True
                why = str(reply.get("error")) if reply else "closed without an answer"
                if reply is not None:
                    # A larknsd that answers and refuses will not change its mind.
                    sock.close()
                    print(f"larkns-wrapper: larknsd: {why}", file=sys.stderr)
                    return False
            except (OSError, protocol.ProtocolError) as e:
                why = str(e)
            sock.close()
            wait(0.25)
        print(f"larkns-wrapper: no larknsd to attach to: {why}", file=sys.stderr)
        return False


def _relay(link: Link, pidfd: int) -> dict[str, Any] | None:
    """Pass signals on to the job until larknsd says how it ended; the final
    message (with "exit"), or None."""
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    for s in FORWARDED:
        signal.signal(s, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)

    def forward(timeout: float | None, sock: socket.socket | None = None) -> bool:
        """Pass on the signals that come within `timeout`; True if `sock`
        became readable meanwhile."""
        watched = [rfd] if sock is None else [sock.fileno(), rfd]
        ready, _, _ = select.select(watched, [], [], timeout)
        if rfd in ready:
            for signum in os.read(rfd, 256):
                try:  # noqa: SIM105 (contextlib: a slower start)
                    signal.pidfd_send_signal(pidfd, signum)
                except ProcessLookupError:
                    pass  # the job has ended: its end is on its way
        return sock is not None and sock.fileno() in ready

    try:
        while True:
            sock = link.sock
            assert sock is not None
            try:
                if forward(None, sock):
                    # Not EOF: the end is an explicit message (a job's own
                    # processes could otherwise hold the wrapper forever).
                    msg, _ = protocol.receive(sock, max_fds=0)
                    if msg is None:
                        raise ConnectionResetError("larknsd closed the connection")
                    if "exit" in msg:
                        return msg
            except OSError:
                # The job's end may still be queued behind the error.
                end = _leftover_end(sock)
                if end is not None:
                    return end
                if not link.name or not link.reattach(forward):
                    return None
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        os.close(pidfd)
        signal.set_wakeup_fd(-1)
        os.close(rfd)
        os.close(wfd)


def _leftover_end(sock: socket.socket) -> dict[str, Any] | None:
    """The job's end, if larknsd sent it before the connection failed."""
    sock.setblocking(False)
    try:
        while True:
            msg, _ = protocol.receive(sock, max_fds=0)
            if msg is None:
                return None
            if "exit" in msg:
                return msg
    except (OSError, protocol.ProtocolError):
        return None
    finally:
        try:  # noqa: SIM105
            sock.setblocking(True)
        except OSError:
            pass


def _end_like(end: dict[str, Any]) -> int:
    """The wrapper's own end, the same as the job's."""
    if "signal" in end:
        sig = int(end["signal"])
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        # A signal whose default is to continue or be ignored: say so by code.
        return 128 + sig
    return int(end.get("code", EXIT_NO_NETWORK))
