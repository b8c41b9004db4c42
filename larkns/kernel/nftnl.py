"""nf_tables over netlink, for what larkns does per job.

libnftables (the `nft` library) is the right tool to declare a table, but
before any command it loads a cache of the ruleset: with 500 jobs alive,
adding one map element took 7 ms and reading one counter 26-30 ms, growing
with every job.  The kernel itself finds a set element or a named object in
O(1).  So the per-job operations (counter objects, set/map elements, reading
counters) are encoded here and sent in one nfnetlink batch, one transaction.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFPROTO_INET = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000

NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NFT_MSG_DELOBJ = 20

NFTA_OBJ_TABLE = 1
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFTA_OBJ_DATA = 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_OBJREF = 9  # after NFTA_SET_ELEM_PAD
NFTA_DATA_VALUE = 1

IFNAMSIZ = 16

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian)


class NftnlError(OSError):
    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.what = what


def _attr(kind: int, data: bytes, nested: bool = False) -> bytes:
    length = 4 + len(data)
    return (
        struct.pack("=HH", length, kind | (NLA_F_NESTED if nested else 0))
        + data
        + b"\0" * (-length % 4)
    )


def _str(s: str) -> bytes:
    return s.encode() + b"\0"


def ifname_key(name: str) -> bytes:
    """A set key of type ifname: the name, NUL-padded to IFNAMSIZ."""
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {name}")
    return raw.ljust(IFNAMSIZ, b"\0")


@dataclass(frozen=True)
class Op:
    what: str
    type: int
    flags: int
    attrs: bytes


def add_counter(table: str, name: str) -> Op:
    attrs = (
        _attr(NFTA_OBJ_TABLE, _str(table))
        + _attr(NFTA_OBJ_NAME, _str(name))
        + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
        + _attr(
            NFTA_OBJ_DATA,
            _attr(NFTA_COUNTER_BYTES, struct.pack("!Q", 0))
            + _attr(NFTA_COUNTER_PACKETS, struct.pack("!Q", 0)),
            nested=True,
        )
    )
    return Op(f"add counter {name}", NFT_MSG_NEWOBJ, NLM_F_CREATE | NLM_F_EXCL, attrs)


def delete_counter(table: str, name: str) -> Op:
    attrs = (
        _attr(NFTA_OBJ_TABLE, _str(table))
        + _attr(NFTA_OBJ_NAME, _str(name))
        + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
    )
    return Op(f"delete counter {name}", NFT_MSG_DELOBJ, 0, attrs)


def _element(table: str, set_name: str, key: bytes, objref: str | None) -> bytes:
    elem = _attr(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key), nested=True)
    if objref is not None:
        elem += _attr(NFTA_SET_ELEM_OBJREF, _str(objref))
    return (
        _attr(NFTA_SET_ELEM_LIST_TABLE, _str(table))
        + _attr(NFTA_SET_ELEM_LIST_SET, _str(set_name))
        + _attr(NFTA_SET_ELEM_LIST_ELEMENTS, _attr(NFTA_LIST_ELEM, elem, nested=True), nested=True)
    )


def add_element(table: str, set_name: str, key: bytes, objref: str | None = None) -> Op:
    """An element of a set, or of a map to named objects (objref)."""
    return Op(
        f"add element to {set_name}",
        NFT_MSG_NEWSETELEM,
        NLM_F_CREATE | NLM_F_EXCL,
        _element(table, set_name, key, objref),
    )


def delete_element(table: str, set_name: str, key: bytes) -> Op:
    return Op(
        f"delete element from {set_name}",
        NFT_MSG_DELSETELEM,
        0,
        _element(table, set_name, key, None),
    )


class Nftnl:
    """An nfnetlink socket in the netns of the thread that made it."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.bind((0, 0))
        # A lost reply must not hang a job's setup forever.
        self._sock.settimeout(10)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _msg(
        self, mtype: int, flags: int, family: int, res_id: int, attrs: bytes
    ) -> tuple[int, bytes]:
        self._seq += 1
        body = _NFGEN.pack(family, 0, socket.htons(res_id)) + attrs
        return self._seq, _HDR.pack(_HDR.size + len(body), mtype, flags, self._seq, 0) + body

    def batch(self, ops: list[Op], ignore: tuple[int, ...] = ()) -> None:
        """Run `ops` as one transaction: all of them, or (on any error) none."""
        begin_seq, begin = self._msg(
            NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b""
        )
        seqs: dict[int, Op] = {}
        out = bytearray(begin)
        for op in ops:
            seq, msg = self._msg(
                (NFNL_SUBSYS_NFTABLES << 8) | op.type,
                NLM_F_REQUEST | NLM_F_ACK | op.flags,
                NFPROTO_INET,
                0,
                op.attrs,
            )
            seqs[seq] = op
            out += msg
        _, end = self._msg(
            NFNL_MSG_BATCH_END, NLM_F_REQUEST, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b""
        )
        out += end
        self._sock.sendall(out)
        failure: NftnlError | None = None
        pending = set(seqs)
        while pending:
            data = self._sock.recv(1 << 16)
            for mtype, seq, payload in _messages(data):
                if mtype != NLMSG_ERROR:
                    continue
                (code,) = struct.unpack_from("=i", payload)
                if seq == begin_seq and code:
                    # The whole batch was refused (no permission, no
                    # nf_tables): no message of it will be answered.
                    raise NftnlError(-code, "start an nf_tables transaction")
                if seq not in pending:
                    continue
                pending.discard(seq)
                if code and -code not in ignore and failure is None:
                    failure = NftnlError(-code, seqs[seq].what)
        if failure is not None:
            raise failure

    def counters(self, table: str, names: list[str]) -> dict[str, tuple[int, int]]:
        """name -> (packets, bytes) of named counters; missing ones are left out."""
        out_msgs = bytearray()
        asked: dict[int, str] = {}
        for name in names:
            attrs = (
                _attr(NFTA_OBJ_TABLE, _str(table))
                + _attr(NFTA_OBJ_NAME, _str(name))
                + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
            )
            seq, msg = self._msg(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ, NLM_F_REQUEST, NFPROTO_INET, 0, attrs
            )
            asked[seq] = name
            out_msgs += msg
        self._sock.sendall(out_msgs)
        found: dict[str, tuple[int, int]] = {}
        pending = set(asked)
        while pending:
            data = self._sock.recv(1 << 16)
            for mtype, seq, payload in _messages(data):
                if seq not in pending:
                    continue
                pending.discard(seq)
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if -code != errno.ENOENT:
                        raise NftnlError(-code, f"read counter {asked[seq]}")
                    continue
                found[asked[seq]] = _counter_values(payload)
        return found


def _messages(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos + _HDR.size <= len(data):
        length, mtype, _flags, seq, _pid = _HDR.unpack_from(data, pos)
        if length < _HDR.size:
            break
        out.append((mtype, seq, data[pos + _HDR.size : pos + length]))
        pos += (length + 3) & ~3
    return out


def _attrs(payload: bytes, offset: int) -> dict[int, bytes]:
    out = {}
    pos = offset
    while pos + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, pos)
        if length < 4:
            break
        out[kind & 0x3FFF] = payload[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return out


def _counter_values(payload: bytes) -> tuple[int, int]:
    data = _attrs(_attrs(payload, _NFGEN.size).get(NFTA_OBJ_DATA, b""), 0)
    (packets,) = struct.unpack("!Q", data.get(NFTA_COUNTER_PACKETS, bytes(8)))
    (nbytes,) = struct.unpack("!Q", data.get(NFTA_COUNTER_BYTES, bytes(8)))
    return packets, nbytes
