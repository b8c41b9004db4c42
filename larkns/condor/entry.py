"""The Python side of larkns-entry (csrc/entry.c), the program HTCondor runs
as larkns-wrapper, larkns-prepare-job and larkns-machine-ad.

larkns-entry runs this module isolated (python -I, an environment of its
own) with what root wrote at install time: larknsd's socket, and for the
wrapper a memfd holding the job's environment (which is the job's, to pass on
to it, and never read for the wrapper's own workings).

    ROLE SOCKET ENVFD NETNS_LEFT [ARG...]

Standard library only (it runs as the job's owner).
"""

from __future__ import annotations

import os
import sys


def _not_dumpable() -> None:
    """Out of reach of ptrace and /proc/PID/mem for the owner's other
    processes (a job of the same user), where larkns-entry could not take
    this process out of the worker's network.  ctypes costs ~3 ms, so only
    then."""
    import ctypes

    pr_set_dumpable = 4
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def read_environ(fd: int) -> dict[str, str]:
    """The NUL-separated NAME=VALUE entries of a memfd (closed after)."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    out: dict[str, str] = {}
    for entry in b"".join(chunks).split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            # The job's bytes go to the job as they were.
            out[os.fsdecode(name)] = os.fsdecode(value)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print("larkns-entry: expected ROLE SOCKET ENVFD NETNS_LEFT [ARG...]", file=sys.stderr)
        return 125
    role, sock_path, envfd, left, *args = argv
    if left != "1":
        _not_dumpable()
    if role == "wrapper":
        from larkns.condor import wrapper

        fd = int(envfd)
        environ = read_environ(fd) if fd >= 0 else {}
        return wrapper.main(args, sock_path, environ)
    if role == "hook":
        from larkns.condor import hook

        return hook.main(sock_path)
    if role == "machine_ad":
        from larkns.condor import machine_ad

        return machine_ad.main(sock_path)
    print(f"larkns-entry: unknown role {role!r}", file=sys.stderr)
    return 125
