"""A job's cap: what it costs to set up and tear down, and how close to the
cap a job runs.

Runs inside a throwaway site and worker (namespaces lkts*), never on the
host's network.

    .venv/bin/python bench/shaping.py [--cycles 100] [--seconds 5] [--rates 10,100,1000]

Prints setup and teardown p50/p99 of a capped NAT job against an uncapped
one (in-process, cycles interleaved so drift hits both alike; as larknsd
does, keeping IFBs, and as `larkns run` does, deleting them), and for each
rate (Mbit/s) the TCP payload a job got downloading (IPv4) and uploading
(IPv6) over --seconds, against the cap: whole run, first second, after it.
Payload is ~95% of the cap, which counts link-layer bytes.  Then the
round trip of a ping from the job, idle and while a download fills its cap
(the queueing delay its leaf adds).  Figures only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def rates(world: World, mbits: list[int], seconds: float) -> None:
    sink = subprocess.Popen(
        ["ip", "netns", "exec", world.site, sys.executable, RATE, "sink", str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
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
    finally:
        sink.kill()
        sink.wait()
        if sink.stdout:
            sink.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rates", default="10,100,1000", help="caps to measure, Mbit/s")
    args = ap.parse_args()
    world = World(prefix="lkts")
    try:
        cost(world, args.cycles, clean_when_idle=False)
        cost(world, args.cycles // 2, clean_when_idle=True)
        rates(world, [int(r) for r in args.rates.split(",") if r], args.seconds)
    finally:
        world.close()


if __name__ == "__main__":
    main()
