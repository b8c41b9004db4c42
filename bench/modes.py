"""Per network type: time to a usable address, and TCP throughput job <-> site.

Runs in throwaway namespaces (lkb*): a site with an iperf3 server, a worker
where larkns builds the job's network, never the host's network.

    .venv/bin/python bench/modes.py [--jobs 20] [--seconds 3] [--runs 3]

Time to usable: from the start of setup to the job's first successful TCP
connection to the site, per family (IPv4 is static; IPv6 comes by SLAAC
from larkns's own router advertisements, waited for as larkns does before
it starts a job).  Target: SLAAC usable < 20 ms.

Throughput: iperf3 TCP from the job to the site, against a bare veth in the
same run (a plain namespace routed through the same worker, no larkns: no
nftables table, no NAT).  Target: >= 95% of bare veth.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larkns import config
from larkns.engine import Engine
from larkns.journal import Process
from larkns.kernel import netns
from larkns.kernel.ra import Advertiser
from tests.world import PORT, SITE4, SITE6, WORKER4, WORKER6, World, sh

BARE4 = "198.18.1.2"  # the bare-veth baseline's addresses, routed by the worker
BARE_GW4 = "198.18.1.1"
BARE6 = "2001:db8:0:2::2"
BARE_GW6 = "2001:db8:0:2::1"


def first_connect(ns: str, host: str, family: int, t0: float, timeout: float = 5) -> float:
    """Seconds from t0 until a TCP connection from namespace `ns` to host succeeds."""
    with netns.entered(ns):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(0.5)
            try:
                s.connect((host, PORT))
                return time.perf_counter() - t0
            except OSError as e:
                # No address or route yet: try again at once.
                if e.errno not in (
                    errno.ENETUNREACH,
                    errno.EADDRNOTAVAIL,
                    errno.EHOSTUNREACH,
                    errno.ECONNREFUSED,
                ):
                    raise
                time.sleep(0.0002)
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


def bare_veth(world: World) -> str:
    """A plain namespace behind the worker, routed, without larkns."""
    ns = f"{world.prefix}-bare"
    sh("ip", "netns", "add", ns)
    sh(
        "ip",
        "link",
        "add",
        "lkb-bare",
        "netns",
        world.worker,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns,
    )
    sh("ip", "addr", "add", f"{BARE_GW4}/24", "dev", "lkb-bare", ns=world.worker)
    sh("ip", "link", "set", "lkb-bare", "up", ns=world.worker)
    sh("ip", "addr", "add", f"{BARE4}/24", "dev", "eth0", ns=ns)
    sh("ip", "link", "set", "eth0", "up", ns=ns)
    sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "route", "add", "default", "via", BARE_GW4, ns=ns)
    sh("ip", "route", "add", "198.18.1.0/24", "via", WORKER4, ns=world.site)
    sh("ip", "addr", "add", f"{BARE_GW6}/64", "dev", "lkb-bare", "nodad", ns=world.worker)
    sh("ip", "addr", "add", f"{BARE6}/64", "dev", "eth0", "nodad", ns=ns)
    sh("ip", "-6", "route", "add", "default", "via", BARE_GW6, ns=ns)
    sh("ip", "-6", "route", "add", "2001:db8:0:2::/64", "via", WORKER6, ns=world.site)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=world.worker)
    sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=world.worker)
    return ns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20, help="jobs timed to a usable address")
    ap.add_argument("--seconds", type=float, default=3, help="length of one iperf3 run")
    ap.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (median)")
    args = ap.parse_args()
    world = World(prefix="lkb")
    iperf_server = subprocess.Popen(
        ["ip", "netns", "exec", world.site, "iperf3", "-s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bare = None
    try:
        settings = config.load(environ=world.env(), condor=False)
        with netns.entered(world.worker):
            # Its raw socket must be the worker's.
            advertiser = Advertiser()
            engine = Engine(settings, advertiser)
            owner = Process.of(os.getpid())
            v4: list[float] = []
            v6: list[float] = []
            for i in range(args.jobs):
                name = f"lkbm{i}"
                t0 = time.perf_counter()
                plan = engine.setup(name, "nat", owner)
                try:
                    v4.append(first_connect(plan.netns, SITE4, socket.AF_INET, t0))
                finally:
                    engine.teardown(name)
                # Another name: a job's name in use again at once would wait
                # for the kernel to finish removing the last one's link.
                name = f"lkbn{i}"
                t0 = time.perf_counter()
                try:
                    plan = engine.setup(name, "nat", owner)
                    # As `larkns run` and larknsd do: the job starts once its
                    # address is there (polling connect() instead would
                    # compete with the RA thread and measure that).
                    engine.wait_ready(plan, 2)
                    v6.append(first_connect(plan.netns, SITE6, socket.AF_INET6, t0))
                finally:
                    engine.teardown(name)
            print(
                f"nat, time to usable IPv4 (static), {args.jobs} jobs: "
                f"median {statistics.median(v4) * 1e3:.1f} ms, max {max(v4) * 1e3:.1f} ms"
            )
            print(
                f"nat, time to usable IPv6 (SLAAC), {args.jobs} jobs: "
                f"median {statistics.median(v6) * 1e3:.1f} ms, max {max(v6) * 1e3:.1f} ms"
                f" (target < 20 ms)"
            )

            bare = bare_veth(world)
            time.sleep(0.5)
            plan = engine.setup("lkbtp", "nat", owner)
            got: dict[str, list[float]] = {k: [] for k in ("bare4", "nat4", "bare6", "nat6")}
            try:
                engine.wait_ready(plan, 2)
                # Interleaved, so that the VM's drifting speed hits both alike.
                for _ in range(args.runs):
                    got["bare4"].append(iperf(bare, SITE4, args.seconds))
                    got["nat4"].append(iperf(plan.netns, SITE4, args.seconds))
                    got["bare6"].append(iperf(bare, SITE6, args.seconds))
                    got["nat6"].append(iperf(plan.netns, SITE6, args.seconds))
            finally:
                engine.teardown("lkbtp")
            engine.close()
            advertiser.close()
        med = {k: statistics.median(v) for k, v in got.items()}
        for fam in ("4", "6"):
            b, n = med["bare" + fam], med["nat" + fam]
            print(
                f"IPv{fam} TCP, median of {args.runs} x {args.seconds:g} s: bare veth "
                f"{b:.2f} Gbit/s, nat {n:.2f} Gbit/s = {n / b:.2f}x (target >= 0.95)"
            )
    finally:
        iperf_server.kill()
        iperf_server.wait()
        if bare is not None:
            sh("ip", "netns", "del", bare, check=False)
        world.close()


if __name__ == "__main__":
    main()
