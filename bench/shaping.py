"""A job's cap: what it costs to set up and tear down, and how close to the
cap a job runs.

Runs inside a throwaway site and worker (namespaces lkts*), never on the
host's network.

    .venv/bin/python bench/shaping.py [--cycles 100] [--seconds 5] [--rates 10,100,1000]
        [--fairness 2,8,32] [--uplink 100] [--only cost,rates,fairness]

Prints setup and teardown p50/p99 of a capped NAT job against an uncapped
one (in-process, cycles interleaved so drift hits both alike; as larknsd
does, keeping IFBs, and as `larkns run` does, deleting them), and for each
rate (Mbit/s) the TCP payload a job got downloading (IPv4) and uploading
(IPv6) over --seconds, against the cap: whole run, first second, after it.
Payload is ~95% of the cap, which counts link-layer bytes.  Then the
round trip of a ping from the job, idle and while a download fills its cap
(the queueing delay its leaf adds).

Then the uplink shared by weight (LARKNS_UPLINK_BANDWIDTH at --uplink
Mbit/s both ways, on the worker's up0): for each count in --fairness, that
many NAT jobs of weight 1 download (IPv4), then upload (IPv6), all at
once for --seconds; per direction, Jain's index of the jobs' rates after
the first second (1 is even; target >= 0.95 at 32 jobs), the least and
most a job got, and the total while all were busy against the capacity
(~0.95 to ~0.99 is full: HTB counts a GSO packet's headers once).  Then two
jobs of weights 1 and 3: the share each got while both were busy, and
after the first second (expected 0.25, 0.75).  Figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larkns import config
from larkns.engine import Engine
from larkns.journal import Process
from larkns.kernel import netns, tc
from larkns.kernel.ra import Advertiser
from tests.world import SITE4, SITE6, World

RATE = str(Path(__file__).resolve().parent.parent / "tests" / "rate.py")
PORT = 7781


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def fmt(xs: list[float]) -> str:
    return f"p50 {pct(xs, 50) * 1e3:6.2f} ms  p99 {pct(xs, 99) * 1e3:6.2f} ms"


def cost(world: World, cycles: int, clean_when_idle: bool) -> None:
    settings = config.Settings(
        ipv4_pool=ipaddress.IPv4Network(world.ipv4_pool),
        ipv6_prefix=ipaddress.IPv6Network(world.ipv6_prefix),
        state_dir=world.state_dir,
        netns_prefix=world.netns_prefix,
    )
    owner = Process.of(os.getpid())
    times: dict[str, list[float]] = {k: [] for k in ("setup", "teardown", "csetup", "cteardown")}
    with netns.entered(world.worker):
        advertiser = Advertiser()
        engine = Engine(settings, advertiser, clean_when_idle=clean_when_idle)
        try:
            t0 = time.perf_counter()
            leaf = tc.leaf()
            probe = time.perf_counter() - t0
            for i in range(cycles + 10):
                for cap, tag in ((None, ""), ((100_000_000, 100_000_000), "c")):
                    name = f"b{tag}{i}"
                    t0 = time.perf_counter()
                    engine.setup(name, "nat", owner, bandwidth=cap)
                    t1 = time.perf_counter()
                    engine.teardown(name)
                    t2 = time.perf_counter()
                    if i >= 10:  # warm-up
                        times[tag + "setup"].append(t1 - t0)
                        times[tag + "teardown"].append(t2 - t1)
        finally:
            engine.clean_if_idle()
            engine.close()
            advertiser.close()
    both = [a + b for a, b in zip(times["setup"], times["teardown"], strict=True)]
    cboth = [a + b for a, b in zip(times["csetup"], times["cteardown"], strict=True)]
    how = (
        "one job per process, as `larkns run`: its IFB deleted"
        if clean_when_idle
        else "a process serving many, as larknsd: IFBs kept for the next jobs"
    )
    print(f"-- {how}")
    print(f"leaf qdisc: {leaf} (probed once per process in {probe * 1e3:.1f} ms)")
    print(f"uncapped  setup    {fmt(times['setup'])}   teardown {fmt(times['teardown'])}")
    print(f"capped    setup    {fmt(times['csetup'])}   teardown {fmt(times['cteardown'])}")
    print(
        f"setup+teardown p50 uncapped {pct(both, 50) * 1e3:.2f} ms, capped "
        f"{pct(cboth, 50) * 1e3:.2f} ms: {pct(cboth, 50) / pct(both, 50):.2f}x "
        f"(p99 {pct(cboth, 99) / pct(both, 99):.2f}x; target <= 1.5x)  n={cycles}"
    )


@contextlib.contextmanager
def sinking(world: World) -> Iterator[None]:
    """tests/rate.py's sink on the site, for the while."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", world.site, sys.executable, RATE, "sink", str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        yield
    finally:
        sink.kill()
        sink.wait()
        if sink.stdout:
            sink.stdout.close()


