"""What N live jobs' mount namespaces cost each new job's network namespace.

Every job process gets a mount namespace of its own (its own /sys).  Copied
from the worker's, it held a copy of /run/netns, which is a shared mount (as
iproute2 makes it): a peer, so each later job's namespace mounted there was
mounted in every live job's mount namespace too, and each unmount repeated
there.  larkns now drops that copy in the job (csrc/spawn.c, own_sysfs).

This starts N processes (`sleep`), each in a mount namespace made the way a
job's was (peer copy) or is (copy dropped), then times creating and deleting
one named network namespace (larkns's netns.create/delete) and counts the
kernel's mounts (/proc/self/mountinfo of each process) and slab.

    .venv/bin/python bench/mountns.py [--counts 0,250,500,1000] [--samples 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larkns.kernel import netns

PREFIX = "lkbm"
AS_BEFORE = "exec sleep 100000"
AS_NOW = "mount --make-rprivate /run/netns && umount -l /run/netns && exec sleep 100000"


def slab_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


def run(count: int, script: str, samples: int, label: str) -> None:
    procs = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script]
                )
            )
        time.sleep(0.5)
        slab0 = slab_kb()
        times = []
        for i in range(samples):
            name = f"{PREFIX}-{os.getpid()}-{i}"
            t0 = time.perf_counter()
            netns.create(name)
            netns.delete(name)
            times.append((time.perf_counter() - t0) * 1000)
        # Mounts in the processes' namespaces while 20 more netns are mounted.
        held = [f"{PREFIX}-{os.getpid()}-held{i}" for i in range(20)]
        for name in held:
            netns.create(name)
        mounts = sum(
            len(Path(f"/proc/{p.pid}/mountinfo").read_text().splitlines()) for p in procs[:50]
        )
        per_ns = mounts / max(1, min(50, len(procs)))
        grown = slab_kb() - slab0
        for name in held:
            netns.delete(name)
        print(
            f"{label:>14} N={count:5d}: netns create+delete p50 {statistics.median(times):6.2f} ms "
            f"(max {max(times):6.2f}); mounts per job namespace {per_ns:6.1f}; "
            f"slab +{grown} kB for 20 more netns"
        )
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="0,250,500,1000")
    ap.add_argument("--samples", type=int, default=20)
    args = ap.parse_args()
    for count in (int(c) for c in args.counts.split(",")):
        run(count, AS_BEFORE, args.samples, "peer copy")
        run(count, AS_NOW, args.samples, "copy dropped")


if __name__ == "__main__":
    main()
