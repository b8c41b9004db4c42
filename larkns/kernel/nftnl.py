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
import socket
import struct
from dataclasses import dataclass

from larkns.kernel import netlink
from larkns.kernel.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFPROTO_INET = 1
NFPROTO_BRIDGE = 7
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

NFT_MSG_GETTABLE = 1
NFTA_TABLE_NAME = 1
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
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_OBJREF = 9  # after NFTA_SET_ELEM_PAD
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFT_JUMP = -3

IFNAMSIZ = 16

_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian)


NftnlError = netlink.NetlinkError
_attr = netlink.attr


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


def add_counter(table: str, name: str, packets: int = 0, nbytes: int = 0) -> Op:
    """A named counter, starting from `packets` and `nbytes` (a job's
    counters put back after a flush go on from where they were)."""
    attrs = (
        _attr(NFTA_OBJ_TABLE, _str(table))
        + _attr(NFTA_OBJ_NAME, _str(name))
        + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
        + _attr(
            NFTA_OBJ_DATA,
            _attr(NFTA_COUNTER_BYTES, struct.pack("!Q", nbytes))
            + _attr(NFTA_COUNTER_PACKETS, struct.pack("!Q", packets)),
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


def _element(
    table: str,
    set_name: str,
    key: bytes,
    objref: str | None,
    data: bytes | None = None,
    jump: str | None = None,
) -> bytes:
    elem = _attr(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key), nested=True)
    if objref is not None:
        elem += _attr(NFTA_SET_ELEM_OBJREF, _str(objref))
    if data is not None:
        elem += _attr(NFTA_SET_ELEM_DATA, _attr(NFTA_DATA_VALUE, data), nested=True)
    if jump is not None:
        verdict = _attr(NFTA_VERDICT_CODE, struct.pack("!i", NFT_JUMP)) + _attr(
            NFTA_VERDICT_CHAIN, _str(jump)
        )
        elem += _attr(
            NFTA_SET_ELEM_DATA, _attr(NFTA_DATA_VERDICT, verdict, nested=True), nested=True
        )
    return (
        _attr(NFTA_SET_ELEM_LIST_TABLE, _str(table))
        + _attr(NFTA_SET_ELEM_LIST_SET, _str(set_name))
        + _attr(NFTA_SET_ELEM_LIST_ELEMENTS, _attr(NFTA_LIST_ELEM, elem, nested=True), nested=True)
    )


def add_element(
    table: str,
    set_name: str,
    key: bytes,
    objref: str | None = None,
    data: bytes | None = None,
    jump: str | None = None,
) -> Op:
    """An element of a set, of a map to named objects (objref), of a map
    to values (data), or of a verdict map (jump to a chain)."""
    return Op(
        f"add element to {set_name}",
        NFT_MSG_NEWSETELEM,
        NLM_F_CREATE | NLM_F_EXCL,
        _element(table, set_name, key, objref, data, jump),
    )


def concat_key(*parts: bytes) -> bytes:
    """A key of a concatenated set type (ifname . ipv4_addr, ...): each part
    padded to a multiple of 4 bytes, as the kernel's registers hold them."""
    return b"".join(p.ljust((len(p) + 3) // 4 * 4, b"\0") for p in parts)


def port_key(port: int) -> bytes:
    """A set key of type inet_service: the port in network order."""
    return struct.pack("!H", port)


def delete_element(table: str, set_name: str, key: bytes) -> Op:
    return Op(
        f"delete element from {set_name}",
        NFT_MSG_DELSETELEM,
        0,
        _element(table, set_name, key, None),
    )


class Nftnl(netlink.Socket):
    """An nfnetlink socket in the netns of the thread that made it."""

    def __init__(self, family: int = NFPROTO_INET) -> None:
        super().__init__(NETLINK_NETFILTER)
        self.family = family  # of the tables this socket works on

    def _msg(
        self, mtype: int, flags: int, family: int, res_id: int, attrs: bytes
    ) -> tuple[int, bytes]:
        return self.message(mtype, flags, _NFGEN.pack(family, 0, socket.htons(res_id)) + attrs)

    def batch(self, ops: list[Op], ignore: tuple[int, ...] = ()) -> None:
        """Run `ops` as one transaction: all of them, or (on any error) none."""
        begin_seq, out = self._msg(
            NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b""
        )
        pending: dict[int, str] = {}
        for op in ops:
            seq, msg = self._msg(
                (NFNL_SUBSYS_NFTABLES << 8) | op.type,
                NLM_F_REQUEST | NLM_F_ACK | op.flags,
                self.family,
                0,
                op.attrs,
            )
            pending[seq] = op.what
            out += msg
        _, end = self._msg(
            NFNL_MSG_BATCH_END, NLM_F_REQUEST, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b""
        )
        self.send(out + end)
        # An error on the batch's start (no permission, no nf_tables) means
        # no message of it will be answered.
        self.await_acks(pending, ignore, refusal=(begin_seq, "start an nf_tables transaction"))

    def has_table(self, table: str) -> bool:
        """Whether this socket's family has `table`: one lookup, no
        transaction (a failed transaction costs the kernel an RCU grace
        period, 5-12 ms measured here, before it answers)."""
        seq, msg = self._msg(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
            NLM_F_REQUEST,
            self.family,
            0,
            _attr(NFTA_TABLE_NAME, _str(table)),
        )
        self.send(msg)
        while True:
            for mtype, got, payload in self.receive():
                if got != seq:
                    continue
                if mtype != NLMSG_ERROR:
                    return True
                code = netlink.error_code(payload)
                if code == errno.ENOENT:
                    return False
                raise NftnlError(code, f"look up table {table}")

    def counters(self, table: str, names: list[str]) -> dict[str, tuple[int, int]]:
        """name -> (packets, bytes) of named counters; missing ones are left out."""
        out = b""
        asked: dict[int, str] = {}
        for name in names:
            attrs = (
                _attr(NFTA_OBJ_TABLE, _str(table))
                + _attr(NFTA_OBJ_NAME, _str(name))
                + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
            )
            seq, msg = self._msg(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ, NLM_F_REQUEST, self.family, 0, attrs
            )
            asked[seq] = name
            out += msg
        self.send(out)
        found: dict[str, tuple[int, int]] = {}
        pending = set(asked)
        while pending:
            for mtype, seq, payload in self.receive():
                if seq not in pending:
                    continue
                pending.discard(seq)
                if mtype == NLMSG_ERROR:
                    code = netlink.error_code(payload)
                    if code != errno.ENOENT:
                        raise NftnlError(code, f"read counter {asked[seq]}")
                    continue
                found[asked[seq]] = _counter_values(payload)
        return found


def _counter_values(payload: bytes) -> tuple[int, int]:
    obj = dict(netlink.attrs(payload, _NFGEN.size))
    data = dict(netlink.attrs(obj.get(NFTA_OBJ_DATA, b""), 0))
    (packets,) = struct.unpack("!Q", data.get(NFTA_COUNTER_PACKETS, bytes(8)))
    (nbytes,) = struct.unpack("!Q", data.get(NFTA_COUNTER_BYTES, bytes(8)))
    return packets, nbytes