def rates(world: World, mbits: list[int], seconds: float) -> None:
    with sinking(world):
        py = sys.executable
        for m in mbits:
            proc = world.larkns(
                "run",
                "--bandwidth",
                f"{m}mbit",
                "--",
                "sh",
                "-c",
                f"{py} {RATE} get {SITE4} {PORT} {seconds} && "
                f"{py} {RATE} put {SITE6} {PORT} {seconds} && "
                f"ping -q -c 20 -i 0.05 {SITE4} | tail -1 && "
                f"{{ {py} {RATE} get {SITE4} {PORT} {seconds} > /dev/null & }} && sleep 1.5 && "
                f"ping -q -c 30 -i 0.05 {SITE4} | tail -1 && wait",
                timeout=4 * seconds + 60,
            )
            if proc.returncode != 0:
                print(f"{m} Mbit/s: the job failed: {proc.stderr.strip()}")
                continue
            lines = proc.stdout.splitlines()
            runs = [json.loads(line) for line in lines if line.startswith("{")]
            # "rtt min/avg/max/mdev = 0.1/0.2/0.3/0.1 ms": the average
            idle, loaded = (float(x.split("=")[1].split("/")[1]) for x in lines if "rtt" in x)
            for way, r in zip(("download", "upload  "), runs, strict=True):
                cap = m * 1e6
                ratios = (r["bps"] / cap, r["first_bps"] / cap, r["steady_bps"] / cap)
                print(
                    f"{m:5d} Mbit/s {way}  achieved/target {ratios[0]:5.3f}  "
                    f"first second {ratios[1]:5.3f}  after it {ratios[2]:5.3f}"
                )
            print(
                f"{m:5d} Mbit/s ping through the job: idle {idle:.2f} ms, "
                f"under a saturating download {loaded:.2f} ms"
            )


# What rate.py prints: "bins" (bytes per BIN seconds), "steady_bps", ...
Run = dict[str, Any]
BIN = 0.1

