"""What the larkns program loads to start: every module costs every job its
import time (pyroute2's package alone was ~100 ms of a `larkns run -- true`
of ~300)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from larkns import cli
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
# What only a capped job needs (a job without a cap costs nothing of it).
CAP_ONLY = ("larkns.shaping", "larkns.kernel.tc")
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
    assert _loaded(modules, CAP_ONLY) == []


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


_WORDS = [
    *("run", "--", "--debug", "true", "x", "", "=", "-", "-1", "-h", "--help", "--priv"),
    *("--privileged", "--privileged=1", "--mode=nat", "--name=", "--user=root", "--mode="),
    *cli.RUN_VALUE_OPTIONS,
]


@settings(max_examples=2000, deadline=None)
@given(
    st.sampled_from([["run"], ["--debug", "run"], []]),
    st.lists(st.sampled_from(_WORDS), max_size=8),
)
def test_a_run_command_line_reads_the_same_without_argparse(
    head: list[str], rest: list[str]
) -> None:
    argv = head + rest
    quick = cli.quick_run(argv)
    if quick is not None:
        assert vars(quick) == vars(cli.parser().parse_args(argv, SimpleNamespace()))


def test_every_option_of_run_is_read_without_argparse() -> None:
    (verbs,) = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    run = verbs.choices["run"]
    options = [o for a in run._actions for o in a.option_strings if o not in ("-h", "--help")]
    for option in options:
        argv = ["run", option] if option == "--privileged" else ["run", option, "v"]
        assert cli.quick_run([*argv, "--", "true"]) is not None, option
