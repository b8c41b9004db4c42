"""Added latency of a job start through larkns's wrapper + larknsd.

Runs in a throwaway worker namespace (lkb*), with larknsd beside it, as
HTCondor would start a job: the wrapper (larkns-entry, a static C program)
asks larknsd, which builds the job's network (NAT, IPv4 + SLAAC IPv6) and starts
the job in it.  Baseline in the same run: the same command started directly.

    .venv/bin/python bench/job_start.py [--starts 200] [--concurrent 32]

Target: <= 50 ms added at p50.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_daemon import serving
from tests.world import World


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd="/")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=32)
    args = ap.parse_args()
    world = World(prefix="lkb")
    try:
        with serving(world) as daemon:
            job = ["/bin/true"]
            direct = world.worker_cmd(*job)
            wrapped = world.worker_cmd(str(daemon.wrapper), *job)
            for _ in range(5):  # warm-up
                timed(direct)
                timed(wrapped)
            base: list[float] = []
            ours: list[float] = []
            for _ in range(args.starts):  # interleaved: drift hits both alike
                base.append(timed(direct))
                ours.append(timed(wrapped))
            added50 = pct(ours, 50) - pct(base, 50)
            added99 = pct(ours, 99) - pct(base, 99)
            for label, xs in (("direct start", base), ("wrapper + larknsd", ours)):
                print(
                    f"{label:<22} p50 {pct(xs, 50) * 1e3:7.2f} ms  p99 {pct(xs, 99) * 1e3:7.2f} ms"
                )
            print(
                f"added by larkns        p50 {added50 * 1e3:7.2f} ms  p99 {added99 * 1e3:7.2f} ms  "
                f"(target <= 50 ms at p50; n={args.starts})"
            )

            errors: list[str] = []
            times: list[float] = []
            lock = threading.Lock()

            def one() -> None:
                t0 = time.perf_counter()
                p = subprocess.run(wrapped, capture_output=True, text=True, cwd="/")
                with lock:
                    times.append(time.perf_counter() - t0)
                    if p.returncode != 0:
                        errors.append(p.stderr.strip())

            threads = [threading.Thread(target=one) for _ in range(args.concurrent)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            print(
                f"{args.concurrent} concurrent starts  all done in {wall * 1e3:.0f} ms, "
                f"each p50 {pct(times, 50) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms, "
                f"errors {len(errors)}"
            )
            for e in errors[:3]:
                print(f"  error: {e}")
    finally:
        world.close()


if __name__ == "__main__":
    main()
