"""Whole-process `larkns run -- true` against a CNI bridge chain and an empty Python.

Runs in a throwaway worker namespace (lktr*), never on the host's network,
and removes everything it made.  Interleaved, so drift hits all alike:

- `larkns run -- true`, the installed program as a user runs it (NAT, IPv4 +
  SLAAC IPv6, counters, teardown);
- the CNI bridge plugin with host-local IPAM, IPv4 + IPv6, masquerade, as a
  runtime drives it: `ip netns add`, ADD, `true` in the namespace, DEL,
  `ip netns del` (bench/cni.py);
- the interpreter the larkns program runs on, `-c pass`, with and without
  its site (for an editable install, site loads the install's import finder).

    .venv/bin/python bench/run_start.py [--runs 30] [--larkns PATH]

Prints p50/min/max and ratios; targets: p50 <= 60 ms, <= 0.5x the CNI chain.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cni import CniJobs
from setup_teardown import pct

from larkns.kernel import netns
from tests.world import World, larkns_bin

CNI_IPV4 = "198.19.64.0/24"
CNI_IPV6 = "fd00:6c6b:7401::/64"


def interpreter(program: str) -> str:
    """The Python a console script runs on (its #! line)."""
    with open(program) as f:
        line = f.readline()
    if not line.startswith("#!"):
        raise RuntimeError(f"{program} is not a script")
    return line[2:].split()[0]


BESIDE = "larkns run -- true, beside another job"


def wait_for_job(program: str, env: dict[str, str], name: str) -> None:
    deadline = time.monotonic() + 10
    while subprocess.run(
        [program, "check", name], env=env, capture_output=True, cwd="/"
    ).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {name} did not come up")
        time.sleep(0.02)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return elapsed


def line(label: str, xs: list[float]) -> str:
    return (
        f"{label:<50} p50 {pct(xs, 50) * 1e3:6.1f} ms  min {min(xs) * 1e3:6.1f}  "
        f"max {max(xs) * 1e3:6.1f}  (n={len(xs)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--larkns", default=None, help="the larkns program (default: this venv's)")
    args = ap.parse_args()
    program = args.larkns or larkns_bin()
    python = interpreter(program)

    world = World(prefix="lktr")
    cni: CniJobs | None = None
    env = world.env()
    # A user's install has its bytecode compiled (pip compiles it; an
    # editable one writes it on first import): without it, every start
    # compiles larkns's sources again (~50 ms here).
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        print("note: PYTHONDONTWRITEBYTECODE is set here; the runs below write bytecode")
    try:
        with netns.entered(world.worker):
            cni = CniJobs(world.prefix, CNI_IPV4, CNI_IPV6)
            cases: dict[str, list[str]] = {
                "larkns run -- true": [program, "run", "--", "true"],
                f"{python} -c pass": [python, "-c", "pass"],
                f"{python} -S -c pass": [python, "-S", "-c", "pass"],
            }
            times: dict[str, list[float]] = {k: [] for k in cases}
            times[BESIDE] = []
            chain: list[float] = []
            plugin: list[float] = []
            for i in range(args.warmup + args.runs):
                sample = i >= args.warmup
                for label, cmd in cases.items():
                    t = timed(cmd, env)
                    if sample:
                        times[label].append(t)
                # The same beside a running job, as on a busy worker: the
                # table is there, and stays (no declaring it, no deleting it).
                beside = subprocess.Popen(
                    [program, "run", "--name", "lktrbeside", "--", "sleep", "60"],
                    env=env, cwd="/", stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    wait_for_job(program, env, "lktrbeside")
                    t = timed(cases["larkns run -- true"], env)
                    if sample:
                        times[BESIDE].append(t)
                finally:
                    beside.terminate()
                    beside.wait()
                whole, add_del = cni.run(f"j{i}", "true")
                if sample:
                    chain.append(whole)
                    plugin.append(add_del)

        ours = times["larkns run -- true"]
        floor = times[f"{python} -c pass"]
        print(f"larkns program: {program}")
        for label, xs in times.items():
            print(line(label, xs))
        print(line("CNI: netns add, ADD v4+v6, true, DEL, netns del", chain))
        print(line("CNI: the bridge plugin's ADD + DEL alone", plugin))
        print(
            f"ratio larkns/CNI chain p50 {pct(ours, 50) / pct(chain, 50):.2f}x  "
            f"(against ADD + DEL alone {pct(ours, 50) / pct(plugin, 50):.2f}x; target <= 0.5x)"
        )
        print(
            f"larkns p50 {pct(ours, 50) * 1e3:.1f} ms (target <= 60 ms), of which the "
            f"interpreter with its site {pct(floor, 50) * 1e3:.1f} ms; beside another job "
            f"p50 {pct(times[BESIDE], 50) * 1e3:.1f} ms, "
            f"{pct(times[BESIDE], 50) / pct(chain, 50):.2f}x the CNI chain"
        )
    finally:
        if cni is not None:
            cni.close()
        world.close()
    left = world.leftovers() + [p for p in os.listdir("/run") if p.startswith(world.prefix)]
    if left:
        print(f"left behind: {left}", file=sys.stderr)


if __name__ == "__main__":
    main()
