"""The job-side half of larkns (the wrapper, the hook, the machine ad) as
HTCondor runs it: copies of larkns-entry with their larkns-job.conf, as
larkns-condor-config installs them.

The machine ad's cron job is Python: the system's /usr/bin/python3 with a
copy of the modules it needs in a world-readable directory (no virtualenv),
as it needs nothing but the standard library, whether or not the checkout
itself is readable by other users.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from larkns.condor.site_config import install_entries
from tests.world import ROOT

MODULES = (
    "__init__.py",
    "condor/__init__.py",
    "condor/machine_ad.py",
    "daemon/__init__.py",
    "daemon/protocol.py",
)


def wrapper_copy() -> Path:
    """A directory holding a copy of the job-side modules (the `larkns`
    package, those modules only)."""
    top = Path(tempfile.mkdtemp(prefix="lktwrap-", dir="/tmp"))
    top.chmod(0o755)
    for rel in MODULES:
        dest = top / "larkns" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.parent.chmod(0o755)
        shutil.copy(ROOT / "larkns" / rel, dest)
        dest.chmod(0o644)
    return top


def entries(top: Path, socket_path: str, name: str = "bin") -> Path:
    """The job-side programs in TOP/NAME, running the copy in `top` against
    larknsd at `socket_path`."""
    d = top / name
    d.mkdir(mode=0o755, exist_ok=True)
    d.chmod(0o755)
    install_entries(d, "/usr/bin/python3", str(top), socket_path)
    return d


def wrapper_script(top: Path, socket_path: str) -> Path:
    """The USER_JOB_WRAPPER against `socket_path`."""
    return entries(top, socket_path) / "larkns-wrapper"


def hook_script(top: Path, socket_path: str, module: str = "hook") -> Path:
    """The PREPARE_JOB hook against `socket_path` ("machine_ad": the startd
    cron job)."""
    name = {"hook": "larkns-prepare-job", "machine_ad": "larkns-machine-ad"}[module]
    return entries(top, socket_path) / name
