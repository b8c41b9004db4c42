"""larknsd started by condor_master (DAEMON_LIST), as a site may run it."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.condor import Pool, larkns_config, require_htcondor
from tests.jobside import hook_script, wrapper_copy, wrapper_script
from tests.world import World


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_larknsd_under_condor_master_serves_jobs_and_goes_with_its_master(world: World) -> None:
    require_htcondor()
    copy = wrapper_copy()
    sock = f"/tmp/{world.prefix}-master-larknsd.sock"
    env = " ".join(f"{k}={v}" for k, v in world.env().items() if k.startswith("LARKNS_"))
    launcher = copy / "larknsd-under-master"
    launcher.write_text(
        f"#!/bin/sh\nexport {env} LARKNS_SOCKET={sock}\n"
        f"exec {Path(sys.executable).parent / 'larknsd'}\n"
    )
    launcher.chmod(0o755)
    wrapper = wrapper_script(copy, sock)
    hook = hook_script(copy, sock)
    config = larkns_config(
        "--under-master",
        f"--larknsd={launcher}",
        f"--wrapper={wrapper}",
        f"--prepare-hook={hook}",
        f"--machine-ad={hook_script(copy, sock, 'machine_ad')}",
    )
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
