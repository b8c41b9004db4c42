"""larkns-condor-config: the HTCondor configuration a site installs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = str(Path(sys.executable).parent / "larkns-condor-config")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOOL, *args], capture_output=True, text=True, timeout=30)


def test_the_configuration_names_this_installation_s_programs() -> None:
    out = run("--bindir=/opt/lk/bin", "--set", "LARKNS_CLASSES = Campus = 198.18.0.0/15")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "USER_JOB_WRAPPER = /opt/lk/bin/larkns-wrapper" in lines
    assert "LARKNS_HOOK_PREPARE_JOB = /opt/lk/bin/larkns-prepare-job" in lines
    assert "STARTD_CRON_LARKNS_EXECUTABLE = /opt/lk/bin/larkns-machine-ad" in lines
    assert "   SET WantIOProxy true" in lines
    assert "LARKNS_CLASSES = Campus = 198.18.0.0/15" in lines
    # larknsd under systemd by default: the master's lines are comments.
    assert "# DAEMON_LIST = $(DAEMON_LIST) LARKNSD" in lines
    master = run("--bindir=/opt/lk/bin", "--under-master").stdout.splitlines()
    assert "DAEMON_LIST = $(DAEMON_LIST) LARKNSD" in master
    assert "LARKNSD = /opt/lk/bin/larknsd" in master


def test_by_default_the_programs_are_the_ones_beside_it() -> None:
    out = run()
    assert f"USER_JOB_WRAPPER = {Path(TOOL).parent / 'larkns-wrapper'}" in out.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "LARKNS_CLASES=x"], "LARKNS_CLASES is no larkns knob"),
        (["--set", "novalue"], "expected NAME=VALUE"),
        (["--wrapper", "relative/w"], "expected an absolute path"),
        (["--cron-period", "often"], "--cron-period"),
    ],
)
def test_bad_arguments_get_a_one_line_error(args: list[str], words: str) -> None:
    out = run(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_file_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "50-larkns.conf"
    target.write_text("old\n")
    assert run("-o", str(target)).returncode == 0
    assert target.read_text().startswith("# larkns:")
    assert [p.name for p in tmp_path.iterdir()] == ["50-larkns.conf"]
