"""The node's uplink shared among its jobs by weight, in both directions.

With LARKNS_UPLINK_BANDWIDTH set, what jobs send out of the uplink and what
comes in through it for them each pass one HTB whose root class is the
uplink's capacity for jobs, with a class per job under it:

    IFB lkshare.down   4c4b: htb, 4c4b:1 at the download capacity,
                       4c4b:N per job (N = slot + 2)
    IFB lkshare.up     the same for the upload
    the uplink         clsact; an egress bpf filter (priority 0x4c4b) sends
                       jobs' packets to lkshare.up
    a job's host link  clsact; its ingress filter tags every packet from the
                       job with N (classid -> tc_index); an egress bpf filter
                       sends what came through the uplink to lkshare.down

A job's class guarantees next to nothing (8 kbit/s) and may take the whole
capacity (or its own cap, if lower): all of it is lent by the root class,
which HTB hands out among the borrowing classes in turns of `quantum`
bytes each, so that each job gets its weight's part of what the others
leave idle, and one alone gets all of it.  The quantum is 64 KiB per unit
of weight: HTB sends at least one packet a turn whatever the quantum, and a
packet through a veth is up to 64 KiB (GSO), so a smaller quantum would not
be honoured (hence weights of at least 1).

The node's own traffic (HTCondor's file transfers) is not tagged and not
shared.  Download is shaped where the job's packets leave for its link,
after NAT has put back the job's address (on the uplink's ingress they
still carry the node's); upload on the uplink's egress, the only place
that knows a packet leaves the node (the job's link's ingress sees its
traffic to the node and to other jobs too).  The tag carries the job across
forwarding and NAT: for IPv4 the kernel resets a forwarded packet's
priority from its TOS, but leaves tc_index alone.  On a worker whose uplink
is a port of a bridge, routed (nat) jobs' downloads come in through the
bridge, bridged jobs' through the port: the download classifier takes both.

Measured: weights 1:3 get 0.249-0.261 and 0.739-0.751 of a 40 Mbit/s
uplink both ways (tests/test_uplink.py); Jain's index of 32 equal jobs on
100 Mbit/s 0.998 (bench/shaping.py); a job's setup costs no more in the
share (7.0 ms p50 against 7.6 without, in-process) and its teardown 0.5 ms
more (its two classes).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from larkns import shaping
from larkns.kernel import bpf, links, tc
from larkns.kernel.rtnl import NLM_F_CREATE, Request, Rtnl, RtnlError
from larkns.plan import SHARE_DOWN_LINK, SHARE_UP_LINK

DOWN_LINK = SHARE_DOWN_LINK
UP_LINK = SHARE_UP_LINK
MAJOR = 0x4C4B  # "LK"
HANDLE = MAJOR << 16
ROOT = HANDLE | 1
# Our filter on the uplink's egress: a priority (and handle) of our own, so
# that adding it twice is refused and removing it leaves others' filters.
PREF = MAJOR
FILTER_HANDLE = 1
QUANTUM_PER_WEIGHT = 65536
# What a job's class has of its own: next to nothing, all else is borrowed.
GUARANTEE = shaping.MIN_RATE
# A job's class holds a byte FIFO (20 ms of its ceiling, at least two 64 KiB
# packets: shaping.fifo_limit) on every kernel, not the fq_codel of a job's
# cap.  HTB serves the classes in turns of their quantum, so a packet waits
# in its leaf through the other jobs' turns (13 ms for a 64 KiB turn at
# 40 Mbit/s, 118 ms for a weight of 9, more with more jobs); CoDel takes that
# wait for its own queue's delay and drops, and a class that drops lends its
# turns away.  On Debian 12's 6.1 (tests/vm, 40 Mbit/s, 6 runs each, some
# beside another guest): weights 1:3 gave the light job 0.242-0.403 with
# fq_codel (7 of 12 directions outside 0.225-0.275; CoDel dropped 8-78
# packets a class in a 6 s transfer) and 0.246-0.292 with the FIFO (4, all
# while another guest loaded the host; it dropped 0-13); 1:9 gave 0.084-0.121
# with fq_codel, 0.101-0.118 with the FIFO in the runs with the host idle.
# fq_codel with a 50 ms target kept 1:3 (0.245-0.273) but gave 1:9 0.034
# once: no target outlasts every round.  The FIFO's price: the light job's
# ping under load took 55-255 ms (median of each run), 2-61 ms with fq_codel.
LEAF = tc.FIFO
_MISSING = (errno.ENOENT, errno.ENODEV, errno.EINVAL)


def classid(slot: int) -> int:
    """The class of the job in `slot` on both IFBs; its minor is also the
    tag its packets carry (tc_index is 16 bits, and 0 means untagged)."""
    if not 0 <= slot < 0xFFFF - 1:
        raise ValueError(f"slot {slot} has no class in the uplink's share")
    return HANDLE | (slot + 2)


def quantum(weight: float) -> int:
    return round(weight * QUANTUM_PER_WEIGHT)


@dataclass(frozen=True)
class Shared:
    """The node's share, as this process made or found it."""

    uplink: str
    uplink_index: int
    bridge: int  # the bridge the uplink is a port of (0: none)
    down: int  # the IFBs' indexes
    up: int
    capacity: shaping.Cap


