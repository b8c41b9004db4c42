"""A DHCPv4 client that larkns runs for a bridge-mode job (RFC 2131).

It runs in larkns's process (a socket in the job's network namespace, bound
to the job's link), never in the job: the job gets the lease, and the
guard lets it send from that address only, so a client of its own would get
it nowhere.  No script and no file: the address and route go straight to
the job's link through rtnetlink (a DHCP client's usual script writes the
host's /etc/resolv.conf).

Every request asks the server to broadcast its answer (the job's link has
no address to receive unicast on until the lease is applied).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from larkns.kernel import netns
from larkns.kernel.mac import parse as parse_mac

CLIENT_PORT = 68
SERVER_PORT = 67
_MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE = 1, 2, 3, 4, 5, 6, 7
OPT_SUBNET, OPT_ROUTER, OPT_REQUESTED, OPT_LEASE = 1, 3, 50, 51
OPT_TYPE, OPT_SERVER, OPT_PARAMS, OPT_T1, OPT_T2, OPT_CLIENT_ID, OPT_END = (
    53,
    54,
    55,
    58,
    59,
    61,
    255,
)
_BROADCAST = 0x8000


class DhcpError(Exception):
    def __init__(self, message: str, nak: bool = False) -> None:
        super().__init__(message)
        self.nak = nak  # the server refused: the lease is gone


@dataclass(frozen=True)
class Lease:
    address: ipaddress.IPv4Interface
    router: ipaddress.IPv4Address | None
    server: ipaddress.IPv4Address
    seconds: int  # the lease's length
    t1: float  # renew this many seconds after `obtained`
    t2: float  # rebind (ask any server) after this many
    obtained: float  # time.time()

    def to_dict(self) -> dict[str, object]:
        return {
            "address": str(self.address),
            "router": None if self.router is None else str(self.router),
            "server": str(self.server),
            "seconds": self.seconds,
            "t1": self.t1,
            "t2": self.t2,
            "obtained": self.obtained,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Lease:
        router = d.get("router")
        return cls(
            address=ipaddress.IPv4Interface(str(d["address"])),
            router=None if router is None else ipaddress.IPv4Address(str(router)),
            server=ipaddress.IPv4Address(str(d["server"])),
            seconds=int(str(d["seconds"])),
            t1=float(str(d["t1"])),
            t2=float(str(d["t2"])),
            obtained=float(str(d["obtained"])),
        )


def packet(
    msg_type: int,
    xid: int,
    mac: str,
    ciaddr: ipaddress.IPv4Address | None = None,
    options: dict[int, bytes] | None = None,
) -> bytes:
    """A BOOTREQUEST with the given DHCP message type and options."""
    hw = parse_mac(mac)
    head = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,  # BOOTREQUEST
        1,  # Ethernet
        6,
        0,
        xid,
        0,
        _BROADCAST,
        (ciaddr or ipaddress.IPv4Address(0)).packed,
        bytes(4),
        bytes(4),
        bytes(4),
        hw,
        b"",
        b"",
    )
    opts = {OPT_TYPE: bytes([msg_type]), OPT_CLIENT_ID: b"\x01" + hw, **(options or {})}
    body = b"".join(bytes([k, len(v)]) + v for k, v in opts.items())
    return head + _MAGIC + body + bytes([OPT_END])


def parse(data: bytes) -> tuple[int, ipaddress.IPv4Address, bytes, dict[int, bytes]] | None:
    """(xid, yiaddr, chaddr, options) of a BOOTREPLY; None if it is none."""
    if len(data) < 240 or data[0] != 2 or data[236:240] != _MAGIC:
        return None
    xid = struct.unpack_from("!I", data, 4)[0]
    yiaddr = ipaddress.IPv4Address(data[16:20])
    chaddr = data[28:34]
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            break
        n = data[i + 1]
        opts[code] = data[i + 2 : i + 2 + n]
        i += 2 + n
    return xid, yiaddr, chaddr, opts


class Client:
    """DHCP for one job: a socket on the job's link, in its namespace."""

    def __init__(self, ns_name: str, ifname: str, mac: str) -> None:
        self.mac = mac
        with netns.entered(ns_name):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            s.bind(("0.0.0.0", CLIENT_PORT))
        except BaseException:
            s.close()
            raise
        self.sock = s
        # Written to cut an exchange short (the job is being torn down).
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def interrupt(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _exchange(
        self,
        request: Callable[[int], bytes],
        want: tuple[int, ...],
        dest: str,
        timeout: float,
    ) -> tuple[ipaddress.IPv4Address, dict[int, bytes]]:
        """Send `request(xid)` to `dest` until an answer of a type in `want`
        comes (retransmitting at 0.25, 0.5, 1 s ...), or raise DhcpError."""
        xid = int.from_bytes(os.urandom(4), "big")
        deadline = time.monotonic() + timeout
        wait = 0.25
        hw = parse_mac(self.mac)
        while time.monotonic() < deadline:
            self.sock.sendto(request(xid), (dest, SERVER_PORT))
            resend = min(deadline, time.monotonic() + wait)
            wait = min(wait * 2, 4.0)
            # poll, not select: select cannot watch an fd above 1023, and
            # larknsd may have thousands open.
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while (left := resend - time.monotonic()) > 0:
                ready = [fd for fd, _ in poller.poll(left * 1000)]
                if self._wake_r in ready:
                    raise DhcpError("interrupted")
                if not ready:
                    break
                got = parse(self.sock.recv(4096))
                if got is None or got[0] != xid or got[2] != hw:
                    continue
                msg_type = got[3].get(OPT_TYPE, b"\0")[0]
                if msg_type == NAK:
                    raise DhcpError("the server refused (DHCPNAK)", nak=True)
                if msg_type in want:
                    return got[1], got[3]
        raise DhcpError(f"no answer from a DHCP server within {timeout:g} s")

    def obtain(self, timeout: float) -> Lease:
        """DISCOVER, OFFER, REQUEST, ACK."""
        start = time.monotonic()
        params = {OPT_PARAMS: bytes([OPT_SUBNET, OPT_ROUTER, OPT_LEASE, OPT_T1, OPT_T2])}
        offered, opts = self._exchange(
            lambda xid: packet(DISCOVER, xid, self.mac, options=params),
            (OFFER,),
            "255.255.255.255",
            timeout,
        )
        server = opts.get(OPT_SERVER)
        if server is None:
            raise DhcpError("the offer names no server")
        ask = {
            **params,
            OPT_REQUESTED: offered.packed,
            OPT_SERVER: server,
        }
        left = max(0.5, timeout - (time.monotonic() - start))
        address, opts = self._exchange(
            lambda xid: packet(REQUEST, xid, self.mac, options=ask),
            (ACK,),
            "255.255.255.255",
            left,
        )
        return _lease(address, opts, ipaddress.IPv4Address(server))

    def renew(self, lease: Lease, rebind: bool = False, timeout: float = 10) -> Lease:
        """Extend the lease: from its server (renew) or any (rebind)."""
        dest = "255.255.255.255" if rebind else str(lease.server)
        address, opts = self._exchange(
            lambda xid: packet(REQUEST, xid, self.mac, ciaddr=lease.address.ip),
            (ACK,),
            dest,
            timeout,
        )
        server = opts.get(OPT_SERVER)
        return _lease(address, opts, ipaddress.IPv4Address(server) if server else lease.server)

    def release(self, lease: Lease) -> None:
        """Give the address back (no answer comes)."""
        msg = packet(
            RELEASE,
            int.from_bytes(os.urandom(4), "big"),
            self.mac,
            ciaddr=lease.address.ip,
            options={OPT_SERVER: lease.server.packed},
        )
        # The link or its route may be gone: the lease then just expires.
        with contextlib.suppress(OSError):
            self.sock.sendto(msg, (str(lease.server), SERVER_PORT))


def _lease(
    address: ipaddress.IPv4Address, opts: dict[int, bytes], server: ipaddress.IPv4Address
) -> Lease:
    mask = opts.get(OPT_SUBNET)
    if mask is None or len(mask) != 4:
        raise DhcpError("the lease has no subnet mask")
    plen = ipaddress.IPv4Network(f"0.0.0.0/{ipaddress.IPv4Address(mask)}").prefixlen
    router = opts.get(OPT_ROUTER)
    seconds = struct.unpack("!I", opts[OPT_LEASE])[0] if OPT_LEASE in opts else 3600
    t1 = struct.unpack("!I", opts[OPT_T1])[0] if OPT_T1 in opts else seconds / 2
    t2 = struct.unpack("!I", opts[OPT_T2])[0] if OPT_T2 in opts else seconds * 7 / 8
    return Lease(
        address=ipaddress.IPv4Interface((address, plen)),
        router=ipaddress.IPv4Address(router[:4]) if router and len(router) >= 4 else None,
        server=server,
        seconds=seconds,
        t1=float(t1),
        t2=float(t2),
        obtained=time.time(),
    )


class Renewer:
    """Keeps a job's lease for as long as the job runs: renews at T1, rebinds
    at T2; when the lease is refused (NAK) or runs out, asks anew (DISCOVER)
    every few seconds.  `on_change(old, new)` applies every change (new None:
    the address is lost) and says whether it could; the renewer takes a
    change as its own only then, and tries again otherwise."""

    RETRY = 5.0
    MIN_T1 = 1.0  # whatever a server says: no renewal storm

    def __init__(
        self,
        client: Client,
        lease: Lease,
        on_change: Callable[[Lease | None, Lease | None], bool],
    ) -> None:
        self.client = client
        self.lease: Lease | None = lease
        self.on_change = on_change
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dhcp", daemon=True)
        self._thread.start()

    def _change(self, new: Lease | None) -> None:
        while not self._stop.is_set():
            if self.on_change(self.lease, new):
                self.lease = new
                return
            self._stop.wait(0.5)

    def _run(self) -> None:
        while not self._stop.is_set():
            lease = self.lease
            if lease is None:
                try:
                    new = self.client.obtain(self.RETRY)
                except Exception:  # no server, a malformed answer, interrupted
                    self._stop.wait(self.RETRY)
                    continue
                self._change(new)
                continue
            t1 = max(lease.t1, self.MIN_T1)
            if self._stop.wait(max(0.0, lease.obtained + t1 - time.time())):
                return
            rebind = time.time() >= lease.obtained + lease.t2
            try:
                new = self.client.renew(lease, rebind=rebind, timeout=min(10.0, t1 / 2 + 1))
            except Exception as e:
                if self._stop.is_set():
                    return
                if getattr(e, "nak", False) or time.time() >= lease.obtained + lease.seconds:
                    self._change(None)  # refused, or over: the address must go
                elif self._stop.wait(1.0):
                    return
                continue
            self.renewals += 1
            self._change(new)

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        self.client.interrupt()
        self._thread.join(timeout=5)
        if release and self.lease is not None:
            self.client.release(self.lease)
        self.client.close()
