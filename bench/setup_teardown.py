"""Setup + teardown of a NAT job: larkns's engine against `ip -batch` + `nft -f`.

Runs inside a throwaway worker namespace (lkb*), never on the host's network.

    .venv/bin/python bench/setup_teardown.py [--cycles 200] [--alive 499]

Prints p50/p99 of both, their ratio, and the cost of a job with 0 vs N other
jobs alive.  Targets: p50 <= 15 ms in-process, <= 0.5x the batch-CLI baseline,
and the 500th job within 1.2x of the 1st.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larkns import config  # noqa: E402
from larkns.engine import Engine  # noqa: E402
from larkns.journal import Process  # noqa: E402
from larkns.kernel import netns  # noqa: E402
from larkns.kernel.nft import Ruleset  # noqa: E402
from larkns.kernel.ra import Advertiser  # noqa: E402
from larkns.plan import build  # noqa: E402
from tests.world import World  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def fmt(xs: list[float]) -> str:
    return f"p50 {pct(xs, 50) * 1e3:6.2f} ms  p99 {pct(xs, 99) * 1e3:6.2f} ms  (n={len(xs)})"


class LarknsJobs:
    def __init__(self, world: World, settings: config.Settings) -> None:
        self.advertiser = Advertiser()
        # A node that serves jobs all day keeps its table between jobs.
        self.engine = Engine(settings, self.advertiser, remove_table_when_idle=False)
        self.owner = Process.of(os.getpid())

    def setup(self, name: str) -> None:
        self.engine.setup(name, "nat", self.owner)

    def teardown(self, name: str) -> None:
        self.engine.teardown(name)

    def close(self) -> None:
        self.engine.close()
        self.advertiser.close()


class BatchCliJobs:
    """The same objects (netns, veth, addresses, routes, nft chain/counters/map
    entries in the shared table) made with one `ip -batch` and one `nft -f`."""

    def __init__(self, world: World, settings: config.Settings) -> None:
        self.settings = settings
        self.prefix = settings.ipv6_prefix
        assert self.prefix is not None
        self.slot = 0
        self.plans: dict[str, object] = {}
        Ruleset().ensure_table()

    def setup(self, name: str) -> None:
        assert self.prefix is not None
        self.slot = (self.slot + 1) % 4096
        p = build(self.settings, name, "nat", self.slot, self.prefix)
        self.plans[name] = p
        ns = p.netns
        ipb = "\n".join([
            f"netns add {ns}",
            f"-n {ns} link set lo up",
            f"link add {p.host_link} address {p.host_mac} type veth peer name {p.job_link} "
            f"address {p.job_mac} netns {ns}",
            f"addr add {p.ipv4_host} dev {p.host_link}",
            f"-n {ns} addr add {p.ipv4_job} dev {p.job_link}",
            f"-n {ns} link set {p.job_link} up",
            f"-n {ns} route add default via {p.ipv4_host.ip if p.ipv4_host else ''}",
            f"link set {p.host_link} up",
            f"-6 route add {p.ipv6_prefix} dev {p.host_link}",
        ])
        subprocess.run(["ip", "-batch", "-"], input=ipb, text=True, check=True)
        nf = "\n".join(
            [f"add counter inet larkns {name}-{k}" for k in ("out4", "out6", "in4", "in6", "ctl-out", "ctl-in")]
            + [
                f"add chain inet larkns from-{name}",
                f"add rule inet larkns from-{name} icmpv6 type @link_control counter name {name}-ctl-out return",
                f"add rule inet larkns from-{name} meta nfproto ipv4 counter name {name}-out4",
                f"add rule inet larkns from-{name} meta nfproto ipv6 counter name {name}-out6",
                f"add chain inet larkns to-{name}",
                f"add rule inet larkns to-{name} icmpv6 type @link_control counter name {name}-ctl-in return",
                f"add rule inet larkns to-{name} meta nfproto ipv4 counter name {name}-in4",
                f"add rule inet larkns to-{name} meta nfproto ipv6 counter name {name}-in6",
                f'add element inet larkns job_from {{ "{p.host_link}" : jump from-{name} }}',
                f'add element inet larkns job_to {{ "{p.host_link}" : jump to-{name} }}',
                f'add element inet larkns job_links {{ "{p.host_link}" }}',
                f'add element inet larkns masquerade_from {{ "{p.host_link}" }}',
            ]
        )
        subprocess.run(["nft", "-f", "-"], input=nf, text=True, check=True)

    def teardown(self, name: str) -> None:
        p = self.plans.pop(name)
        link = p.host_link  # type: ignore[attr-defined]
        nf = "\n".join(
            [f'delete element inet larkns {m} {{ "{link}" }}'
             for m in ("job_from", "job_to", "job_links", "masquerade_from")]
            + [f"flush chain inet larkns {c}-{name}\ndelete chain inet larkns {c}-{name}" for c in ("from", "to")]
            + [f"delete counter inet larkns {name}-{k}" for k in ("out4", "out6", "in4", "in6", "ctl-out", "ctl-in")]
        )
        subprocess.run(["nft", "-f", "-"], input=nf, text=True, check=True)
        subprocess.run(["ip", "netns", "del", p.netns], check=True)  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def cycles(jobs: LarknsJobs | BatchCliJobs, n: int, tag: str) -> list[float]:
    times = []
    for i in range(n):
        name = f"{tag}{i}"
        t0 = time.perf_counter()
        jobs.setup(name)
        jobs.teardown(name)
        times.append(time.perf_counter() - t0)
    return times


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--alive", type=int, default=499)
    ap.add_argument("--scale-samples", type=int, default=30)
    args = ap.parse_args()
    world = World(prefix="lkb")
    settings = config.Settings(
        ipv4_pool=ipaddress.IPv4Network("198.19.0.0/16"),
        ipv6_prefix=ipaddress.IPv6Network(world.ipv6_prefix),
        state_dir=world.state_dir,
        netns_prefix=world.netns_prefix,
    )
    try:
        with netns.entered(world.worker):
            lark = LarknsJobs(world, settings)
            try:
                cycles(lark, 20, "w")  # warm-up
                ours = cycles(lark, args.cycles, "a")
            finally:
                lark.close()
            cli = BatchCliJobs(world, settings)
            cycles(cli, 10, "v")
            base = cycles(cli, args.cycles, "b")
            # cli jobs were made under the larkns table; the engine removes it when idle
            Ruleset().delete_table()

            print(f"larkns engine, setup+teardown      {fmt(ours)}")
            print(f"ip -batch + nft -f, setup+teardown {fmt(base)}")
            print(f"ratio larkns/baseline p50 {pct(ours, 50) / pct(base, 50):.2f}x  "
                  f"p99 {pct(ours, 99) / pct(base, 99):.2f}x  (target p50 <= 0.5x, <= 15 ms)")

            lark = LarknsJobs(world, settings)
            try:
                first = cycles(lark, args.scale_samples, "f")
                t_fill = timed(lambda: [lark.setup(f"z{i}") for i in range(args.alive)] and None)
                later = cycles(lark, args.scale_samples, "l")
                t_drain = timed(lambda: [lark.teardown(f"z{i}") for i in range(args.alive)] and None)
            finally:
                for i in range(args.alive):
                    lark.teardown(f"z{i}")
                lark.close()
            Ruleset().delete_table()
            print(f"job with 0 others alive            {fmt(first)}")
            print(f"job with {args.alive} others alive          {fmt(later)}")
            print(f"ratio {args.alive + 1}th/1st p50 {pct(later, 50) / pct(first, 50):.2f}x  (target <= 1.2x); "
                  f"{args.alive} setups took {t_fill:.2f} s, their teardowns {t_drain:.2f} s")
    finally:
        world.close()


if __name__ == "__main__":
    main()
