"""Netlink framing shared by rtnl.py and nftnl.py: messages, attributes, acks."""

from __future__ import annotations

import os
import socket
import struct

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid


class NetlinkError(OSError):
    """The kernel refused request `what`."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.what = what


def attr(kind: int, data: bytes, nested: bool = False) -> bytes:
    length = 4 + len(data)
    header = struct.pack("=HH", length, kind | (NLA_F_NESTED if nested else 0))
    return header + data + b"\0" * (-length % 4)


def attrs(payload: bytes, offset: int) -> list[tuple[int, bytes]]:
    """(type, data) of the attributes from `offset` on."""
    out = []
    pos = offset
    while pos + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, pos)
        if length < 4:
            break
        out.append((kind & 0x3FFF, payload[pos + 4 : pos + length]))
        pos += (length + 3) & ~3
    return out


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, seq, sender's port id, payload) of each message in a datagram."""
    out = []
    pos = 0
    while pos + HDR.size <= len(data):
        length, mtype, _flags, seq, pid = HDR.unpack_from(data, pos)
        if length < HDR.size:
            break
        out.append((mtype, seq, pid, data[pos + HDR.size : pos + length]))
        pos += (length + 3) & ~3
    return out


def error_code(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR message (0: an ack)."""
    (code,) = struct.unpack_from("=i", payload)
    return -int(code)


class Socket:
    """A netlink socket in the netns of the thread that made it."""

    def __init__(self, protocol: int) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol
        )
        self._sock.bind((0, 0))
        # A lost reply must not hang a job's setup forever.
        self._sock.settimeout(10)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    @property
    def port(self) -> int:
        """The socket's netlink port id (what the kernel's notifications of
        its changes carry as their sender)."""
        port: int = self._sock.getsockname()[0]
        return port

    def message(self, mtype: int, flags: int, body: bytes) -> tuple[int, bytes]:
        """(sequence number, bytes) of a new message."""
        self._seq += 1
        return self._seq, HDR.pack(HDR.size + len(body), mtype, flags, self._seq, 0) + body

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def receive(self) -> list[tuple[int, int, bytes]]:
        """(type, seq, payload) of each message in the next datagram."""
        return [
            (mtype, seq, payload) for mtype, seq, _, payload in messages(self._sock.recv(1 << 16))
        ]

    def await_acks(
        self,
        pending: dict[int, str],
        ignore: tuple[int, ...] = (),
        refusal: tuple[int, str] | None = None,
    ) -> None:
        """Wait for the ack of every request in `pending` (seq -> what).

        The first refusal whose errno is not in `ignore` raises, once all
        acks are in (so the socket stays in step).  `refusal` is a message
        whose error means none of the others will be answered (a batch's
        start), and raises at once.
        """
        failure: NetlinkError | None = None
        while pending:
            for mtype, seq, payload in self.receive():
                if mtype != NLMSG_ERROR:
                    continue
                code = error_code(payload)
                if refusal is not None and seq == refusal[0] and code:
                    raise NetlinkError(code, refusal[1])
                what = pending.pop(seq, None)
                if what is not None and code and code not in ignore and failure is None:
                    failure = NetlinkError(code, what)
        if failure is not None:
            raise failure

    def replies(self, seq: int, dump: bool = False) -> list[tuple[int, bytes]]:
        """(type, payload) of the messages answering request `seq`: one, or a
        dump up to NLMSG_DONE."""
        out: list[tuple[int, bytes]] = []
        while True:
            for mtype, mseq, payload in self.receive():
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                out.append((mtype, payload))
                if not dump or mtype == NLMSG_ERROR:
                    return out
