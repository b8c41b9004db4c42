"""The two tc classifiers that put jobs' traffic into the uplink's fair share
(larkns/kernel/uplink.py), as eBPF instructions, and their loading.

Each is a handful of instructions, assembled here rather than compiled from
C: no compiler, no object file, no libbpf on a worker.  Both run in cls_bpf's
classic mode (not direct-action): a return of -1 is a match, after which the
filter's action (a mirred redirect to the shared IFB) runs; 0 is no match.

What they read and write is the kernel's `struct __sk_buff` (linux/bpf.h),
whose offsets are ABI.
"""

from __future__ import annotations

import struct

from larkns import core

# struct __sk_buff offsets (linux/bpf.h)
SKB_PRIORITY = 32
SKB_INGRESS_IFINDEX = 36
SKB_TC_INDEX = 44

# Opcodes (linux/bpf_common.h, linux/bpf.h)
_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_STX_W = 0x63  # BPF_STX | BPF_MEM | BPF_W
_MOV64_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
_OR64_K = 0x47  # BPF_ALU64 | BPF_OR | BPF_K
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K
_EXIT = 0x95  # BPF_JMP | BPF_EXIT
R0, R1, R2 = 0, 1, 2

_INSN = struct.Struct("=BBhi")  # code, dst:4 src:4, off, imm


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    # imm is a signed 32-bit field: a classid above 0x7fffffff is its two's
    # complement (stored as 32 bits, it comes out the same).
    if imm >= 1 << 31:
        imm -= 1 << 32
    return _INSN.pack(code, (src << 4) | dst, off, imm)


_MATCH = _insn(_MOV64_K, R0, imm=-1) + _insn(_EXIT)
_NO_MATCH = _insn(_MOV64_K, R0, imm=0) + _insn(_EXIT)


def download(uplink: int, classid: int, bridge: int = 0) -> bytes:
    """On a job's host link (egress): a packet that came in through the
    uplink (ifindex `uplink`; or through `bridge`, the bridge the uplink is
    a port of, whence a routed packet comes) gets priority `classid`, which
    picks the job's class on the shared IFB, and matches.  Anything else
    (the node's own packets, another job's) does not: it is not the
    uplink's to share.

        r0 = skb->ingress_ifindex
        if r0 == uplink: goto set
        if r0 != bridge: return 0
    set:
        skb->priority = classid
        return -1
    """
    return (
        _insn(_LDX_W, R0, R1, SKB_INGRESS_IFINDEX)
        + _insn(_JEQ_K, R0, off=1, imm=uplink)
        + _insn(_JNE_K, R0, off=4, imm=bridge or uplink)
        + _insn(_MOV64_K, R2, imm=classid)
        + _insn(_STX_W, R1, R2, SKB_PRIORITY)
        + _MATCH
        + _NO_MATCH
    )


def upload(major: int) -> bytes:
    """On the uplink (egress): a packet that a job's host link tagged (its
    tc_index, set there from the ingress filter's classid, survives
    forwarding and NAT, where the kernel resets IPv4's priority from the TOS)
    gets priority major:tag, the job's class on the shared IFB, and matches.

        r0 = skb->tc_index
        if r0 == 0: return 0
        skb->priority = major << 16 | r0
        return -1
    """
    return (
        _insn(_LDX_W, R0, R1, SKB_TC_INDEX)
        + _insn(_JEQ_K, R0, off=4, imm=0)
        + _insn(_OR64_K, R0, imm=major << 16)
        + _insn(_STX_W, R1, R0, SKB_PRIORITY)
        + _MATCH
        + _NO_MATCH
    )


def load(insns: bytes, name: str) -> int:
    """The classifier's fd (the caller closes it once a filter holds it)."""
    return core.bpf_prog_load(core.BPF_PROG_TYPE_SCHED_CLS, insns, name)