# A rate.py client that starts its interpreter, says so, and runs only once
# told: all of a round's clients then start within milliseconds of each
# other, not spread over the second or more 32 interpreters take to start
# on a small node (which would skew their shares).
BARRIER = (
    "import json, runpy, socket, sys, threading, time\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def together(namespaces: list[str], verb: str, host: str, seconds: float) -> list[Run]:
    """rate.py `verb` from every namespace at once: what each printed."""
    client = [sys.executable, "-c", BARRIER, RATE, verb, host, str(PORT), str(seconds)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for ns in namespaces:
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, *client],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {verb} client did not start: {p.communicate()[1].strip()}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        out: list[Run] = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=seconds + 60)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"a {verb} client failed ({p.returncode}): {stderr.strip()}")
            out.append(json.loads(lines[0]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def shared(
    world: World, weights: list[float], capacity: int, seconds: float
) -> dict[str, list[Run]]:
    """Jobs of these weights in the uplink's share, downloading all at once,
    then uploading: what rate.py printed for each, per direction."""
    settings = config.Settings(
        ipv4_pool=ipaddress.IPv4Network(world.ipv4_pool),
        ipv6_prefix=ipaddress.IPv6Network(world.ipv6_prefix),
        state_dir=world.state_dir,
        netns_prefix=world.netns_prefix,
        uplink_bandwidth=(capacity, capacity),
        uplink="up0",
    )
    owner = Process.of(os.getpid())
    names: list[str] = []
    with netns.entered(world.worker):
        advertiser = Advertiser()
        engine = Engine(settings, advertiser, clean_when_idle=False)
        try:
            namespaces = []
            for i, w in enumerate(weights):
                name = f"fair{i}"
                names.append(name)
                namespaces.append(engine.setup(name, "nat", owner, weight=w).netns)
            return {
                "download": together(namespaces, "get", SITE4, seconds),
                "upload": together(namespaces, "put", SITE6, seconds),
            }
        finally:
            try:
                for name in names:
                    try:
                        engine.teardown(name)
                    except Exception as e:  # the others still go
                        print(f"job {name}: {e}", file=sys.stderr)
                engine.clean_if_idle()
            finally:
                engine.close()
                advertiser.close()


def jain(xs: list[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one has all."""
    squares = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * squares) if squares else float("nan")


def busy(runs: list[Run]) -> list[float]:
    """Each run's rate, bits/s, while all were busy: from the end of their
    first second to the end of the shortest.  They start together (to a
    few ms), but each ends when its socket buffers have drained, seconds
    after its sender stopped and at its own time; a job draining alone
    has the whole uplink, which steady_bps counts as its own."""
    start, end = round(1 / BIN), min(len(r["bins"]) for r in runs)
    if end <= start:
        return [float(r["steady_bps"]) for r in runs]
    return [8 * sum(r["bins"][start:end]) / ((end - start) * BIN) for r in runs]


def fairness(world: World, counts: list[int], mbit: int, seconds: float) -> None:
    capacity = mbit * 1_000_000
    with sinking(world):
        for n in counts:
            for way, runs in shared(world, [1.0] * n, capacity, seconds).items():
                xs = [float(r["steady_bps"]) for r in runs]
                print(
                    f"fairness {n:3d} jobs  {way:8s}  Jain {jain(xs):.3f}  "
                    f"total {sum(busy(runs)) / capacity:.3f} of {mbit} Mbit/s  "
                    f"per job min {min(xs) / 1e6:.2f} max {max(xs) / 1e6:.2f} Mbit/s"
                )
        weights = [1.0, 3.0]
        expected = " ".join(f"{w / sum(weights):.3f}" for w in weights)
        for way, runs in shared(world, weights, capacity, seconds).items():
            xs = busy(runs)
            steady = [float(r["steady_bps"]) for r in runs]
            print(
                f"weighted   2 jobs  {way:8s}  weights 1:3  shares "
                f"{' '.join(f'{x / sum(xs):.3f}' for x in xs)} (expected {expected}; "
                f"after the first second {' '.join(f'{x / sum(steady):.3f}' for x in steady)})  "
                f"total {sum(xs) / capacity:.3f} of {mbit} Mbit/s"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rates", default="10,100,1000", help="caps to measure, Mbit/s")
    ap.add_argument("--fairness", default="2,8,32", help="how many jobs share the uplink")
    ap.add_argument("--uplink", type=int, default=100, help="the uplink's capacity, Mbit/s")
    ap.add_argument(
        "--only",
        default="cost,rates,fairness",
        help="the sections to run, of cost,rates,fairness (default: all)",
    )
    args = ap.parse_args()
    only = {x for x in args.only.split(",") if x}
    if only - {"cost", "rates", "fairness"}:
        ap.error(f"--only: no section {', '.join(sorted(only - {'cost', 'rates', 'fairness'}))}")
    world = World(prefix="lkts")
    try:
        if "cost" in only:
            cost(world, args.cycles, clean_when_idle=False)
            cost(world, args.cycles // 2, clean_when_idle=True)
        if "rates" in only:
            rates(world, [int(r) for r in args.rates.split(",") if r], args.seconds)
        if "fairness" in only:
            counts = [int(n) for n in args.fairness.split(",") if n]
            fairness(world, counts, args.uplink, args.seconds)
    finally:
        world.close()


if __name__ == "__main__":
    main()
