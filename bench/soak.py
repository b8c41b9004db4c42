"""Soak: larknsd serves thousands of job starts and ends, with a wrapper, a
job or larknsd itself killed by SIGKILL every few dozen, and afterwards
everything it holds is back where it started: its file descriptors and
threads, the worker's job namespaces, links and nft counters and map
elements, address leases and journal records.  Its memory is printed.

Runs in a throwaway worker namespace (lkb*), as HTCondor would start jobs
(the wrapper, as root; through larknsd).

    .venv/bin/python bench/soak.py [--jobs 2000] [--every 37]

Exit status 1 if anything is not back where it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_daemon import Larknsd, serving
from tests.world import World, sh


def held(world: World, daemon: Larknsd) -> dict[str, int]:
    """What larknsd and the worker hold that grows with jobs."""
    pid = daemon.proc.pid
    nft = json.loads(sh("nft", "-j", "list", "ruleset", ns=world.worker).stdout or "{}")
    counters = elements = 0
    for item in nft.get("nftables", []):
        if "counter" in item:
            counters += 1
        for kind in ("map", "set"):
            if kind in item:
                elements += len(item[kind].get("elem", []))
    links = sh("ip", "-o", "link", "show", ns=world.worker).stdout
    state = world.state_dir
    leases, jobs = state / "leases", state / "jobs"
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "netns": sum(1 for n in os.listdir("/run/netns") if n.startswith(world.netns_prefix)),
        "links": sum(1 for line in links.splitlines() if ": lk-" in line),
        "nft counters": counters,
        "nft elements": elements,
        "leases": sum(1 for _ in leases.rglob("*")) if leases.exists() else 0,
        "journal": sum(1 for _ in jobs.glob("*")) if jobs.exists() else 0,
    }


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process, kB."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


PROCESS = ("fds", "threads")  # larknsd's own: a restarted one starts anew


def settle(
    world: World, daemon: Larknsd, want: dict[str, int], timeout: float = 30
) -> dict[str, int]:
    """What is held once the kernel and larknsd have finished with the last
    jobs (namespace cleanup is asynchronous): when the kernel's objects are
    as in `want`, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        now = held(world, daemon)
        same = all(now[k] == want[k] for k in now if k not in PROCESS)
        if same or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--every", type=int, default=37, help="one kill per this many jobs")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    world = World(prefix="lkb")
    try:
        with serving(world) as daemon:
            wrapped = world.worker_cmd(str(daemon.wrapper))

            def warm_up() -> dict[str, int]:
                for _ in range(5):  # lazily made sockets and threads
                    subprocess.run([*wrapped, "/bin/true"], check=True, cwd="/")
                # Once the kernel has removed what the last jobs' namespaces
                # took along (asynchronously): no job's link or namespace.
                deadline = time.monotonic() + 30
                while True:
                    now = held(world, daemon)
                    if (now["links"], now["netns"]) == (0, 0) or time.monotonic() > deadline:
                        return now
                    time.sleep(0.1)

            start = warm_up()
            mem0 = memory_kb(daemon.proc.pid)
            kills = {"wrapper": 0, "job": 0, "larknsd": 0}
            failures = 0
            t0 = time.monotonic()
            for i in range(1, args.jobs + 1):
                if i % args.every:
                    p = subprocess.run(
                        [*wrapped, "/bin/sh", "-c", "exit 3"], capture_output=True, cwd="/"
                    )
                    failures += p.returncode != 3
                    continue
                victim = rnd.choice(sorted(kills))
                kills[victim] += 1
                job = subprocess.Popen(
                    [*wrapped, "/bin/sh", "-c", "echo $$; exec sleep 30"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    cwd="/",
                )
                assert job.stdout is not None
                job_pid = int(job.stdout.readline())
                if victim == "wrapper":
                    job.kill()
                elif victim == "job":
                    os.kill(job_pid, signal.SIGKILL)
                else:
                    daemon.restart(signal.SIGKILL)
                    # Killed before it told the wrapper the job is running, the
                    # job is gone with the wrapper; else its end reaches the new
                    # larknsd.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(job_pid, signal.SIGTERM)
                job.wait(timeout=60)
                if victim == "larknsd":
                    # A new process: its own descriptors and threads, once warm,
                    # are what the end is compared with.
                    settle(world, daemon, start)
                    fresh = warm_up()
                    start = {k: fresh[k] if k in PROCESS else start[k] for k in start}
            took = time.monotonic() - t0
            end = settle(world, daemon, start)
            mem1 = memory_kb(daemon.proc.pid)
            print(
                f"{args.jobs} jobs in {took:.0f} s ({args.jobs / took:.0f}/s), kills {kills}, "
                f"failed starts {failures}"
            )
            print(f"{'':<14} {'start':>7} {'end':>7}")
            for key in start:
                mark = "" if start[key] == end[key] else "   <- not back"
                print(f"{key:<14} {start[key]:>7} {end[key]:>7}{mark}")
            print(
                f"larknsd memory: RSS {mem0[0]} -> {mem1[0]} kB, PSS {mem0[1]} -> {mem1[1]} kB "
                "(a restart resets it: compare within the last stretch)"
            )
            return 0 if start == end and failures == 0 else 1
    finally:
        world.close()


if __name__ == "__main__":
    sys.exit(main())
