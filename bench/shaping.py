"""A job's cap: what it costs to set up and tear down, and how close to the
cap a job runs.

Runs inside a throwaway site and worker (namespaces lkts*), never on the
host's network.

    .venv/bin/python bench/shaping.py [--cycles 100] [--seconds 5] [--rates 10,100,1000]
        [--fairness 2,8,32] [--uplink 100] [--cni-burst 4294967295] [--latency-cc cubic,bbr]
        [--cpu-jobs 100] [--cpu-rate 5] [--cpu-rounds 2]
        [--only cost,rates,latency,fairness,cpu]

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
after the first second (expected 0.25, 0.75).

Latency (--rates, --latency-cc, --cni-burst): the queueing delay a job's
shaper adds under load, against the CNI bandwidth plugin's, in the same
run.  For each rate a job pings the site idle, starts a download, and pings
again once the shaper queues (its root qdisc has a backlog twice in a row)
and 1.5 s more have passed: once with larkns's cap (`larkns run
--bandwidth`), once as an uncapped larkns job (no qdisc of larkns's own on
its host link) whose host link lk-NAME gets the plugin's TBF before the
download starts (the plugin's own computation, see cni_tbf(); a TBF
swapped in under a capped job would not stay: `tc qdisc replace` of the
root tells RTM_DELQDISC, and larkns puts its HTB back).  The download's
sender (on the site) uses each of --latency-cc in turn: a loss-based one
(cubic, Linux's default) fills whatever queue a shaper keeps, BBR keeps
its own queue short whatever the shaper (this host's default is bbr:
with it, on this ~0.1 ms path, the plugin's TBF adds only a few ms).  Prints
the added latency (loaded - idle) of each and their ratio (target: <= 5
ms at 100 Mbit/s, and >= 3x below the plugin's), the rate the download ran
at while pinged, and how much had gone through when the shaper first
queued (the plugin's burst: ~4.29 s of the rate).

CPU (--cpu-jobs, --cpu-rate, --cpu-rounds, --seconds): what the shapers
cost per byte moved.  That many NAT jobs capped at --cpu-rate Mbit/s each,
and as many uncapped, set up in-process; then all of one kind download at
once (one TCP connection each, both ends driven by this process through
epoll: no interpreter per job) for --seconds after a second's warm-up,
--cpu-rounds times, kinds interleaved.  The fair baseline is the same
number of jobs without shapers moving the same bytes per second: uncapped
jobs whose sender (on the site) paces each connection to the cap
(SO_MAX_PACING_RATE: TCP's own pacing, no fq needed; it paces payload, and
a capped job's payload is ~0.99 of its cap since HTB counts a GSO packet's
headers once), so both kinds move ~N x rate; the figure compared is kernel
CPU (system + irq + softirq jiffies of /proc/stat, all CPUs) per GB of
payload.  Pacing has a cost of its own (a timer per burst), counted in the
baseline: if anything the ratio understates the shapers' cost.  An
uncapped, unpaced round (as fast as the node goes) is printed for
reference only: it is a different load.  /proc/stat is the whole
machine's, so a window without traffic is measured each round too and the
figures are also given net of it; irq + softirq time alone is printed as
well, with less of the rest of the node's noise in it (which is mostly
system time), but the kinds split their work between system calls and
softirq differently, so the kernel figure is the one to compare.  Figures
only.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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


@contextlib.contextmanager
def engine_in(
    world: World, clean_when_idle: bool = False, **knobs: Any
) -> Iterator[tuple[Engine, list[str]]]:
    """An Engine in the world's worker (its settings the world's, then
    `knobs`), and a list for the names of the jobs the caller sets up: each
    is torn down after (one failing does not keep the others), then all
    else the engine made."""
    settings = config.Settings(
        **{
            "ipv4_pool": ipaddress.IPv4Network(world.ipv4_pool),
            "ipv6_prefix": ipaddress.IPv6Network(world.ipv6_prefix),
            "state_dir": world.state_dir,
            "netns_prefix": world.netns_prefix,
            **knobs,
        }
    )
    names: list[str] = []
    with netns.entered(world.worker):
        advertiser = Advertiser()
        engine = Engine(settings, advertiser, clean_when_idle=clean_when_idle)
        try:
            yield engine, names
        finally:
            try:
                for name in names:
                    try:
                        engine.teardown(name)
                    except Exception as e:
                        print(f"job {name}: {e}", file=sys.stderr)
                engine.clean_if_idle()
            finally:
                engine.close()
                advertiser.close()


def cost(world: World, cycles: int, clean_when_idle: bool) -> None:
    owner = Process.of(os.getpid())
    times: dict[str, list[float]] = {k: [] for k in ("setup", "teardown", "csetup", "cteardown")}
    with engine_in(world, clean_when_idle) as (engine, _):
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
    with world.rate_sink(PORT):
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


# The CNI bandwidth plugin's shaper (containernetworking/plugins v1.9.1,
# plugins/meta/bandwidth/ifb_creator.go): createTBF(rateInBits, burstInBits)
# adds a TBF at the root of the host end of the pod's veth (for the pod's
# download; its upload goes through an IFB with another) with, through
# vishvananda/netlink:
#   Rate   = rateInBits / 8                     (bytes/s)
#   Buffer = time2Tick(burst/8 * 1e6 / Rate)    (the burst as psched ticks)
#   Limit  = Rate * latencyInMillis / 1000 + burst/8,  latencyInMillis = 25
# and only TCA_TBF_PARMS (no TCA_TBF_BURST), so the kernel takes the burst
# from Buffer: at most ~0U ns of the rate (sch_tbf.c tbf_change: buffer =
# min(PSCHED_TICKS2NS(qopt->buffer), ~0U)), i.e. 4.29 s.  The burst is the
# runtime's: containerd's CRI (internal/cri/server/sandbox_run.go,
# toCNIBandWidth) gives a pod's kubernetes.io/ingress-bandwidth a burst of
# math.MaxUint32 bits; CRI-O MaxUint32*8-1; kubelet's dockershim gave
# MaxInt32.
CNI_LATENCY_MS = 25
CNI_BURST_BITS = 2**32 - 1  # containerd's
U32 = 2**32


def cni_tbf(rate_bits: int, burst_bits: int) -> tuple[int, int, int]:
    """The TBF the CNI bandwidth plugin makes for `rate_bits` and
    `burst_bits`, as the kernel ends up with it: (rate bytes/s, burst
    bytes, limit bytes).  `tc ... tbf rate {rate}bps burst {burst} limit
    {limit}` makes the same (tc sends the burst itself, TCA_TBF_BURST)."""
    rate, burst = rate_bits // 8, burst_bits // 8
    # /proc/net/psched: ns per us, ns per tick, clock resolution, hz (netlink.TickInUsec)
    ns_per_us, ns_per_tick, clock_res, _ = (
        int(x, 16) for x in Path("/proc/net/psched").read_text().split()
    )
    tick_in_usec = ns_per_us / ns_per_tick * (clock_res / 1e6)
    # Go's uint32(float64) of a value too large for it wraps (amd64: through int64)
    buffer_us = int(burst * 1e6 / rate) % U32
    ticks = int(buffer_us * tick_in_usec) % U32
    limit = (int(rate * CNI_LATENCY_MS * 1000 / 1e6) + burst) % U32
    buffer_ns = min(ticks * ns_per_tick, U32 - 1)
    return rate, min(buffer_ns * rate // 10**9, U32 - 1), limit


def root_qdisc(world: World, link: str) -> tuple[int, int]:
    """(bytes sent, backlog bytes) of the root qdisc of the worker's `link`."""
    shown = subprocess.run(
        world.worker_cmd("tc", "-s", "-j", "qdisc", "show", "dev", link),
        capture_output=True,
        text=True,
    )
    if shown.returncode != 0:
        raise RuntimeError(f"tc qdisc show dev {link}: {shown.stderr.strip()}")
    for q in json.loads(shown.stdout):
        if q.get("root"):
            return int(q.get("bytes", 0)), int(q.get("backlog", 0))
    return 0, 0


