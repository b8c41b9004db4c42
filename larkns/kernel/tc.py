"""tc: a capped job's shapers, and which queue disciplines the kernel has.

Download (to the job): HTB as the root of the host end of the job's veth,
one class at the cap (ceil = rate), a leaf qdisc under it.  Upload (from the
job): a clsact qdisc on the host end whose ingress u32 filter matches every
packet and redirects it (mirred) to the job's IFB, with the same HTB on the
IFB.  All of it is on the host side: a job that is root in its namespace
(`larkns run --privileged`) can only remove the qdiscs of its own end, which
shape nothing.

A job in the uplink's fair share (larkns/kernel/uplink.py) has that ingress
filter too, with the job's tag as its classid, and an egress filter that
sends what came through the uplink to the shared download IFB.

Encoded here as tc(8) would send them (linux/pkt_sched.h, pkt_cls.h,
tc_act/tc_mirred.h) and sent with larkns's own rtnetlink in one sendmsg:
tc(8) in batch mode added ~6 ms to a job's setup (a process), this 0.3-0.8 ms
(bench/shaping.py).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Protocol

from larkns import shaping
from larkns.kernel import links, netlink, netns, rtnl
from larkns.kernel.rtnl import NLM_F_CREATE, NLM_F_EXCL, Request, Rtnl, RtnlError

RTM_NEWQDISC = 36
RTM_DELQDISC = 37
RTM_GETQDISC = 38
RTM_NEWTCLASS = 40
RTM_NEWTFILTER = 44
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_STATS = 3
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
HTB_ROOT = 0x00010000  # 1:
HTB_CLASS = 0x00010001  # 1:1, the default class
LEAF_HANDLE = 0x000A0000  # 10:
TC_H_CLSACT = TC_H_INGRESS
CLSACT_HANDLE = 0xFFFF0000
CLSACT_INGRESS = 0xFFFFFFF2  # the parent of clsact's ingress filters
CLSACT_EGRESS = 0xFFFFFFF3  # and of its egress filters
TCA_HTB_PARMS = 1
TCA_HTB_INIT = 2
TCA_HTB_DIRECT_QLEN = 5
TCA_HTB_RATE64 = 6
TCA_HTB_CEIL64 = 7
TC_LINKLAYER_ETHERNET = 1
PSCHED_SHIFT = 6  # HTB's buffer is in ticks of 64 ns
TCA_U32_CLASSID = 1
TCA_U32_SEL = 5
TCA_U32_ACT = 7
TC_U32_TERMINAL = 1
ETH_P_ALL = 0x0003
TCA_ACT_KIND = 1
TCA_ACT_OPTIONS = 2
TCA_MIRRED_PARMS = 2
TC_ACT_STOLEN = 4
TCA_EGRESS_REDIR = 1
TCA_BPF_ACT = 1
TCA_BPF_CLASSID = 3
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_FLAG_ACT_DIRECT = 1
RTM_DELTCLASS = 41
RTM_DELTFILTER = 45
RTM_GETTFILTER = 46

_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_TC_STATS = struct.Struct("=QIIIIIII")  # bytes, packets, drops, overlimits, bps, pps, qlen, backlog
_HTB_GLOB = struct.Struct("=IIIII")  # version, rate2quantum, defcls, debug, direct_pkts
_RATESPEC = struct.Struct("=BBHhHI")  # cell_log, linklayer, overhead, cell_align, mpu, rate
_HTB_OPT_TAIL = struct.Struct("=IIIII")  # buffer, cbuffer, quantum, level, prio
_U32_SEL = struct.Struct("=BBBxHHhhI")  # flags, offshift, nkeys, offmask, off, offoff, hoff, hmask
_U32_KEY = struct.Struct("=IIii")  # mask, val, off, offmask
_MIRRED = struct.Struct("=IIiiiiI")  # index, capab, action, refcnt, bindcnt, eaction, ifindex
_FIFO = struct.Struct("=I")  # limit

# The leaf under a job's cap, best first: fq_codel (its default target: 5 ms
# of queueing delay, per flow), sfq (flows served in turn); without either, a
# byte FIFO bounded to 5 ms of the rate (shaping.fifo_limit).  The classes of
# the uplink's share take the FIFO on every kernel (uplink.LEAF says why).
LEAVES = ("fq_codel", "sfq")
FIFO = "bfifo"
# One class of its own under each HTB: its quantum only matters between
# classes, and set, it spares the kernel's "quantum is big" warnings.
_QUANTUM = 60000
_U32_MAX = 0xFFFFFFFF

_leaf: str | None = None


def _attr(kind: int, data: bytes) -> bytes:
    # Nested attributes without NLA_F_NESTED, as tc(8) sends them: the
    # kernel's tc parsers are the lenient ("deprecated") ones.
    return netlink.attr(kind, data)


def _kind(name: str) -> bytes:
    return _attr(TCA_KIND, name.encode() + b"\0")


def qdisc(
    index: int, parent: int, handle: int, kind: str, options: bytes | None, what: str
) -> Request:
    body = _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, 0) + _kind(kind)
    if options is not None:
        body += _attr(TCA_OPTIONS, options)
    return Request(what, RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body)


def _ratespec(rate_bytes: int) -> bytes:
    return _RATESPEC.pack(0, TC_LINKLAYER_ETHERNET, 0, -1, 0, min(rate_bytes, _U32_MAX))


def _buffer(rate: int) -> int:
    """HTB's burst for `rate` bits/s, in its ticks."""
    return min(shaping.burst(rate) * 10**9 // (rate // 8) >> PSCHED_SHIFT, _U32_MAX)


def htb_class(
    index: int,
    classid: int,
    parent: int,
    rate: int,
    ceil: int,
    what: str,
    quantum: int = _QUANTUM,
    flags: int = NLM_F_CREATE | NLM_F_EXCL,
) -> Request:
    """HTB class `classid` under `parent`: `rate` bits/s its own, up to
    `ceil` with what its siblings leave; among borrowing siblings, each
    sends `quantum` bytes a turn."""
    opt = (
        _ratespec(rate // 8)
        + _ratespec(ceil // 8)
        + _HTB_OPT_TAIL.pack(_buffer(rate), _buffer(ceil), quantum, 0, 0)
    )
    options = _attr(TCA_HTB_PARMS, opt)
    if rate // 8 > _U32_MAX or ceil // 8 > _U32_MAX:
        options += _attr(TCA_HTB_RATE64, struct.pack("=Q", rate // 8))
        options += _attr(TCA_HTB_CEIL64, struct.pack("=Q", ceil // 8))
    body = _TCMSG.pack(socket.AF_UNSPEC, index, classid, parent, 0) + _kind("htb")
    body += _attr(TCA_OPTIONS, options)
    return Request(what, RTM_NEWTCLASS, flags, body)


def htb_root(index: int, handle: int, default: int, dev: str) -> Request:
    """HTB as `dev`'s root; what no class takes goes to class `default`
    (0: none, then it is dropped).

    Its direct queue is 0 packets long: HTB sends a packet whose priority
    is its own handle (major:0) straight through, unshaped.  No job can
    choose the priority its packets arrive with (crossing the veth clears
    it, and larkns's classifiers set it), but should anything else, such a
    packet is dropped rather than let past the cap."""
    glob = _attr(TCA_HTB_INIT, _HTB_GLOB.pack(3, 10, default & 0xFFFF, 0, 0))
    glob += _attr(TCA_HTB_DIRECT_QLEN, struct.pack("=I", 0))
    return qdisc(index, TC_H_ROOT, handle, "htb", glob, f"add htb to {dev}")


def leaf_qdisc(
    index: int,
    parent: int,
    kind: str,
    rate: int,
    dev: str,
    handle: int = 0,
    shared: bool = False,
) -> Request:
    """The leaf qdisc `kind` under HTB class `parent` (a FIFO sized for
    `rate`, and for a class in the uplink's share if `shared`); `handle` 0:
    the kernel's choice.  It goes with the class."""
    options = _FIFO.pack(shaping.fifo_limit(rate, shared)) if kind == FIFO else None
    return qdisc(index, parent, handle, kind, options, f"add {kind} to {dev}")


def _htb(index: int, dev: str, rate: int, leaf_kind: str) -> list[Request]:
    """HTB as `dev`'s root, everything in one class at `rate` bits/s."""
    return [
        htb_root(index, HTB_ROOT, HTB_CLASS, dev),
        htb_class(
            index, HTB_CLASS, HTB_ROOT, rate, rate, f"add an htb class at {rate} bit/s to {dev}"
        ),
        leaf_qdisc(index, HTB_CLASS, leaf_kind, rate, dev, LEAF_HANDLE),
    ]


def mirred(to_index: int) -> bytes:
    """A filter's actions: redirect to `to_index`'s egress."""
    parms = _MIRRED.pack(0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, to_index)
    action = _attr(TCA_ACT_KIND, b"mirred\0") + _attr(
        TCA_ACT_OPTIONS, _attr(TCA_MIRRED_PARMS, parms)
    )
    return _attr(1, action)


def clsact(index: int, dev: str) -> Request:
    return qdisc(index, TC_H_CLSACT, CLSACT_HANDLE, "clsact", None, f"add clsact to {dev}")


def bpf_filter(
    index: int,
    parent: int,
    pref: int,
    prog_fd: int,
    name: str,
    to_index: int,
    what: str,
    handle: int = 0,
) -> Request:
    """A cls_bpf filter at priority `pref` running program `prog_fd`; what
    it matches is redirected to `to_index`.  `handle` 0: the kernel's
    choice."""
    return _bpf(
        index, parent, pref, prog_fd, name, _attr(TCA_BPF_ACT, mirred(to_index)), what, handle
    )


def bpf_direct(index: int, parent: int, pref: int, prog_fd: int, name: str, what: str) -> Request:
    """A cls_bpf filter at priority `pref` in direct-action mode: program
    `prog_fd`'s return value is the verdict (TC_ACT_OK, _SHOT, a redirect)."""
    flags = _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
    return _bpf(index, parent, pref, prog_fd, name, flags, what)


def _bpf(
    index: int,
    parent: int,
    pref: int,
    prog_fd: int,
    name: str,
    extra: bytes,
    what: str,
    handle: int = 0,
) -> Request:
    """A cls_bpf filter of every protocol running `prog_fd`, with `extra`
    options (its action, or its flags)."""
    options = (
        _attr(TCA_BPF_FD, struct.pack("=I", prog_fd))
        + _attr(TCA_BPF_NAME, name.encode() + b"\0")
        + extra
    )
    info = (pref << 16) | socket.htons(ETH_P_ALL)
    body = _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, info) + _kind("bpf")
    body += _attr(TCA_OPTIONS, options)
    return Request(what, RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, body)


def delete_filters(index: int, parent: int, pref: int, what: str) -> Request:
    """Every filter at priority `pref` under `parent`."""
    info = (pref << 16) | socket.htons(ETH_P_ALL)
    body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, info)
    return Request(what, RTM_DELTFILTER, 0, body)


def has_filters(host_rtnl: Rtnl, index: int) -> bool:
    """Whether link `index`'s clsact has any filter, ingress or egress."""
    for parent in (CLSACT_INGRESS, CLSACT_EGRESS):
        body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, 0)
        if any(t == RTM_NEWTFILTER for t, _ in host_rtnl.dump(RTM_GETTFILTER, body)):
            return True
    return False


def clsact_drops(r: Rtnl, index: int) -> int | None:
    """The packets the clsact qdisc of link `index` dropped (its filters'
    TC_ACT_SHOT, both directions); None if it has no clsact."""
    for t, payload in r.dump(RTM_GETQDISC, _TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if t != RTM_NEWQDISC or len(payload) < _TCMSG.size:
            continue
        if _TCMSG.unpack_from(payload)[1] != index:
            continue
        kind = None
        drops = None
        for a, data in netlink.attrs(payload, _TCMSG.size):
            if a == TCA_KIND:
                kind = data.rstrip(b"\0").decode()
            elif a == TCA_STATS and len(data) >= _TC_STATS.size:
                drops = _TC_STATS.unpack_from(data)[2]
        if kind == "clsact":
            return drops or 0
    return None


def delete_class(index: int, classid: int, what: str) -> Request:
    body = _TCMSG.pack(socket.AF_UNSPEC, index, classid, 0, 0)
    return Request(what, RTM_DELTCLASS, 0, body)


def _ingress(index: int, dev: str, tag: int, to_index: int | None, to: str) -> list[Request]:
    """A clsact qdisc on `dev` whose ingress filter matches every packet:
    classid `tag` (0: none), which the kernel leaves in the packet's
    tc_index, and a redirect to `to_index`'s egress (None: none)."""
    sel = _U32_SEL.pack(TC_U32_TERMINAL, 0, 1, 0, 0, 0, 0, 0) + _U32_KEY.pack(0, 0, 0, 0)
    options = _attr(TCA_U32_SEL, sel)
    if tag:
        options = _attr(TCA_U32_CLASSID, struct.pack("=I", tag)) + options
    if to_index is not None:
        options += _attr(TCA_U32_ACT, mirred(to_index))
    info = (1 << 16) | socket.htons(ETH_P_ALL)  # priority 1, every protocol
    body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, CLSACT_INGRESS, info) + _kind("u32")
    body += _attr(TCA_OPTIONS, options)
    what = (
        f"redirecting {dev}'s ingress to {to}"
        if to_index is not None
        else f"tagging {dev}'s ingress"
    )
    return [
        clsact(index, dev),
        Request(f"add a u32 filter {what}", RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, body),
    ]


def probe(kinds: tuple[str, ...]) -> dict[str, bool]:
    """Which qdiscs of `kinds` the kernel has, tried on the loopback of a
    throwaway namespace (the kernel has no list of them).  A kind the kernel
    knows but refuses without options (tbf) is there: only ENOENT means
    an unknown kind."""
    found = {}
    with netns.throwaway(), Rtnl() as r:
        for kind in kinds:
            root = qdisc(1, TC_H_ROOT, HTB_ROOT, kind, None, f"add {kind}")
            try:
                r.run(root)
            except RtnlError as e:
                found[kind] = e.errno != errno.ENOENT
                continue
            found[kind] = True
            r.run(Request(f"delete {kind}", RTM_DELQDISC, 0, root.body))
    return found


def leaf() -> str:
    """The leaf qdisc larkns puts under HTB here (probed once per process)."""
    global _leaf
    if _leaf is None:
        have = probe(LEAVES)
        _leaf = next((k for k in LEAVES if have[k]), FIFO)
    return _leaf


def _delete_root(index: int, dev: str) -> Request:
    body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, TC_H_ROOT, 0)
    return Request(f"delete the root qdisc of {dev}", RTM_DELQDISC, 0, body)


# What deleting a root qdisc that is not there answers (none yet: ENOENT;
# the default one: EINVAL).
_NO_ROOT = (errno.ENOENT, errno.EINVAL)


Spare = tuple[int, str]  # an IFB kept for another job: index, name


def _ifb(host_rtnl: Rtnl, name: str, index: int, spare: Spare | None) -> int:
    """The job's IFB, up, with no qdisc of larkns's: `spare` renamed, if it
    is still there; else a new one."""
    if spare is not None:
        idx, spare_name = spare
        found = host_rtnl.link(idx)
        if found is not None and found.name == spare_name:
            host_rtnl.run(_delete_root(idx, spare_name), ignore=_NO_ROOT)
            host_rtnl.run(rtnl.rename(idx, name, up=True))
            return idx
    return links.create_ifb(host_rtnl, name, index)


def shape(
    host_rtnl: Rtnl,
    host_link: str,
    shaper_link: str,
    shaper_index: int,
    cap: shaping.Cap | None,
    spare: Spare | None = None,
    share: JobShare | None = None,
) -> str:
    """Cap the job behind `host_link` (None: no cap), its upload on IFB
    `shaper_link` (`spare` renamed, if given and still there), and put it
    in the uplink's share; the leaf qdisc used."""
    kind = leaf()
    host = host_rtnl.link_index(host_link)
    if host is None:
        raise OSError(errno.ENODEV, f"cannot shape {host_link}: no such link")
    ifb = None if cap is None else _ifb(host_rtnl, shaper_link, shaper_index, spare)
    _build(host_rtnl, host, host_link, ifb, shaper_link, cap, share, kind)
    return kind


class JobShare(Protocol):
    """A job's part in the uplink's share (larkns/kernel/uplink.py)."""

    @property
    def tag(self) -> int:
        """The classid of the job's ingress filter."""

    def join(self, host_rtnl: Rtnl, host: int, host_link: str, before: list[Request]) -> None:
        """Run `before`, then what puts the job in the share, in one sendmsg."""

    def leave(self, host_rtnl: Rtnl) -> None:
        """Remove what the job has in the share."""


def _build(
    host_rtnl: Rtnl,
    host: int,
    host_link: str,
    ifb: int | None,
    shaper_link: str,
    cap: shaping.Cap | None,
    share: JobShare | None,
    kind: str,
) -> None:
    requests = []
    if cap is not None and ifb is not None:
        requests += _htb(host, host_link, cap[0], kind)
        requests += _htb(ifb, shaper_link, cap[1], kind)
    requests += _ingress(host, host_link, share.tag if share else 0, ifb, shaper_link)
    if share is None:
        host_rtnl.run(*requests)
    else:
        share.join(host_rtnl, host, host_link, requests)


def reshape(
    host_rtnl: Rtnl,
    host_link: str,
    shaper_link: str,
    cap: shaping.Cap | None,
    share: JobShare | None = None,
) -> bool:
    """Put a job's shapers back whole (someone deleted a qdisc of them):
    what is left of them goes, then all is added again, in one sendmsg
    each.  False if the job's links are gone (it is being torn down)."""
    host = host_rtnl.link_index(host_link)
    ifb = None if cap is None else host_rtnl.link_index(shaper_link)
    if host is None or (cap is not None and ifb is None):
        return False
    deletes = [_delete_root(host, host_link), delete_clsact(host, host_link)]
    if ifb is not None:
        deletes.append(_delete_root(ifb, shaper_link))
    host_rtnl.run(*deletes, ignore=_NO_ROOT)
    if share is not None:
        share.leave(host_rtnl)
    _build(host_rtnl, host, host_link, ifb, shaper_link, cap, share, leaf())
    return True


def delete_clsact(index: int, dev: str) -> Request:
    body = _TCMSG.pack(socket.AF_UNSPEC, index, CLSACT_HANDLE, TC_H_CLSACT, 0)
    return Request(f"delete the clsact qdisc of {dev}", RTM_DELQDISC, 0, body)


def deleted_qdiscs(data: bytes, own: int) -> list[int]:
    """The links whose root or ingress qdisc the rtnetlink messages in
    `data` say was deleted (RTNLGRP_TC), but not by the socket whose port
    id is `own` (larkns's own: putting shapers back deletes what is left
    of them first)."""
    out = []
    for mtype, _seq, pid, payload in netlink.messages(data):
        if mtype == RTM_DELQDISC and pid != own and len(payload) >= _TCMSG.size:
            _fam, index, _handle, parent, _info = _TCMSG.unpack_from(payload)
            if parent in (TC_H_ROOT, TC_H_INGRESS):
                out.append(index)
    return out


def unshape(host_rtnl: Rtnl, shaper_link: str) -> bool:
    """Remove the job's IFB (its veth's qdiscs go with the veth); False if
    it was not there."""
    return links.delete_named(host_rtnl, shaper_link)


def park(host_rtnl: Rtnl, shaper_link: str, spare_prefix: str) -> Spare | None:
    """Keep the job's IFB for another job: down, bare, renamed `spare_prefix`
    + its index.  None if it was not there, or could not be kept (then it
    is removed)."""
    idx = host_rtnl.link_index(shaper_link)
    if idx is None:
        return None
    spare = f"{spare_prefix}{idx}"
    try:
        host_rtnl.run(_delete_root(idx, shaper_link), ignore=_NO_ROOT)
        host_rtnl.run(rtnl.link_down(idx, shaper_link), rtnl.rename(idx, spare, up=False))
    except RtnlError:
        links.delete_named(host_rtnl, shaper_link)
        return None
    return idx, spare
