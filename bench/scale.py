"""Thousands of live jobs on one node: what grows with their count.

Brings up N live nat jobs (default 500, 1000, 2000, 4000) with one in-process
engine, as larknsd serves them (one process, one router advertiser), inside
a throwaway worker namespace (lktz*), never on the host's network.  A job is
its namespace and link (no process inside).  For each N, from nothing:

- setup + teardown of one more job with N alive, against the 1st's (p50);
- a reachability sweep: every job sends one ICMP echo to the site on each
  family (raw sockets opened in each job's namespace, all sent, then all
  replies awaited), up to three rounds for the ones that did not answer;
- memory per job: kernel slab (/proc/meminfo) and this process's RSS;
- descriptors and threads of this process, neighbour entries (the kernel's
  tables are global: /proc/net/stat/{arp,ndisc}_cache) and how often they
  were full (table_fulls);
- gc with N alive, and the teardown of all N, then the time until the kernel
  has removed their links.

The keeper (one per job under larknsd, not involved in-process) is
bench/memory.py's: 49 kB PSS.

    .venv/bin/python bench/scale.py [--counts 500,1000,2000,4000] [--samples 20]

Targets: all reachable at 4,000; the 4,000th job's setup + teardown within
1.3x of the 1st; userspace <= 1 MB per job; teardown of 4,000 within 60 s.
It stops before a count when less than --min-free-gb of memory is free.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larkns import config
from larkns.engine import Engine
from larkns.journal import Process
from larkns.kernel import netns
from larkns.kernel.ra import Advertiser
from larkns.modes.nat import NatNetwork
from tests.world import SITE4, SITE6, World, sh

KEEPER_KB = 49  # bench/memory.py: a keeper's PSS under larknsd
POOL4 = "198.19.0.0/19"
FAMILIES: list[tuple[int, int]] = [
    (socket.AF_INET, socket.IPPROTO_ICMP),
    (socket.AF_INET6, socket.IPPROTO_ICMPV6),
]  # 4096 /31s, within 198.18.0.0/15


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k == key:
            return int(v.split()[0])
    raise KeyError(key)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def neighbours(table: str) -> tuple[int, int]:
    """(entries, table_fulls) of the kernel's neighbour table `table`
    (arp_cache, ndisc_cache): global, every namespace's entries."""
    lines = Path(f"/proc/1/net/stat/{table}").read_text().splitlines()
    head = lines[0].split()
    rows = [[int(x, 16) for x in line.split()] for line in lines[1:]]
    return rows[0][head.index("entries")], sum(r[head.index("table_fulls")] for r in rows)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def echo(family: int, ident: int) -> bytes:
    kind = 8 if family == socket.AF_INET else 128
    head = struct.pack("!BBHHH", kind, 0, 0, ident, 1) + b"larkns-scale"
    if family == socket.AF_INET6:
        return head  # the kernel fills in ICMPv6's checksum
    s = sum(struct.unpack(f"!{len(head) // 2}H", head))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return head[:2] + struct.pack("!H", ~s & 0xFFFF) + head[4:]


def is_reply(family: int, data: bytes, ident: int) -> bool:
    if family == socket.AF_INET:
        data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets get the header
        kind = 0
    else:
        kind = 129
    return len(data) >= 8 and data[0] == kind and struct.unpack("!H", data[4:6])[0] == ident


def ping_all(nets: list[str], timeout: float = 2.0, batch: int = 1000) -> set[tuple[str, int]]:
    """(netns, family) of those whose echo to the site went unanswered: one
    raw socket per job and family, opened in the job's namespace."""
    missing: set[tuple[str, int]] = set()
    for i in range(0, len(nets), batch):
        socks: dict[int, tuple[socket.socket, str, int, int]] = {}
        try:
            for j, ns in enumerate(nets[i : i + batch]):
                with netns.entered(ns):
                    for fam, proto in FAMILIES:
                        s = socket.socket(fam, socket.SOCK_RAW | socket.SOCK_NONBLOCK, proto)
                        ident = (i + j) & 0xFFFF
                        socks[s.fileno()] = (s, ns, fam, ident)
            poller = select.poll()
            for fd, (s, _, fam, ident) in socks.items():
                dst = SITE4 if fam == socket.AF_INET else SITE6
                try:
                    s.sendto(echo(fam, ident), (dst, 0))
                except OSError:
                    continue  # not yet routable: counted as unanswered
                poller.register(fd, select.POLLIN)
            answered: set[int] = set()
            deadline = time.monotonic() + timeout
            while len(answered) < len(socks) and time.monotonic() < deadline:
                for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    s, _, fam, ident = socks[fd]
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            if is_reply(fam, s.recv(2048), ident):
                                answered.add(fd)
                                poller.unregister(fd)
                                break
            missing |= {(ns, fam) for fd, (_, ns, fam, _) in socks.items() if fd not in answered}
        finally:
            for s, *_ in socks.values():
                s.close()
    return missing


def host_links(world: World) -> int:
    out = sh("ip", "-o", "link", "show", ns=world.worker).stdout
    return sum(1 for line in out.splitlines() if ": lk-" in line)


def settle(world: World, timeout: float = 300) -> float:
    """Seconds until the worker holds no job link (the kernel removes a
    namespace's links asynchronously)."""
    t0 = time.perf_counter()
    while host_links(world) and time.perf_counter() - t0 < timeout:
        time.sleep(0.2)
    return time.perf_counter() - t0