def avg_rtt(line: str) -> float:
    """ping -q's last line, "rtt min/avg/max/mdev = 0.1/0.2/0.3/0.1 ms": the
    average (nan if no reply came)."""
    return float(line.split("=")[1].split("/")[1]) if "rtt" in line else math.nan


@dataclass
class Pinged:
    idle: float  # ms
    loaded: float  # ms
    cap_share: float  # the download's rate while pinged / the cap
    queued_after: int  # bytes through the shaper before it first queued (-1: never)
    queued_s: float  # seconds from the download's start to then


# A sender for rate.py's `get` on the site, whose connections use the
# congestion control argv[2]: the site's netns may default only to one the
# host allows (tcp_allowed_congestion_control), root may set any on a
# socket.  It sends until the client goes (killed once it has pinged).
SENDER = """
import socket, sys, threading
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
cc = sys.argv[2].encode()
def serve(c):
    with c:
        try:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc)
            while not c.recv(1 << 10).endswith(b"\\n"):
                pass
            buf = bytes(1 << 16)
            while True:
                c.sendall(buf)
        except OSError:
            pass
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""
LAT_PORT = PORT + 2


def sending(world: World, cc: str) -> contextlib.AbstractContextManager[None]:
    """SENDER on the site, with congestion control `cc`, for the while."""
    return world.on_site("-c", SENDER, str(LAT_PORT), cc)


def pinged(
    world: World, name: str, mbit: int, tbf: tuple[int, int, int] | None, wait: float, settle: float
) -> Pinged:
    """Job `name` pings the site idle, then while a download fills its shaper:
    larkns's cap of `mbit` (`tbf` None), or no cap of larkns's and `tbf`
    (rate, burst, limit bytes) on its host link.  `wait`: how long the
    shaper may take to queue; `settle`: how long after that it pings."""
    py, link = sys.executable, f"lk-{name}"
    ping = f"ping -q -c {{}} -i 0.05 {SITE4} | tail -1"
    script = (
        "echo ready; read x; "
        f"{ping.format(20)}; "
        f"{py} {RATE} get {SITE4} {LAT_PORT} 3600 > /dev/null & "
        "echo started; read x; "
        f"{ping.format(30)}; "
        "kill $! 2> /dev/null; wait"
    )
    cap = [] if tbf else ["--bandwidth", f"{mbit}mbit"]
    err = ""
    proc = world.larkns_popen("run", "--name", name, *cap, "--", "sh", "-c", script, stdin=True)
    assert proc.stdin is not None and proc.stdout is not None

    def expect(what: str) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line or (what and line != what):
            raise RuntimeError(f"expected {what or 'a ping'}, got {line!r}")
        return line

    def stop() -> str:
        """End the job (larkns passes SIGTERM on, then tears down): what
        it said on stderr."""
        if proc.poll() is None:
            proc.terminate()
        try:
            said = proc.communicate(timeout=15)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            said = proc.communicate()[1]
        return (said or "").strip()

    def say(line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    try:
        expect("ready")
        if tbf:
            rate, burst, limit = tbf
            added = subprocess.run(
                world.worker_cmd(
                    "tc", "qdisc", "replace", "dev", link, "root", "tbf",
                    "rate", f"{rate}bps", "burst", str(burst), "limit", str(limit),
                ),
                capture_output=True,
                text=True,
            )  # fmt: skip
            if added.returncode != 0:
                raise RuntimeError(f"tc qdisc replace dev {link}: {added.stderr.strip()}")
        say("go")
        idle = avg_rtt(expect(""))
        expect("started")
        t0 = time.monotonic()
        b0, _ = root_qdisc(world, link)
        queued_after, queued_s, seen = -1, math.nan, 0
        while time.monotonic() - t0 < wait:
            b, backlog = root_qdisc(world, link)
            seen = seen + 1 if backlog > 0 else 0
            if seen == 1:
                queued_after, queued_s = b - b0, time.monotonic() - t0
            if seen == 2:  # twice in a row: not a packet caught in passing
                break
            time.sleep(0.05)
        if seen < 2:
            queued_after = -1
        time.sleep(settle)  # TCP's window grows into the queue
        b1, t1 = root_qdisc(world, link)[0], time.monotonic()
        say("loaded")
        loaded = avg_rtt(expect(""))
        b2, t2 = root_qdisc(world, link)[0], time.monotonic()
        _, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}")
        return Pinged(
            idle, loaded, 8 * (b2 - b1) / (t2 - t1) / (mbit * 1e6), queued_after, queued_s
        )
    except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
        said = stop() or err
        raise RuntimeError(f"job {name}: {e}" + (f" (it said: {said})" if said else "")) from None
    finally:
        if proc.poll() is None:
            stop()


def latency(
    world: World, mbits: list[int], seconds: float, burst_bits: int, ccs: list[str]
) -> None:
    wait = max(20.0, 4 * seconds)
    for m in mbits:
        tbf = cni_tbf(m * 1_000_000, burst_bits)
        rate, burst, limit = tbf
        print(
            f"latency {m:5d} Mbit/s  CNI TBF: rate {rate}bps burst {burst} "
            f"({burst / rate:.2f} s of the rate) limit {limit} "
            f"(from a burst of {burst_bits} bits, latency {CNI_LATENCY_MS} ms)"
        )
        for cc in ccs:
            got: dict[str, Pinged] = {}
            with sending(world, cc):
                for how, shaper in (("larkns", None), ("CNI", tbf)):
                    name = f"lat{m}{cc[0]}{how[0].lower()}"
                    try:
                        got[how] = p = pinged(world, name, m, shaper, wait, 1.5)
                    except (RuntimeError, subprocess.SubprocessError) as e:
                        print(f"latency {m:5d} Mbit/s  {cc:5s}  {how}: {e}")
                        continue
                    queued = (
                        f"first queued after {p.queued_after / 1e6:.1f} MB, {p.queued_s:.2f} s"
                        if p.queued_after >= 0
                        else f"never queued in {wait:.0f} s: the download stayed below the rate"
                    )
                    label = "larkns HTB+bfifo" if how == "larkns" else "CNI TBF"
                    print(
                        f"latency {m:5d} Mbit/s  {cc:5s}  {label:16s}  ping idle {p.idle:6.2f} ms"
                        f"  loaded {p.loaded:7.2f} ms  added {p.loaded - p.idle:7.2f} ms  "
                        f"(download at {p.cap_share:.2f} of the cap while pinged; {queued})"
                    )
            if len(got) == 2:
                ours = got["larkns"].loaded - got["larkns"].idle
                theirs = got["CNI"].loaded - got["CNI"].idle
                print(
                    f"latency {m:5d} Mbit/s  {cc:5s}  added latency CNI/larkns "
                    f"{theirs / ours:.1f}x"
                    + ("  (target: larkns <= 5 ms, >= 3x lower than CNI)" if m == 100 else "")
                )


# -- what the shapers cost in CPU --

CPU_PORT = PORT + 1
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)


@dataclass
class Jiffies:
    """Of all CPUs, from /proc/stat's first line."""

    kernel: int = 0  # system + irq + softirq
    softirq: int = 0  # irq + softirq: less noise from the rest of the node
    busy: int = 0  # all but idle, iowait and steal

    @classmethod
    def now(cls) -> Jiffies:
        user, nice, system, _idle, _iowait, irq, softirq = (
            int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
        )
        return cls(system + irq + softirq, irq + softirq, user + nice + system + irq + softirq)

    def __sub__(self, other: Jiffies) -> Jiffies:
        return Jiffies(
            self.kernel - other.kernel, self.softirq - other.softirq, self.busy - other.busy
        )

    def __add__(self, other: Jiffies) -> Jiffies:
        return Jiffies(
            self.kernel + other.kernel, self.softirq + other.softirq, self.busy + other.busy
        )