def find_uplink(rtnl: Rtnl, name: str | None) -> tuple[str, int]:
    """The uplink `name` (None: the link of the IPv4, else the IPv6,
    default route): (name, index)."""
    if name is not None:
        idx = rtnl.link_index(name)
        if idx is None:
            raise OSError(errno.ENODEV, f"LARKNS_UPLINK: no link {name!r} on this worker")
        return name, idx
    for family in (socket.AF_INET, socket.AF_INET6):
        oifs = {r.oif for r in rtnl.default_routes(family) if r.oif is not None}
        if len(oifs) == 1:
            idx = oifs.pop()
            link = rtnl.link(idx)
            if link is not None:
                return link.name, idx
        elif oifs:
            raise OSError(
                errno.EINVAL,
                "LARKNS_UPLINK_BANDWIDTH: default routes through several links; "
                "set LARKNS_UPLINK to the one jobs share",
            )
    raise OSError(
        errno.ENODEV,
        "LARKNS_UPLINK_BANDWIDTH: no default route to find the uplink by; set LARKNS_UPLINK",
    )


def _ifb(rtnl: Rtnl, name: str) -> int:
    idx = rtnl.link_index(name)
    return idx if idx is not None else links.create_ifb(rtnl, name, 0)


def ensure(rtnl: Rtnl, uplink: str | None, capacity: shaping.Cap) -> Shared:
    """The node's share, made if missing: both IFBs with their HTB, the
    root classes at `capacity` (changed to it if they were there), the
    uplink's filter.  Several processes may do this at once: each step
    takes what another made first."""
    name, uplink_index = find_uplink(rtnl, uplink)
    down, up = _ifb(rtnl, DOWN_LINK), _ifb(rtnl, UP_LINK)
    rtnl.run(
        tc.htb_root(down, HANDLE, 0, DOWN_LINK),
        tc.htb_root(up, HANDLE, 0, UP_LINK),
        tc.clsact(uplink_index, name),
        ignore=(errno.EEXIST,),
    )
    rtnl.run(
        *(
            tc.htb_class(
                idx,
                ROOT,
                HANDLE,
                rate,
                rate,
                f"set {dev}'s capacity to {rate} bit/s",
                flags=NLM_F_CREATE,
            )
            for idx, dev, rate in ((down, DOWN_LINK, capacity[0]), (up, UP_LINK, capacity[1]))
        )
    )
    fd = bpf.load(bpf.upload(MAJOR), "larkns_up")
    try:
        rtnl.run(
            tc.bpf_filter(
                uplink_index,
                tc.CLSACT_EGRESS,
                PREF,
                fd,
                "larkns_up",
                up,
                f"add a bpf filter sending jobs' packets on {name} to {UP_LINK}",
                handle=FILTER_HANDLE,
            ),
            ignore=(errno.EEXIST,),
        )
    finally:
        os.close(fd)
    link = rtnl.link(uplink_index)
    bridge = link.master if link is not None else 0
    return Shared(name, uplink_index, bridge, down, up, capacity)


def class_requests(
    shared: Shared, slot: int, weight: float, cap: shaping.Cap | None
) -> list[Request]:
    """The job's classes (and their leaves) on both IFBs."""
    cid = classid(slot)
    out = []
    for i, (idx, dev) in enumerate(((shared.down, DOWN_LINK), (shared.up, UP_LINK))):
        ceil = shared.capacity[i] if cap is None else min(cap[i], shared.capacity[i])
        out += [
            tc.htb_class(
                idx,
                cid,
                ROOT,
                min(GUARANTEE, ceil),
                ceil,
                f"add the job's class {cid >> 16:x}:{cid & 0xFFFF:x} to {dev}",
                quantum=quantum(weight),
            ),
            tc.leaf_qdisc(idx, cid, LEAF, ceil, dev, shared=True),
        ]
    return out


@dataclass(frozen=True)
class Member:
    """A job in the share (tc.JobShare)."""

    shared: Shared
    slot: int
    weight: float
    cap: shaping.Cap | None

    @property
    def tag(self) -> int:
        return classid(self.slot)

    def join(self, host_rtnl: Rtnl, host: int, host_link: str, before: list[Request]) -> None:
        """`before` (the job's own shapers and its tagging filter, which
        make the clsact), then the job's classes and its link's download
        filter, in one sendmsg."""
        prog = bpf.download(self.shared.uplink_index, self.tag, self.shared.bridge)
        fd = bpf.load(prog, "larkns_down")
        try:
            host_rtnl.run(
                *before,
                *class_requests(self.shared, self.slot, self.weight, self.cap),
                tc.bpf_filter(
                    host,
                    tc.CLSACT_EGRESS,
                    1,
                    fd,
                    "larkns_down",
                    self.shared.down,
                    f"add a bpf filter sending {host_link}'s download to {DOWN_LINK}",
                ),
            )
        finally:
            os.close(fd)

    def leave(self, host_rtnl: Rtnl) -> None:
        leave(host_rtnl, self.slot)


def leave(rtnl: Rtnl, slot: int) -> None:
    """Remove the job's classes (its link's filters go with the link)."""
    cid = classid(slot)
    for dev in (DOWN_LINK, UP_LINK):
        idx = rtnl.link_index(dev)
        if idx is not None:
            rtnl.run(tc.delete_class(idx, cid, f"delete class {cid:x} of {dev}"), ignore=_MISSING)


def remove(rtnl: Rtnl, uplink: str | None) -> list[str]:
    """Remove the node's share (no job is left in it); what was removed."""
    removed = [f"link {dev}" for dev in (DOWN_LINK, UP_LINK) if links.delete_named(rtnl, dev)]
    try:
        name, idx = find_uplink(rtnl, uplink)
    except OSError:
        return removed
    try:
        rtnl.run(
            tc.delete_filters(idx, tc.CLSACT_EGRESS, PREF, f"delete larkns's filter on {name}"),
        )
        removed.append(f"the bpf filter on {name}")
    except RtnlError as e:
        if e.errno not in _MISSING:
            raise
    # The clsact goes too, unless someone else's filters are on it.
    if not tc.has_filters(rtnl, idx):
        rtnl.run(tc.delete_clsact(idx, name), ignore=_MISSING)
    return removed
