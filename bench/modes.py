"""Per network type: time to a usable address, and TCP throughput job -> site.

Runs in throwaway namespaces (lkb*): a site with an iperf3 server, a worker
where larkns builds the job's network, never the host's network.

    .venv/bin/python bench/modes.py [--jobs 20] [--seconds 3] [--runs 3]

Time to usable: from the start of setup to the job's first successful TCP
connection to the site, per family, as larkns starts a job (after waiting
for its SLAAC address):
- nat and routed: IPv4 static; IPv6 by SLAAC from larkns's own RAs
  (target < 20 ms);
- bridge: IPv4 static, or by DHCP from the site's dnsmasq (--no-ping;
  target < 200 ms); IPv6 by SLAAC from the site's radvd;
- CLAT (IPv6-only worker): IPv4 through the kernel-side CLAT (bpf) or
  tayga, and the site's NAT64.

Throughput: iperf3 TCP from the job to the site against a bare veth in the
same world and run (a plain namespace, routed through the worker or a port
of the same bridge, no larkns), interleaved.  Target: >= 95% of bare veth in
nat, routed and bridge.  CLAT: IPv4 TCP through the job's CLAT against
the same job's native IPv6 (to the same server, interleaved); target for
the kernel-side CLAT >= 0.8x, and no process per job.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larkns import config
from larkns.engine import Engine
from larkns.journal import Process
from larkns.kernel import netns
from larkns.kernel.ra import Advertiser
from tests.sites import BRIDGE, BRIDGE_POOL, NAT64, bridged_site, missing, v6only_site
from tests.world import PORT, SITE4, SITE6, WORKER4, WORKER6, World, sh

ROUTED4 = "198.18.128.0/24"
ROUTED6 = "2001:db8:100::/56"


def first_connect(ns: str, host: str, t0: float, timeout: float = 5) -> float:
    """Seconds from t0 until a TCP connection from namespace `ns` to host succeeds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns.entered(ns):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect((host, PORT))
                return time.perf_counter() - t0
            except OSError as e:
                if e.errno not in (
                    errno.ENETUNREACH,
                    errno.EADDRNOTAVAIL,
                    errno.EHOSTUNREACH,
                    errno.ECONNREFUSED,
                ):
                    raise
                time.sleep(0.001)
            finally:
                s.close()
    raise RuntimeError(f"no connection to {host} within {timeout} s")


def iperf(ns: str, host: str, seconds: float) -> float:
    """Gbit/s received by the site's iperf3 server from namespace `ns`."""
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "iperf3", "-J", "-c", host, "-t", str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