@dataclass
class Pumped:
    payload: int = 0  # bytes received after the warm-up
    seconds: float = 0.0
    cpu: Jiffies = field(default_factory=Jiffies)


def pump(site: str, namespaces: list[str], seconds: float, pacing: int | None) -> Pumped:
    """A download into each of `namespaces` at once, from site `site` (one TCP
    connection each, `pacing` bytes/s each if given), for a second of
    warm-up and `seconds` more: what moved and the CPU it took after the
    warm-up.  Both ends are this process's (epoll), none per job."""
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        with netns.entered(site):
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks.append(srv)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((SITE4, CPU_PORT))
        srv.listen(len(namespaces))
        receivers = []
        for ns in namespaces:
            with netns.entered(ns):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            receivers.append(c)
            socks.append(c)
            c.setblocking(False)
            c.connect_ex((SITE4, CPU_PORT))
        srv.settimeout(10)
        senders = []
        for _ in namespaces:
            s, _peer = srv.accept()
            senders.append(s)
            socks.append(s)
            s.setblocking(False)
            # closed with a reset: nothing queued drains into the next round
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if pacing is not None:
                s.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, pacing)
        for s in senders:
            sel.register(s, selectors.EVENT_WRITE, True)
        for c in receivers:
            sel.register(c, selectors.EVENT_READ, False)
        out = memoryview(bytes(1 << 18))
        into = bytearray(1 << 20)
        got = 0
        start = time.monotonic()
        warm, end = start + 1, start + 1 + seconds
        before: Jiffies | None = None
        t0 = start
        while (now := time.monotonic()) < end:
            if before is None and now >= warm:
                before, got, t0 = Jiffies.now(), 0, now
            for key, _ev in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if key.data:
                        sock.send(out)
                    else:
                        n = sock.recv_into(into)
                        if n == 0:
                            sel.unregister(sock)
                        got += n
                except (BlockingIOError, InterruptedError):
                    pass
        after, t1 = Jiffies.now(), time.monotonic()
        assert before is not None
        return Pumped(got, t1 - t0, after - before)
    finally:
        sel.close()
        for s in reversed(socks):  # the receivers last: see SO_LINGER
            s.close()


