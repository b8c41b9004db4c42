"""The job-side half of larkns (the wrapper) as the job's owner sees it.

The wrapper runs as an unprivileged user, with whatever python3 the system
has; it must need nothing but the standard library and its own two modules.
Tests run it from a copy in a world-readable directory, with the system's
/usr/bin/python3 and no virtualenv: as a site would, and independent of
whether the checkout itself is readable by other users.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.world import ROOT

MODULES = (
    "signals.py",
    "condor/hook.py",
    "condor/machine_ad.py",
    "__init__.py",
    "daemon/__init__.py",
    "daemon/protocol.py",
    "condor/__init__.py",
    "condor/wrapper.py",
)


def wrapper_copy() -> Path:
    """A directory to put on PYTHONPATH for `python3 -m larkns.condor.wrapper`."""
    top = Path(tempfile.mkdtemp(prefix="lktwrap-", dir="/tmp"))
    top.chmod(0o755)
    for rel in MODULES:
        dest = top / "larkns" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.parent.chmod(0o755)
        shutil.copy(ROOT / "larkns" / rel, dest)
        dest.chmod(0o644)
    return top


def hook_script(top: Path, socket_path: str, module: str = "hook") -> Path:
    """An executable running the copy's larkns.condor.MODULE against `socket_path`
    (the PREPARE_JOB hook by default; "machine_ad" for the startd cron job)."""
    script = top / f"larkns-{module}"
    script.write_text(
        "#!/bin/sh\n"
        f"LARKNS_SOCKET={socket_path} PYTHONPATH={top} "
        f'exec /usr/bin/python3 -m larkns.condor.{module} "$@"\n'
    )
    script.chmod(0o755)
    return script


def wrapper_script(top: Path, socket_path: str, **env: str) -> Path:
    """An executable USER_JOB_WRAPPER running the copy against `socket_path`."""
    script = top / "larkns-wrapper"
    extra = "".join(f"{k}={v} " for k, v in env.items())
    script.write_text(
        "#!/bin/sh\n"
        f"LARKNS_SOCKET={socket_path} PYTHONPATH={top} {extra}"
        'exec /usr/bin/python3 -m larkns.condor.wrapper "$@"\n'
    )
    script.chmod(0o755)
    return script
