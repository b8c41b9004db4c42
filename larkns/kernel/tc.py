"""tc: a capped job's shapers, and which queue disciplines the kernel has.

Download (to the job): HTB as the root of the host end of the job's veth,
one class at the cap (ceil = rate), a leaf qdisc under it.  Upload (from the
job): an ingress qdisc on the host end whose u32 filter matches every packet
and redirects it (mirred) to the job's IFB, with the same HTB on the IFB.
All of it is on the host side: a job that is root in its namespace (`larkns
run --privileged`) can only remove the qdiscs of its own end, which shape
nothing.

The qdiscs go through tc(8) in batch mode, one process per job (~3 ms);
the IFB through larkns's own rtnetlink.
"""

from __future__ import annotations

import os
import re

from larkns import shaping
from larkns.kernel import links, netns
from larkns.kernel.rtnl import Rtnl

# The leaf under HTB, best first: fq_codel keeps the queueing delay of a
# saturated cap at ~5 ms, sfq at least keeps one flow from starving others;
# without either, a byte FIFO bounded to 100 ms of the rate (shaping.fifo_limit).
LEAVES = ("fq_codel", "sfq")
FIFO = "bfifo"
_TC_PATHS = ("/usr/sbin/tc", "/sbin/tc", "/usr/bin/tc", "/bin/tc")
# One class of its own under each HTB: its quantum only matters between
# classes, and set, it spares the kernel's "quantum is big" warnings.
_QUANTUM = 60000

_leaf: str | None = None


class TcError(OSError):
    """tc refused a job's shaper."""


def tc_path() -> str:
    for p in _TC_PATHS:
        if os.access(p, os.X_OK):
            return p
    raise TcError("tc (iproute2) is not installed: jobs cannot be capped")


def _batch(lines: list[str], force: bool = False) -> tuple[int, str]:
    import subprocess

    proc = subprocess.run(
        [tc_path(), *(["-force"] if force else []), "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stderr


def probe(kinds: tuple[str, ...]) -> dict[str, bool]:
    """Which qdiscs of `kinds` ("htb", or with the options it needs: "tbf
    rate 1mbit ...") the kernel has, by name, tried on the loopback of a
    throwaway namespace (the kernel has no list of them)."""
    lines: list[str] = []
    for kind in kinds:
        lines += [f"qdisc add dev lo root handle 1: {kind}", "qdisc del dev lo root"]
    with netns.throwaway():
        _, err = _batch(lines, force=True)
    failed = {int(n) for n in re.findall(r"Command failed -:(\d+)", err)}
    return {kind.split()[0]: 2 * i + 1 not in failed for i, kind in enumerate(kinds)}


def leaf() -> str:
    """The leaf qdisc larkns puts under HTB here (probed once per process)."""
    global _leaf
    if _leaf is None:
        found = probe(LEAVES)
        _leaf = next((k for k in LEAVES if found[k]), FIFO)
    return _leaf


def _htb(dev: str, rate: int, leaf_kind: str) -> list[str]:
    burst = shaping.burst(rate)
    leaf_args = f"{FIFO} limit {shaping.fifo_limit(rate)}" if leaf_kind == FIFO else leaf_kind
    return [
        f"qdisc add dev {dev} root handle 1: htb default 1",
        f"class add dev {dev} parent 1: classid 1:1 htb rate {rate}bit ceil {rate}bit"
        f" burst {burst} cburst {burst} quantum {_QUANTUM}",
        f"qdisc add dev {dev} parent 1:1 handle 10: {leaf_args}",
    ]


def shape(
    host_rtnl: Rtnl,
    host_link: str,
    shaper_link: str,
    shaper_index: int,
    cap: shaping.Cap,
) -> str:
    """Cap the job behind `host_link`; the leaf qdisc used."""
    kind = leaf()
    down, up = cap
    links.create_ifb(host_rtnl, shaper_link, shaper_index)
    code, err = _batch(
        [
            *_htb(host_link, down, kind),
            f"qdisc add dev {host_link} handle ffff: ingress",
            f"filter add dev {host_link} parent ffff: protocol all prio 1"
            f" u32 match u32 0 0 action mirred egress redirect dev {shaper_link}",
            *_htb(shaper_link, up, kind),
        ]
    )
    if code != 0:
        first = next((line for line in err.splitlines() if line.strip()), f"exit {code}")
        raise TcError(f"tc: cannot shape {host_link}: {first.removeprefix('Error: ')}")
    return kind


def unshape(host_rtnl: Rtnl, shaper_link: str) -> bool:
    """Remove the job's IFB (its veth's qdiscs go with the veth); False if
    it was not there."""
    return links.delete_named(host_rtnl, shaper_link)
