"""The starter's PREPARE_JOB hook: has larknsd build the job's network before
the job starts, and puts the job on hold when it cannot be built.

HTCondor runs the hook as the job's owner with the job ad on stdin; printing
HookStatusCode = 190 and a HookStatusMessage holds the job with that reason
(the one reliable failure path: a failing USER_JOB_WRAPPER makes HTCondor
requeue the job again and again).  A job must never run without the network
it was meant to have.

HTCondor starts it through larkns-entry (csrc/entry.c), which takes nothing
from the job's environment.  Standard library only (it runs as the job's
owner).
"""

from __future__ import annotations

import sys

from larkns.daemon import protocol

HOLD = 190


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hold(reason: str) -> int:
    print(f"HookStatusCode = {HOLD}")
    print(f"HookStatusMessage = {_quote('larkns: ' + reason)}")
    return 0


def main(sock_path: str) -> int:
    """Build the job's network through larknsd at `sock_path` (as root
    configured it: larkns-entry hands it over)."""
    sys.stdin.read()  # the job ad: the starter expects it read
    try:
        reply = protocol.ask(sock_path, {"op": "prepare"})
    except OSError as e:
        return hold(f"cannot reach larknsd at {sock_path}: {e.strerror or e}")
    except protocol.ProtocolError as e:
        return hold(f"larknsd: {e}")
    if reply is None:
        return hold("larknsd closed the connection without an answer")
    if not reply.get("ok"):
        return hold(f"cannot build the job's network: {reply.get('error', 'refused')}")
    return 0