@contextmanager
def iperf_server(world: World) -> Iterator[None]:
    p = subprocess.Popen(
        ["ip", "netns", "exec", world.site, "iperf3", "-s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        yield
    finally:
        p.kill()
        p.wait()


def bare_ns(
    world: World, attach: Callable[[str], None], a4: str, a6: str, gw4: str, gw6: str
) -> str:
    """A plain namespace with a veth whose worker end `attach` wires up."""
    ns = f"{world.prefix}-bare"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "lkb-bare", "netns", world.worker, "type", "veth", "peer", "name",
       "eth0", "netns", ns)  # fmt: skip
    attach(ns)
    sh("ip", "addr", "add", a4, "dev", "eth0", ns=ns)
    sh("ip", "addr", "add", a6, "dev", "eth0", "nodad", ns=ns)
    for link in ("eth0", "lo"):
        sh("ip", "link", "set", link, "up", ns=ns)
    sh("ip", "route", "add", "default", "via", gw4, ns=ns)
    sh("ip", "-6", "route", "add", "default", "via", gw6, ns=ns)
    return ns


def routed_bare(world: World) -> str:
    def attach(_ns: str) -> None:
        w = world.worker
        sh("ip", "addr", "add", "198.18.1.1/24", "dev", "lkb-bare", ns=w)
        sh("ip", "addr", "add", "2001:db8:0:2::1/64", "dev", "lkb-bare", "nodad", ns=w)
        sh("ip", "link", "set", "lkb-bare", "up", ns=w)
        sh("ip", "route", "add", "198.18.1.0/24", "via", WORKER4, ns=world.site)
        sh("ip", "-6", "route", "add", "2001:db8:0:2::/64", "via", WORKER6, ns=world.site)

    return bare_ns(
        world, attach, "198.18.1.2/24", "2001:db8:0:2::2/64", "198.18.1.1", "2001:db8:0:2::1"
    )


def bridged_bare(world: World) -> str:
    def attach(_ns: str) -> None:
        sh("ip", "link", "set", "lkb-bare", "master", BRIDGE, ns=world.worker)
        sh("ip", "link", "set", "lkb-bare", "up", ns=world.worker)

    return bare_ns(world, attach, "198.18.0.100/24", "2001:db8:0:1::100/64", SITE4, SITE6)


class Jobs:
    """larkns's engine in the world's worker, as larknsd runs it."""

    def __init__(self, world: World, **knobs: str) -> None:
        self.world = world
        self.settings = config.load(environ=world.env() | knobs, condor=False)
        self.owner = Process.of(os.getpid())
        self.n = 0

    @contextmanager
    def running(self) -> Iterator[Engine]:
        with netns.entered(self.world.worker):
            # Its raw socket must be the worker's.
            advertiser = Advertiser()
            engine = Engine(self.settings, advertiser)
            try:
                yield engine
            finally:
                engine.close()
                advertiser.close()

    def time_to_usable(self, engine: Engine, mode: str, host: str, jobs: int) -> list[float]:
        out = []
        for _ in range(jobs):
            self.n += 1
            name = f"lkbm{self.n}"
            t0 = time.perf_counter()
            plan = engine.setup(name, mode, self.owner)
            try:
                if ":" in host:
                    engine.wait_ready(plan, 5)
                out.append(first_connect(plan.netns, host, t0))
            finally:
                engine.teardown(name)
        return out


def show(what: str, xs: list[float], target: str = "") -> None:
    print(
        f"{what:<44} median {statistics.median(xs) * 1e3:7.1f} ms, "
        f"max {max(xs) * 1e3:7.1f} ms (n={len(xs)}){target}"
    )


def throughput(
    engine: Engine, owner: Process, mode: str, bare: str, runs: int, seconds: float
) -> None:
    plan = engine.setup("lkbtp", mode, owner)
    got: dict[str, list[float]] = {k: [] for k in ("bare4", "job4", "bare6", "job6")}
    try:
        engine.wait_ready(plan, 5)
        # Interleaved, so that the VM's drifting speed hits both alike.
        for _ in range(runs):
            for fam, host in (("4", SITE4), ("6", SITE6)):
                got["bare" + fam].append(iperf(bare, host, seconds))
                got["job" + fam].append(iperf(plan.netns, host, seconds))
    finally:
        engine.teardown("lkbtp")
    for fam in ("4", "6"):
        b, j = statistics.median(got["bare" + fam]), statistics.median(got["job" + fam])
        print(
            f"{mode} IPv{fam} TCP, median of {runs} x {seconds:g} s: bare veth {b:.2f} Gbit/s, "
            f"{mode} {j:.2f} Gbit/s = {j / b:.2f}x (target >= 0.95)"
        )


def plain(args: argparse.Namespace) -> None:
    world = World(prefix="lkb")
    try:
        sh("ip", "route", "add", ROUTED4, "via", WORKER4, ns=world.site)
        sh("ip", "-6", "route", "add", ROUTED6, "via", WORKER6, ns=world.site)
        jobs = Jobs(world, LARKNS_ROUTED_IPV4_POOL=ROUTED4, LARKNS_ROUTED_IPV6_PREFIX=ROUTED6)
        with iperf_server(world), jobs.running() as engine:
            for mode in ("nat", "routed"):
                v4 = jobs.time_to_usable(engine, mode, SITE4, args.jobs)
                v6 = jobs.time_to_usable(engine, mode, SITE6, args.jobs)
                show(f"{mode}: time to usable IPv4 (static)", v4)
                show(f"{mode}: time to usable IPv6 (SLAAC, larkns's RA)", v6, " (target < 20 ms)")
            bare = routed_bare(world)
            for mode in ("nat", "routed"):
                throughput(engine, jobs.owner, mode, bare, args.runs, args.seconds)
    finally:
        sh("ip", "netns", "del", f"{world.prefix}-bare", check=False)
        world.close()


def bridged(args: argparse.Namespace) -> None:
    why = missing("radvd", "dnsmasq")
    if why:
        print(f"bridge: skipped, {why}")
        return
    world = World(prefix="lkb")
    try:
        with bridged_site(world, t1=60), iperf_server(world):
            static = Jobs(world, LARKNS_BRIDGE=BRIDGE, LARKNS_BRIDGE_IPV4_POOL=BRIDGE_POOL)
            dhcp = Jobs(world, LARKNS_BRIDGE=BRIDGE, LARKNS_BRIDGE_IPV4="dhcp")
            with static.running() as engine:
                show("bridge: time to usable IPv4 (static)",
                     static.time_to_usable(engine, "bridge", SITE4, args.jobs))  # fmt: skip
                few = max(3, args.jobs // 4)
                show("bridge: time to usable IPv6 (SLAAC, site's radvd)",
                     static.time_to_usable(engine, "bridge", SITE6, few))  # fmt: skip
                bare = bridged_bare(world)
                throughput(engine, static.owner, "bridge", bare, args.runs, args.seconds)
            with dhcp.running() as engine:
                show("bridge: time to usable IPv4 (DHCP, dnsmasq --no-ping)",
                     dhcp.time_to_usable(engine, "bridge", SITE4, args.jobs),
                     " (target < 200 ms)")  # fmt: skip
    finally:
        sh("ip", "netns", "del", f"{world.prefix}-bare", check=False)
        world.close()


def clat(args: argparse.Namespace) -> None:
    why = missing("tayga")
    if why:
        print(f"clat: skipped, {why}")
        return
    world = World(prefix="lkb")
    # The site's server also answers at its address in the NAT64 prefix, so
    # that the job's IPv4 reaches it through the CLAT alone, as IPv6: the
    # site's NAT64 (tayga, ~0.9 Gbit/s) would otherwise bound what is
    # measured.
    embedded = str(ipaddress.IPv6Network(NAT64).network_address + int(ipaddress.IPv4Address(SITE4)))
    try:
        with v6only_site(world), iperf_server(world):
            sh("ip", "-6", "addr", "add", f"{embedded}/128", "dev", "lo", ns=world.site)
            for translator in ("bpf", "tayga"):
                jobs = Jobs(world, LARKNS_NAT64_PREFIX=NAT64, LARKNS_CLAT_TRANSLATOR=translator)
                with jobs.running() as engine:
                    show(f"nat on an IPv6-only worker: IPv4 via CLAT ({translator})",
                         jobs.time_to_usable(engine, "nat", SITE4, args.jobs))  # fmt: skip
                    plan = engine.setup("lkbtp", "nat", jobs.owner)
                    try:
                        engine.wait_ready(plan, 5)
                        v6, v4 = [], []
                        for _ in range(args.runs):  # interleaved
                            v6.append(iperf(plan.netns, SITE6, args.seconds))
                            v4.append(iperf(plan.netns, SITE4, args.seconds))
                        procs = len(sh("ip", "netns", "pids", plan.netns).stdout.split())
                    finally:
                        engine.teardown("lkbtp")
                m4, m6 = statistics.median(v4), statistics.median(v6)
                print(
                    f"CLAT IPv4 TCP ({translator}), median of {args.runs}: {m4:.2f} Gbit/s "
                    f"= {m4 / m6:.3f}x the same job's native IPv6 ({m6:.2f} Gbit/s); "
                    f"processes in the job's namespace besides the job: {procs}"
                    + (" (target >= 0.8x, none)" if translator == "bpf" else "")
                )
    finally:
        world.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20, help="jobs timed to a usable address")
    ap.add_argument("--seconds", type=float, default=3, help="length of one iperf3 run")
    ap.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (median)")
    ap.add_argument("--only", choices=["plain", "bridge", "clat"], default=None)
    args = ap.parse_args()
    for part, fn in (("plain", plain), ("bridge", bridged), ("clat", clat)):
        if args.only in (None, part):
            fn(args)


if __name__ == "__main__":
    main()
