"""What a live job costs in memory, with 100 jobs alive under larknsd: the
PSS of its keeper and of any other per-job process, larknsd's growth per
job, and the kernel's share (slab, kernel stacks, page tables); measured
after a full garbage collection in larknsd (forced through gdb when it is
installed: a collection is what privatized a forked keeper's copy of the
daemon's heap).

Runs in a throwaway worker namespace (lktmem*), as HTCondor would start jobs
(the wrapper, as root, through larknsd); each job is a `sleep`.  The machine
is shared: the kernel's figures include whatever else ran meanwhile.

Baseline in the same run: the keeper as it was, a fork of a Python process
with a heap as large as larknsd's, before and after one gc.collect() in the
parent.

    .venv/bin/python bench/memory.py [--jobs 100] [--baseline-forks 3]

Target: <= 1024 kB PSS per keeper.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_daemon import Larknsd, serving
from tests.world import World, sh

TARGET_KB = 1024
KERNEL = ("Slab", "SUnreclaim", "KernelStack", "PageTables")


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup, kB."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines)}


def meminfo() -> dict[str, int]:
    """The kernel's own memory from /proc/meminfo, kB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in KERNEL:
            out[k] = int(v.split()[0])
    return out


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def world_processes(world: World) -> set[int]:
    """Processes in the world's worker namespace or one of its jobs'."""
    inodes = {
        os.stat(f"/run/netns/{n}").st_ino
        for n in os.listdir("/run/netns")
        if n == world.worker or n.startswith(world.netns_prefix)
    }
    found = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                    found.add(int(d))
            except OSError:
                continue  # gone meanwhile
    return found


def links(world: World) -> int:
    out = sh("ip", "-o", "link", "show", ns=world.worker).stdout
    return sum(1 for line in out.splitlines() if ": lk-" in line)


def settle(world: World, want_links: int, timeout: float = 60) -> None:
    """Until the worker holds `want_links` job links (the kernel removes a
    namespace's links asynchronously)."""
    deadline = time.monotonic() + timeout
    while links(world) != want_links and time.monotonic() < deadline:
        time.sleep(0.1)


