"""What larknsd's metrics cost: its RSS without them, with them before and
after scrapes, and the time a scrape takes with N jobs alive (each a
`sleep`, started through the wrapper as HTCondor would).

Runs in a throwaway world (lktm*); the machine is shared, so times vary.

    .venv/bin/python bench/metrics.py [--jobs 100] [--scrapes 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_daemon import Larknsd, _wait_for, json_jobs, serving
from tests.test_metrics import ADDRESS, scrape
from tests.world import World


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def jobs_up(d: Larknsd, world: World, count: int) -> list[subprocess.Popen[str]]:
    jobs = [d.job_popen("/bin/sh", "-c", "echo up; exec sleep 600") for _ in range(count)]
    for p in jobs:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
    _wait_for(
        "every job's record",
        lambda: sum(n.endswith(".json") for n in json_jobs(world)) == count,
        timeout=60,
    )
    time.sleep(1.5)  # the flush watcher's first reading of every job
    return jobs


def jobs_down(jobs: list[subprocess.Popen[str]], world: World) -> None:
    for p in jobs:
        p.kill()
    for p in jobs:
        p.communicate(timeout=30)
    _wait_for("no job left", lambda: not json_jobs(world), timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=20)
    args = ap.parse_args()
    world = World("lktm")
    try:
        with serving(world) as d:
            jobs = jobs_up(d, world, args.jobs)
            off = rss_kb(d.proc.pid)
            jobs_down(jobs, world)
        with serving(world, LARKNS_METRICS=ADDRESS) as d:
            jobs = jobs_up(d, world, args.jobs)
            on = rss_kb(d.proc.pid)
            times = []
            for _ in range(args.scrapes):
                start = time.perf_counter()
                samples = scrape(world)
                times.append(time.perf_counter() - start)
            assert samples[("larkns_jobs", frozenset())] == args.jobs
            scraped = rss_kb(d.proc.pid)
            jobs_down(jobs, world)
        times.sort()
        print(f"jobs alive: {args.jobs}")
        print(f"larknsd RSS without metrics: {off} kB")
        print(f"larknsd RSS with metrics, before a scrape: {on} kB (+{on - off} kB)")
        print(f"larknsd RSS after {args.scrapes} scrapes: {scraped} kB (+{scraped - off} kB)")
        print(
            f"scrape: p50 {1000 * statistics.median(times):.1f} ms, "
            f"max {1000 * times[-1]:.1f} ms, {len(samples)} samples"
        )
    finally:
        world.close()


if __name__ == "__main__":
    main()
