"""larknsd's Prometheus metrics (LARKNS_METRICS), read when scraped.

Between scrapes larknsd keeps only a few counts of its own (NodeCounts:
setups, failures, gc); a scrape reads every live job's nft counters through
the engine, as `larkns show` does, taking larknsd's lock once per job: a
scrape of hundreds of jobs holds a job's setup up by one job's reading at
most, never by the whole scrape.  prometheus_client is imported only when
the metrics are on (listen()), so a larknsd without them pays nothing for
them.

Per live job (labels job, owner, network_type): bytes and packets per family
and direction, per class and direction, dropped and refused packets, the
cap.  Per node: jobs alive, setups and failures, setup latency, gc
removals, flushes of the ruleset put back after.  Directions are the job's
("incoming": to the job), as in the report and the job ad.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from larkns.daemon.endpoint import Endpoint
    from larkns.daemon.server import Daemon

# Seconds a job's network takes to build: p50 ~4 ms, p99 ~12 ms on the 2-core
# test VM (bench/setup_teardown.py), ~50 ms with a cap's IFB made anew; the
# upper buckets catch a node in trouble (DHCP waits up to 5 s).
SETUP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

JOB_LABELS = ("job", "owner", "network_type")

P = ParamSpec("P")
T = TypeVar("T")


class NodeCounts:
    """What larknsd counts of its own work, as plain numbers (kept whether
    or not the metrics are served: a few integers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.setups = 0
        self.failures = 0
        self.gc_removed = 0
        # Setups per bucket of SETUP_BUCKETS, the last for those above all.
        self.setup_counts = [0] * (len(SETUP_BUCKETS) + 1)
        self.setup_seconds = 0.0

    def timed(self, setup: Callable[P, T]) -> Callable[P, T]:
        """`setup` (the engine's), counted: a network built (and how long
        it took), or not (an exception)."""

        def counted(*args: P.args, **kwargs: P.kwargs) -> T:
            start = time.monotonic()
            try:
                built = setup(*args, **kwargs)
            except BaseException:
                with self._lock:
                    self.failures += 1
                raise
            seconds = time.monotonic() - start
            with self._lock:
                self.setups += 1
                self.setup_seconds += seconds
                self.setup_counts[bisect.bisect_left(SETUP_BUCKETS, seconds)] += 1
            return built

        return counted

    def removed(self, count: int) -> None:
        """gc removed `count` things jobs that are gone left."""
        with self._lock:
            self.gc_removed += count

    def snapshot(self) -> NodeCounts:
        """A copy, as of now (the counts change under a scrape)."""
        with self._lock:
            out = NodeCounts()
            out.setups, out.failures, out.gc_removed = self.setups, self.failures, self.gc_removed
            out.setup_counts, out.setup_seconds = list(self.setup_counts), self.setup_seconds
        return out


def describe(where: Path | tuple[str, int]) -> str:
    """LARKNS_METRICS's address as the knob spells it."""
    if isinstance(where, Path):
        return f"unix:{where}"
    host, port = where
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(where: Path | tuple[str, int]) -> Endpoint:
    """The metrics' endpoint, bound (OSError if it cannot be): at larknsd's
    start, before anything else is built, so a port in use stops it at
    once with a one-line error.  Served by start()."""
    from larkns.daemon.endpoint import Endpoint

    return Endpoint(where)


def start(endpoint: Endpoint, daemon: Daemon) -> None:
    """Serve `daemon`'s metrics on `endpoint` (a thread of its own)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(daemon))
    # larknsd's own memory, descriptors and CPU (each job holds a few fds).
    ProcessCollector(registry=registry)
    endpoint.start(registry)


def exposition(registry: CollectorRegistry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)


class Collector:
    """Reads `daemon`'s jobs' counters on each scrape (a custom collector:
    no thread keeps gauges up to date)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from larkns.engine import LIVE_STATES
        from larkns.plan import LinkedNetwork

        d = self.daemon
        per_family = (*JOB_LABELS, "family", "direction")
        per_class = (*JOB_LABELS, "class", "direction")
        bytes_ = CounterMetricFamily(
            "larkns_job_bytes", "L3 bytes across the job's link", labels=per_family
        )
        packets = CounterMetricFamily(
            "larkns_job_packets", "packets across the job's link", labels=per_family
        )
        class_bytes = CounterMetricFamily(
            "larkns_job_class_bytes", "bytes to/from a class's prefixes", labels=per_class
        )
        class_packets = CounterMetricFamily(
            "larkns_job_class_packets", "packets to/from a class's prefixes", labels=per_class
        )
        dropped = CounterMetricFamily(
            "larkns_job_dropped_packets",
            "what the job sent from addresses not its own, or may not send",
            labels=JOB_LABELS,
        )
        refused = CounterMetricFamily(
            "larkns_job_refused_packets",
            "what the job's destination policy refused",
            labels=JOB_LABELS,
        )
        cap = GaugeMetricFamily(
            "larkns_job_cap_bits_per_second",
            "the job's cap (capped jobs only)",
            labels=(*JOB_LABELS, "direction"),
        )
        with d.lock:
            names = [r.name for r in d.engine.records() if r.owner == d.me]
        alive = 0
        for name in names:
            # One job at a time: a setup waits for one reading, not all.
            with d.lock:
                record = d.engine.journal.read(name)
                if record is None or record.plan is None or record.state not in LIVE_STATES:
                    continue
                plan = record.plan
                try:
                    t = d.engine.driver(plan.mode).stats(plan)
                except Exception:
                    continue  # its counters are being put back after a flush
            alive += 1
            job = (name, record.job_user(), plan.mode)
            for family, inc, out in (
                ("ipv4", t.ipv4_in, t.ipv4_out),
                ("ipv6", t.ipv6_in, t.ipv6_out),
            ):
                for direction, c in (("incoming", inc), ("outgoing", out)):
                    bytes_.add_metric([*job, family, direction], c.bytes)
                    packets.add_metric([*job, family, direction], c.packets)
            for cls, (inc, out) in t.classes.items():
                for direction, c in (("incoming", inc), ("outgoing", out)):
                    class_bytes.add_metric([*job, cls, direction], c.bytes)
                    class_packets.add_metric([*job, cls, direction], c.packets)
            dropped.add_metric(list(job), t.dropped.packets)
            refused.add_metric(list(job), t.refused.packets)
            if isinstance(plan, LinkedNetwork) and plan.bandwidth is not None:
                cap.add_metric([*job, "incoming"], plan.bandwidth[0])
                cap.add_metric([*job, "outgoing"], plan.bandwidth[1])
        yield from (bytes_, packets, class_bytes, class_packets, dropped, refused, cap)

        counts = d.counts.snapshot()
        yield GaugeMetricFamily("larkns_jobs", "jobs with a network of this larknsd's", alive)
        yield CounterMetricFamily("larkns_setups", "job networks built", counts.setups)
        yield CounterMetricFamily(
            "larkns_setup_failures", "job networks that could not be built", counts.failures
        )
        cumulative, buckets = 0, []
        for bound, n in zip((*SETUP_BUCKETS, float("inf")), counts.setup_counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", float(cumulative)))
        yield HistogramMetricFamily(
            "larkns_setup_seconds",
            "time to build a job's network",
            buckets=buckets,
            sum_value=counts.setup_seconds,
        )
        yield CounterMetricFamily(
            "larkns_gc_removed", "what gc removed of jobs that are gone", counts.gc_removed
        )
        watcher = d.watcher
        yield CounterMetricFamily(
            "larkns_flush_restores",
            "flushes of the ruleset larknsd put its jobs back after",
            watcher.restored if watcher else 0,
        )
        yield GaugeMetricFamily(
            "larkns_last_flush_restore_timestamp_seconds",
            "when larknsd last put its jobs back after a flush (0: never)",
            watcher.restored_at if watcher else 0.0,
        )
