"""What the larkns program loads to start: every module costs every job its
import time (pyroute2's package alone was ~100 ms of a `larkns run -- true`
of ~300)."""

from __future__ import annotations

import subprocess
import sys

from tests.world import World

# Loaded by the code under test, then the names of every module it loaded.
_MODULES_AFTER = """
import sys
from larkns import cli
{call}
print("\\n".join(sorted(sys.modules)))
"""

# Heavy, and needed by no verb's hot path: pyroute2's package import brings
# asyncio, ndb, ipdb and conntrack.
NEVER_AT_START = ("pyroute2", "asyncio")
# The modules of verbs that are not run, and of the daemon.
OTHER_VERBS = ("larkns.doctor", "larkns.seal", "larkns.daemon")


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_larkns_run_loads_no_pyroute2_asyncio_or_other_verbs(clean_world: World) -> None:
    code = _MODULES_AFTER.format(call='assert cli.main(["run", "--", "true"]) == 0')
    out = subprocess.run(
        clean_world.worker_cmd(sys.executable, "-c", code),
        env=clean_world.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    modules = out.stdout.split()
    assert "larkns.engine" in modules  # the job did run through the engine
    assert _loaded(modules, NEVER_AT_START) == []
    assert _loaded(modules, OTHER_VERBS) == []


def test_the_command_line_alone_loads_no_verb() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER.format(call="")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = out.stdout.split()
    verbs = ("larkns.run", "larkns.engine", *OTHER_VERBS, *NEVER_AT_START)
    assert _loaded(modules, verbs) == []
