"""On a distribution kernel, larkns takes the other branch of what it detects.

These run in the VM tier's guest only (python -m tests.vm sets
LKT_VM_GUEST): Debian 12's stock kernel, which has the queue disciplines
this project's development kernel lacks, loadable modules and a cgroup v2
hierarchy.  The same features' tests elsewhere (test_shaping, test_uplink,
test_engine) assert only that larkns uses what the kernel has; these assert
that on a site's kernel that is the better branch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from larkns.kernel import tc
from tests.world import World, sh

if not os.environ.get("LKT_VM_GUEST"):
    pytest.skip("runs in the VM tier's guest only (python -m tests.vm)", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("needs root: builds network namespaces", allow_module_level=True)

# What every Debian and EL kernel has (as modules): larkns must find each.
QDISCS = ("fq", "fq_codel", "sfq", "cake", "prio", "netem")


def doctor(world: World) -> list[str]:
    proc = subprocess.run(
        world.worker_cmd(str(Path(sys.executable).parent / "larkns"), "doctor"),
        capture_output=True,
        text=True,
        env=world.env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_the_doctor_finds_every_queue_discipline_of_the_distribution_kernel(
    clean_world: World,
) -> None:
    lines = doctor(clean_world)
    for kind in QDISCS:
        said = [x for x in lines if x.split()[1:3] == ["qdisc", kind]]
        assert said and said[0].startswith("ok"), (kind, lines)
    shaping = next(x for x in lines if "shaping (per-job caps)" in x)
    assert shaping.startswith("ok") and "HTB with fq_codel leaves" in shaping, shaping


def test_the_leaf_under_a_cap_is_fq_codel() -> None:
    assert tc.leaf() == "fq_codel"


def test_a_capped_jobs_ends_hold_fq_codel_and_its_classes_in_the_share_a_fifo(
    clean_world: World,
) -> None:
    name = "lktvmcap"
    job = clean_world.serving(
        "run", "--name", name, "--bandwidth", "20mbit/10mbit", "--",
        "sh", "-c", "echo ready; sleep 30",
        knobs={"LARKNS_UPLINK_BANDWIDTH": "40mbit", "LARKNS_UPLINK": "up0"},
    )  # fmt: skip
    try:
        down = sh("tc", "qdisc", "show", "dev", f"lk-{name}", ns=clean_world.worker).stdout
        up = sh("tc", "qdisc", "show", "dev", f"lkb{name}", ns=clean_world.worker).stdout
        shared = [
            sh("tc", "qdisc", "show", "dev", dev, ns=clean_world.worker).stdout
            for dev in ("lkshare.down", "lkshare.up")
        ]
    finally:
        job.terminate()  # reaches the command; larkns run then tears down
        job.communicate(timeout=60)
    for shown in (down, up):
        assert "htb 1: root" in shown, shown
        assert "qdisc fq_codel" in shown and "parent 1:" in shown, shown
    # The share's classes: a FIFO even here (larkns/kernel/uplink.py, LEAF).
    for shown in shared:
        assert "qdisc bfifo" in shown and "parent 4c4b:" in shown, shown
        assert "fq_codel" not in shown, shown


def test_the_hierarchy_is_cgroup_v2_alone() -> None:
    # Sites' systemd mounts only the unified hierarchy; the C core's
    # CLONE_INTO_CGROUP (tests/test_core.py) then has real controllers.
    with open("/proc/self/mountinfo") as f:
        kinds = {line.split(" - ")[1].split()[0] for line in f if " - cgroup" in line}
    assert kinds == {"cgroup2"}, kinds
    controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    assert {"cpu", "memory", "pids"} <= set(controllers), controllers