class Node:
    def __init__(self, world: World) -> None:
        self.settings = config.Settings(
            ipv4_pool=ipaddress.IPv4Network(POOL4),
            ipv6_prefix=ipaddress.IPv6Network(world.ipv6_prefix),
            state_dir=world.state_dir,
            netns_prefix=world.netns_prefix,
        )
        self.advertiser = Advertiser()
        self.engine = Engine(self.settings, self.advertiser, clean_when_idle=False)
        self.owner = Process.of(os.getpid())
        self.plans: dict[str, NatNetwork] = {}

    def setup(self, name: str) -> None:
        plan = self.engine.setup(name, "nat", self.owner)
        assert isinstance(plan, NatNetwork)
        self.plans[name] = plan

    def teardown(self, name: str) -> None:
        self.engine.teardown(name)
        del self.plans[name]

    def cycles(self, n: int, tag: str) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            self.setup(f"{tag}{i}")
            self.teardown(f"{tag}{i}")
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        for name in list(self.plans):
            with contextlib.suppress(Exception):
                self.teardown(name)
        self.engine.close()
        self.advertiser.close()


@contextlib.contextmanager
def timed(out: list[float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    out.append(time.perf_counter() - t0)


def run_count(world: World, node: Node, n: int, first: float, samples: int) -> bool:
    """Bring up n jobs, measure, tear all down; False if they were not all
    reachable or something was left."""
    slab0, rss0 = meminfo("Slab"), rss_kb()
    arp0, arpfull0 = neighbours("arp_cache")
    nd0, ndfull0 = neighbours("ndisc_cache")
    fds0, threads0 = len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
    names = [f"s{i}" for i in range(n)]
    t: list[float] = []
    with timed(t):
        for name in names:
            node.setup(name)
    fill = t[-1]
    time.sleep(2.0)  # the RAs' repeats at +0.5 s and +1.5 s
    nets = [node.plans[name].netns for name in names]
    sweeps: list[float] = []
    missing: set[tuple[str, int]] = set()
    for _ in range(3):
        with timed(sweeps):
            missing = ping_all(nets if not sweeps else sorted({ns for ns, _ in missing}))
        if not sweeps or len(sweeps) == 1:
            first_missing = len(missing)
        if not missing:
            break
    slab1, rss1 = meminfo("Slab"), rss_kb()
    arp1, arpfull1 = neighbours("arp_cache")
    nd1, ndfull1 = neighbours("ndisc_cache")
    fds1, threads1 = len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
    more = node.cycles(samples, "m")
    gc_t: list[float] = []
    with timed(gc_t):
        swept = node.engine.gc()
    teardown: list[float] = []
    with timed(teardown):
        for name in names:
            node.teardown(name)
    gone = settle(world)
    # The table and the state dir stay (a node keeps them between jobs).
    left = [x for x in world.leftovers() if x.startswith(("netns", "link", "state slots/"))]
    left = [x for x in left if x != "state slots/next"]
    r = pct(more, 50) / first
    lost4 = sum(1 for _, f in missing if f == socket.AF_INET)
    print(f"N = {n}")
    print(f"  setup of all {n}                 {fill:7.2f} s ({fill / n * 1e3:.2f} ms/job)")
    print(
        f"  one more job, setup+teardown   p50 {pct(more, 50) * 1e3:6.2f} ms  "
        f"p99 {pct(more, 99) * 1e3:6.2f} ms  = {r:.2f}x the 1st (target <= 1.3x)"
    )
    print(
        f"  reachability sweep             {sweeps[0]:6.2f} s for {2 * n} echoes; "
        f"unanswered at first {first_missing}, after {len(sweeps)} round(s) "
        f"{len(missing)} (IPv4 {lost4}, IPv6 {len(missing) - lost4})"
    )
    print(
        f"  memory per job                 slab {(slab1 - slab0) / n:6.1f} kB, "
        f"this process's RSS {(rss1 - rss0) / n:6.1f} kB (+ keeper {KEEPER_KB} kB PSS) "
        f"[RSS {rss0} -> {rss1} kB]"
    )
    print(
        f"  this process                   fds {fds0} -> {fds1}, threads {threads0} -> {threads1}"
    )
    print(
        f"  neighbour entries (global)     IPv4 {arp0} -> {arp1} (table full "
        f"{arpfull1 - arpfull0} times), IPv6 {nd0} -> {nd1} (full {ndfull1 - ndfull0} times)"
    )
    removed = swept.removed or "nothing"
    print(f"  gc with {n} alive               {gc_t[0]:6.2f} s  (removed {removed})")
    print(
        f"  teardown of all {n}              {teardown[0]:6.2f} s, links gone "
        f"{gone:6.2f} s later; left: {left or 'nothing'}"
    )
    sys.stdout.flush()
    return not missing and not left


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="500,1000,2000,4000")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--min-free-gb", type=float, default=4.0)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    world = World(prefix="lktz")
    ok = True
    try:
        with netns.entered(world.worker):
            node = Node(world)
            try:
                node.cycles(10, "w")
                first = pct(node.cycles(args.samples, "f"), 50)
                print(f"the 1st job, setup+teardown p50 {first * 1e3:.2f} ms")
                for n in counts:
                    free_gb = meminfo("MemAvailable") / 2**20
                    if free_gb < args.min_free_gb + n * 1e-3:  # ~1 MB a job, with room
                        print(f"N = {n}: not run, {free_gb:.1f} GB available")
                        break
                    ok = run_count(world, node, n, first, args.samples) and ok
            finally:
                node.close()
                node.engine.journal.remove_dir_if_unused()
    finally:
        world.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