def collect_garbage(pid: int) -> str:
    """A full collection in the Python process `pid` (gdb calls
    PyGC_Collect with the GIL taken), and how it went."""
    if shutil.which("gdb") is None:
        return "not forced (no gdb): larknsd's own collections only"
    p = subprocess.run(
        [
            *("gdb", "-p", str(pid), "-batch", "-nx"),
            *("-ex", "call (int)PyGILState_Ensure()"),
            *("-ex", "call (long)PyGC_Collect()"),
            *("-ex", "call (void)PyGILState_Release($1)"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"^\$2 = (\d+)$", p.stdout, re.M)
    if p.returncode != 0 or found is None:
        return f"not forced (gdb failed: {p.stderr.strip().splitlines()[-1:]})"
    return f"forced through gdb ({found.group(1)} objects freed)"


def mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def forked_keeper(heap_kb: int, forks: int) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """The keeper as it was: a fork of this Python process, once its heap is
    `heap_kb` of anonymous memory in small objects (larknsd's are dicts,
    lists and strings), that never runs Python again.  Its memory right after
    the fork and after one gc.collect() in the parent, `forks` times."""
    heap: list[object] = []
    while rollup(os.getpid())["Anonymous"] < heap_kb:
        heap.extend({"n": i, "s": str(i), "l": [i]} for i in range(10_000))
    before, after = [], []
    for _ in range(forks):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        try:
            time.sleep(0.2)
            before.append(rollup(pid))
            gc.collect()
            after.append(rollup(pid))
        finally:
            os.close(w)
            os.waitpid(pid, 0)
    heap.clear()
    return before, after


def line(label: str, xs: list[int], unit: str = "kB") -> str:
    return f"  {label:<34} mean {mean(xs):8.0f} {unit}   max {max(xs, default=0):8d} {unit}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--baseline-forks", type=int, default=3)
    args = ap.parse_args()
    world = World(prefix="lktmem")
    wrappers: list[subprocess.Popen[str]] = []
    try:
        with serving(world) as daemon:
            try:
                return measure(world, daemon, wrappers, args.jobs, args.baseline_forks)
            finally:
                # Before larknsd stops, so that it removes the jobs' networks.
                kill(wrappers)
                settle(world, 0)
    finally:
        kill(wrappers)
        world.close()


def kill(wrappers: list[subprocess.Popen[str]]) -> None:
    """Kill the wrappers: their keepers then kill the jobs."""
    while wrappers:
        p = wrappers.pop()
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def measure(
    world: World, daemon: Larknsd, wrappers: list[subprocess.Popen[str]], n: int, forks: int
) -> int:
    larknsd = daemon.proc.pid
    for _ in range(5):  # lazily made sockets and threads
        daemon.job("/bin/true")
    settle(world, 0)
    present = world_processes(world)
    mem0, kern0 = rollup(larknsd), meminfo()

    jobs = []
    for _ in range(n):
        p = daemon.job_popen("/bin/sh", "-c", "echo $$; exec sleep 3600")
        wrappers.append(p)
        assert p.stdout is not None
        said = p.stdout.readline().strip()
        if not said:
            assert p.stderr is not None
            print(f"a job did not start: {p.stderr.read().strip()}", file=sys.stderr)
            return 1
        jobs.append(int(said))
    settle(world, n)
    kern1 = meminfo()

    keepers = [parent_of(j) for j in jobs]
    assert all(parent_of(k) == larknsd for k in keepers), "a job's parent is no keeper"
    keeper_before = [rollup(k)["Pss"] for k in keepers]
    how = collect_garbage(larknsd)
    time.sleep(0.5)
    mem1 = rollup(larknsd)
    keeper_pss = [rollup(k)["Pss"] for k in keepers]
    keeper_anon = [rollup(k)["Pss_Anon"] for k in keepers]
    wrapper_pss = [rollup(p.pid)["Pss"] for p in wrappers]
    known = {*keepers, *jobs, *(p.pid for p in wrappers)}
    others: dict[str, list[int]] = {}
    for pid in world_processes(world) - present - known:
        try:
            others.setdefault(comm(pid), []).append(rollup(pid)["Pss"])
        except OSError:
            continue

    rss_growth = (mem1["Rss"] - mem0["Rss"]) / n
    pss_growth = (mem1["Pss"] - mem0["Pss"]) / n
    helpers = sum(sum(v) for v in others.values()) / n
    total = mean(keeper_pss) + mean(wrapper_pss) + helpers + pss_growth
    verdict = "ok" if max(keeper_pss) <= TARGET_KB else "OVER"
    print(f"{n} jobs alive under larknsd; its garbage: {how}")
    print("per job, userspace (PSS)")
    print(line(f"keeper ({comm(keepers[0])})", keeper_pss) + f"   target <= {TARGET_KB}: {verdict}")
    print(line("  of it anonymous", keeper_anon))
    print(line(f"wrapper ({comm(wrappers[0].pid)})", wrapper_pss))
    for name, xs in sorted(others.items()):
        print(line(f"{name} ({len(xs)} processes)", xs))
    if not others:
        print("  other per-job processes            none")
    print(
        f"  larknsd growth                     RSS {rss_growth:6.0f} kB/job   "
        f"PSS {pss_growth:6.0f} kB/job   "
        f"(RSS {mem0['Rss']} -> {mem1['Rss']} kB, PSS {mem0['Pss']} -> {mem1['Pss']} kB)"
    )
    print(f"  total                              {total:6.0f} kB/job (the jobs' own excluded)")
    print("per job, the kernel's")
    for k in KERNEL:
        print(f"  {k:<34} {(kern1[k] - kern0[k]) / n:+8.1f} kB/job   ({kern0[k]} -> {kern1[k]} kB)")
    print(
        f"keepers' PSS around larknsd's collection: mean {mean(keeper_before):.0f} -> "
        f"{mean(keeper_pss):.0f} kB, max {max(keeper_before)} -> {max(keeper_pss)} kB"
    )

    heap_kb = mem1["Anonymous"]
    before, after = forked_keeper(heap_kb, forks)
    fork_pss = [r["Pss"] for r in after]
    print(
        f"baseline: the keeper as a fork of a Python process with larknsd's heap "
        f"({heap_kb} kB anonymous), {forks} forks, one gc.collect() in the parent"
    )
    print(f"  PSS           {mean([r['Pss'] for r in before]):8.0f} -> {mean(fork_pss):8.0f} kB")
    print(
        f"  private dirty {mean([r['Private_Dirty'] for r in before]):8.0f} -> "
        f"{mean([r['Private_Dirty'] for r in after]):8.0f} kB"
    )
    print(
        f"  an executed keeper costs {mean(keeper_pss) / mean(fork_pss):.3f} of that "
        f"({mean(fork_pss) / mean(keeper_pss):.0f} times less)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
