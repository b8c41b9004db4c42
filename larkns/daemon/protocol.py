"""The wire protocol between the job wrapper and larknsd.

A SOCK_SEQPACKET unix socket: one JSON object per message, so no framing.
File descriptors travel beside a message (SCM_RIGHTS).  Every message has
"v" (the protocol version); a daemon refuses versions it does not know.

    wrapper -> daemon   {"v": 1, "op": "launch", "argv": [...], "path": "/abs/exe",
                         "env": ["K=V", ...], "cwd": "/dir"}     + fds 0, 1, 2
    daemon -> wrapper   {"v": 1, "ok": true, "name": ..., "pid": N, "addresses": {...}}
                         + the job's pidfd (signals go straight to the job)
                     or {"v": 1, "ok": false, "error": "one line"}
    wrapper -> daemon   {"v": 1, "op": "stats"}            (may) while the job runs
    daemon -> wrapper   {"v": 1, "traffic": {...}}
    daemon -> wrapper   {"v": 1, "exit": {"code": N} | {"signal": N}, "traffic": {...}}
                         when the job has ended (and its network is gone)

After a restart of larknsd, a wrapper takes its job up again on a new
connection (only the job's own wrapper may):

    wrapper -> daemon   {"v": 1, "op": "attach", "name": NAME}
    daemon -> wrapper   {"v": 1, "ok": true, "name": NAME}, then as above

The job wrapper and the PREPARE_JOB hook speak it in C (csrc/entry.c); this
module is standard library only: the machine ad's cron job imports it.
"""

from __future__ import annotations

import array
import json
import os
import socket

# typing costs a few ms at every job's start, and is wanted for checking only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
MAX_MESSAGE = 1 << 20  # a job's environment can be large; this is plenty


class ProtocolError(Exception):
    pass


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps({"v": VERSION, **msg}).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is over the limit of {MAX_MESSAGE}")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def ask(sock_path: str, msg: dict[str, Any], timeout: float = 60) -> dict[str, Any] | None:
    """One request and its answer (no descriptors either way); None if the
    daemon closed without one.  Raises OSError or ProtocolError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        send(sock, msg)
        reply, _ = receive(sock, max_fds=0)
    return reply


def receive(sock: socket.socket, max_fds: int = 3) -> tuple[dict[str, Any] | None, list[int]]:
    """(message, fds); (None, []) when the peer has closed.  On any failure
    the fds that came with the message are closed: they are the caller's
    only once it has the message."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, max_fds, socket.MSG_CMSG_CLOEXEC)
    if not data and not fds:
        return None, []
    try:
        return _parse(data, flags), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _parse(data: bytes, flags: int) -> dict[str, Any]:
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise ProtocolError("message or its file descriptors cut short")
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack ("[" * 100000)
        raise ProtocolError("not JSON") from None
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        version = repr(msg.get("v") if isinstance(msg, dict) else None)
        raise ProtocolError(f"unknown protocol version {_short(version)}")
    return msg


def _short(text: str, limit: int = 80) -> str:
    """At most `limit` characters of `text`: a reply quotes what it refuses,
    which may be as large as a whole message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
