"""larknsd started by condor_master (DAEMON_LIST), as a site may run it."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.condor import Pool, require_htcondor
from tests.jobside import wrapper_copy
from tests.test_condor import node_config
from tests.world import World


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_larknsd_under_condor_master_serves_jobs_and_goes_with_its_master(world: World) -> None:
    require_htcondor()
    copy = wrapper_copy()
    sock = f"/tmp/{world.prefix}-larknsd.sock"
    # condor_master checks as the condor user that it may run LARKNSD (then
    # runs it as root): a world-readable launcher, wherever the checkout is.
    launcher = copy / "larknsd-under-master"
    launcher.write_text(f'#!/bin/sh\nexec {Path(sys.executable).parent / "larknsd"} "$@"\n')
    launcher.chmod(0o755)
    # The master gives larknsd CONDOR_CONFIG and nothing else: every knob,
    # the socket among them, comes from the configuration.
    config = node_config(world, copy, "--under-master", f"--larknsd={launcher}")
    pool = Pool(world, extra_config=config)
    try:
        deadline = time.monotonic() + 30
        while not Path(sock).exists():
            assert time.monotonic() < deadline, "condor_master did not start larknsd"
            time.sleep(0.2)
        daemons = [p for p in pool.pids() if _comm(p) == "larknsd"]
        assert (
            len(daemons) == 1 and os.stat(f"/proc/{daemons[0]}").st_uid == 0
        )  # root, by the master
        cluster = pool.submit("""\
            executable = /bin/sh
            arguments = "-c 'ip -o link | cut -d: -f2'"
            output = m.out
            error = m.err
            log = m.log
            should_transfer_files = NO
            queue
            """)
        ad = pool.wait_done(cluster)
        assert ad["ExitCode"] == "0", ad
        assert [x.split("@")[0] for x in (pool.home / "m.out").read_text().split()] == [
            "lo",
            "eth0",
        ]
        # The master dies without a word to its daemons: larknsd must not
        # stay behind, unmanaged.
        assert pool.master is not None
        pool.master.send_signal(signal.SIGKILL)
        pool.master.wait()
        deadline = time.monotonic() + 10
        while _comm(daemons[0]) == "larknsd":
            assert time.monotonic() < deadline, "larknsd outlived its condor_master"
            time.sleep(0.1)
    finally:
        pool.close()
        shutil.rmtree(copy, ignore_errors=True)
    assert world.wait_no_leftovers() == []