def cpu(world: World, n: int, mbit: int, seconds: float, rounds: int) -> None:
    cap = mbit * 1_000_000
    hz = os.sysconf("SC_CLK_TCK")
    # 2n jobs of a /31 each
    pool = ipaddress.IPv4Network(f"198.19.0.0/{32 - (4 * n - 1).bit_length()}")
    owner = Process.of(os.getpid())
    kinds = {
        "capped (HTB + IFB per job)": None,
        # TCP paces payload; a capped job's payload is ~0.99 of its cap
        # (HTB counts a GSO packet's headers once): about the same bytes
        "uncapped, paced by the sender": cap // 8,
        "uncapped, unpaced (reference)": None,
    }
    sums = {k: Pumped() for k in ("background", *kinds)}
    with engine_in(world, ipv4_pool=pool) as (engine, names):
        t0 = time.monotonic()
        capped: list[str] = []
        uncapped: list[str] = []
        for i in range(n):
            for tag, bw, out in (("c", (cap, cap), capped), ("u", None, uncapped)):
                names.append(f"cpu{tag}{i}")
                out.append(engine.setup(names[-1], "nat", owner, bandwidth=bw).netns)
        print(
            f"cpu: {n} jobs capped at {mbit} Mbit/s and {n} uncapped set up in "
            f"{time.monotonic() - t0:.1f} s; {rounds} round{'s' * (rounds != 1)} of "
            f"{seconds:g} s (after a second's warm-up) per kind, kinds interleaved"
        )
        order = ["background", *kinds]
        for r in range(rounds):
            for kind in order if r % 2 == 0 else order[::-1]:
                if kind == "background":
                    b0, w0 = Jiffies.now(), time.monotonic()
                    time.sleep(seconds)
                    got = Pumped(0, time.monotonic() - w0, Jiffies.now() - b0)
                else:
                    jobs = capped if kind.startswith("capped") else uncapped
                    got = pump(world.site, jobs, seconds, kinds[kind])
                acc = sums[kind]
                acc.payload += got.payload
                acc.seconds += got.seconds
                acc.cpu += got.cpu
                time.sleep(0.5)
    bg = sums["background"]
    # CPU-s per second of the background
    bg_s = {w: getattr(bg.cpu, w) / hz / bg.seconds for w in ("kernel", "softirq", "busy")}
    print(
        f"cpu  {'background (no traffic)':30s}  kernel {bg_s['kernel']:.3f} CPU-s/s "
        f"(softirq {bg_s['softirq']:.3f})  busy {bg_s['busy']:.3f} CPU-s/s"
    )
    # CPU-s per GB of kernel, softirq and busy time: raw, and net of the background
    per_gb: dict[str, dict[str, tuple[float, float]]] = {}
    for kind in kinds:
        k = sums[kind]
        gb = k.payload / 1e9
        per_gb[kind] = {}
        for w in ("kernel", "softirq", "busy"):
            used = getattr(k.cpu, w) / hz
            net = used - bg_s[w] * k.seconds
            per_gb[kind][w] = (used / gb, net / gb) if gb else (math.nan, math.nan)
        rate = 8 * k.payload / k.seconds / 1e6 if k.seconds else 0.0
        share = (
            "" if kind.endswith("(reference)") else f" ({rate / (n * mbit):.2f} of {n} x {mbit})"
        )
        g = per_gb[kind]
        print(
            f"cpu  {kind:30s}  {rate:7.1f} Mbit/s payload{share}  {gb:.2f} GB  CPU-s/GB: "
            f"kernel {g['kernel'][0]:.2f} (net {g['kernel'][1]:.2f})  "
            f"softirq {g['softirq'][0]:.2f} (net {g['softirq'][1]:.2f})  "
            f"busy {g['busy'][0]:.2f} (net {g['busy'][1]:.2f})"
        )
    c, u = per_gb["capped (HTB + IFB per job)"], per_gb["uncapped, paced by the sender"]

    def ratio(w: str, i: int) -> str:
        ok = c[w][i] > 0 and u[w][i] > 0
        return f"{c[w][i] / u[w][i]:.2f}x" if ok else "n/a: the background varied more"

    print(
        f"cpu  capped / uncapped at the same rate, CPU per GB: kernel {ratio('kernel', 0)} "
        f"(net of background {ratio('kernel', 1)}), softirq {ratio('softirq', 0)} "
        f"(net {ratio('softirq', 1)})"
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
    owner = Process.of(os.getpid())
    with engine_in(world, uplink_bandwidth=(capacity, capacity), uplink="up0") as (engine, names):
        namespaces = []
        for i, w in enumerate(weights):
            name = f"fair{i}"
            names.append(name)
            namespaces.append(engine.setup(name, "nat", owner, weight=w).netns)
        return {
            "download": together(namespaces, "get", SITE4, seconds),
            "upload": together(namespaces, "put", SITE6, seconds),
        }


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
    with world.rate_sink(PORT):
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


SECTIONS = ("cost", "rates", "latency", "fairness", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rates", default="10,100,1000", help="caps to measure, Mbit/s")
    ap.add_argument("--fairness", default="2,8,32", help="how many jobs share the uplink")
    ap.add_argument("--uplink", type=int, default=100, help="the uplink's capacity, Mbit/s")
    ap.add_argument(
        "--cni-burst",
        type=int,
        default=CNI_BURST_BITS,
        help="the CNI plugin's burst, bits (default: containerd's for a pod's annotation)",
    )
    ap.add_argument(
        "--latency-cc",
        default="cubic,bbr",
        help="the congestion controls of the download's sender in latency",
    )
    ap.add_argument("--cpu-jobs", type=int, default=100, help="jobs of each kind in cpu")
    ap.add_argument("--cpu-rate", type=int, default=5, help="each job's cap in cpu, Mbit/s")
    ap.add_argument("--cpu-rounds", type=int, default=2, help="rounds of each kind in cpu")
    ap.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"the sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    args = ap.parse_args()
    only = {x for x in args.only.split(",") if x}
    if only - set(SECTIONS):
        ap.error(f"--only: no section {', '.join(sorted(only - set(SECTIONS)))}")
    if args.cni_burst < 8 or args.cni_burst // 8 >= U32:
        # the plugin: "burst cannot be more than 4GB"
        ap.error(f"--cni-burst: expected 8 to {8 * U32 - 1} bits, got {args.cni_burst}")
    world = World(prefix="lkts")
    try:
        if "cost" in only:
            cost(world, args.cycles, clean_when_idle=False)
            cost(world, args.cycles // 2, clean_when_idle=True)
        mbits = [int(r) for r in args.rates.split(",") if r]
        if "rates" in only:
            rates(world, mbits, args.seconds)
        if "latency" in only:
            ccs = [c for c in args.latency_cc.split(",") if c]
            latency(world, mbits, args.seconds, args.cni_burst, ccs)
        if "fairness" in only:
            counts = [int(n) for n in args.fairness.split(",") if n]
            fairness(world, counts, args.uplink, args.seconds)
        if "cpu" in only:
            cpu(world, args.cpu_jobs, args.cpu_rate, args.seconds, args.cpu_rounds)
    finally:
        world.close()


if __name__ == "__main__":
    main()
