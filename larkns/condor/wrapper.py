"""The USER_JOB_WRAPPER: asks larknsd to start the job in a network of its own,
then stands in for it.

HTCondor runs the wrapper as the job's owner, in the job's cgroup and mount
namespace, and watches and signals the wrapper's pid as the job.  So the
wrapper passes every signal it gets on to the job (through the job's pidfd,
which larknsd hands over), and ends the way the job ended: the same exit code,
or killed by the same signal.  If the wrapper dies, larknsd kills the job.

Standard library only, and no import of larkns's C core or kernel layer: it
runs as an unprivileged user, possibly with the system's python3.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import sys
from typing import Any

from larkns.daemon import protocol

# What a wrapper cannot do without larknsd: the job must not run without the
# network it was meant to have (the hold path is the PREPARE_JOB hook).
EXIT_NO_NETWORK = 125
# SIGTSTP/TTIN/TTOU are job control; SIGCHLD is the wrapper's own business.
_NOT_FORWARDED = {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGCHLD,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
}
FORWARDED = signal.valid_signals() - _NOT_FORWARDED


def _fail(msg: str) -> int:
    print(f"larkns-wrapper: {msg}", file=sys.stderr)
    return EXIT_NO_NETWORK


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return _fail("no job to run (usage: larkns-wrapper EXECUTABLE [ARG...])")
    path = args[0] if "/" in args[0] else shutil.which(args[0])
    if path is None:
        return _fail(f"{args[0]}: command not found")
    path = os.path.abspath(path)
    sock_path = os.environ.get("LARKNS_SOCKET", protocol.DEFAULT_SOCKET)
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
            "env": [f"{k}={v}" for k, v in os.environ.items()],
        }
        try:
            protocol.send(sock, request, [0, 1, 2])
            reply, fds = protocol.receive(sock, max_fds=1)
        except (OSError, protocol.ProtocolError) as e:
            return _fail(f"larknsd: {e}")
        if reply is None:
            return _fail("larknsd closed the connection without an answer")
        if not reply.get("ok") or len(fds) != 1:
            return _fail(f"larknsd: {reply.get('error', 'refused')}")
        end = _relay(sock, fds[0])
    if end is None:
        return _fail("larknsd went away before the job ended")
    return _end_like(end)


def _relay(sock: socket.socket, pidfd: int) -> dict[str, Any] | None:
    """Pass signals on to the job until larknsd says how it ended."""
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    for s in FORWARDED:
        signal.signal(s, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), rfd], [], [])
            if rfd in ready:
                for signum in os.read(rfd, 256):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signum)
            if sock.fileno() in ready:
                # Not EOF: the job's own processes may hold the connection
                # open; the end is an explicit message.
                msg, _ = protocol.receive(sock, max_fds=0)
                if msg is None:
                    return None
                if "exit" in msg:
                    exit_info: dict[str, Any] = msg["exit"]
                    return exit_info
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        os.close(pidfd)


def _end_like(end: dict[str, Any]) -> int:
    """The wrapper's own end, the same as the job's."""
    if "signal" in end:
        sig = int(end["signal"])
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        # A signal whose default is to continue or be ignored: say so by code.
        return 128 + sig
    return int(end.get("code", EXIT_NO_NETWORK))


if __name__ == "__main__":
    sys.exit(main())
