"""Router advertisements on the host end of each job's veth.

A job configures IPv6 by SLAAC from what larkns advertises here: its /64, and
the host end as its default router.  larkns sends these itself instead of
running radvd, because radvd re-initialises a new interface ~1 s after it
appears and will not repeat faster than every 3 s, while a job must have its
address the moment it starts: here the first RA leaves as soon as the host
end's link-local exists, a few ms after the job end comes up (5-8 ms to a
usable address, measured with accept_dad=0 in the job; radvd took 1-3 s).

One thread and one raw ICMPv6 socket serve every job on the node.  The socket
belongs to the network namespace of the thread that creates the Advertiser
(netns membership is per thread on Linux), and every ifindex given to it is
read in that namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import ipaddress
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from larkns.core import EXTERNAL_SIGNALS


def _say(message: str) -> None:
    # print, not logging: importing logging costs ~3 ms of every larkns
    # start, for three messages that larknsd's stderr (its log) takes as well.
    print(f"larkns: {message}", file=sys.stderr)


ROUTER_SOLICIT = 133
ROUTER_ADVERT = 134

ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_ROUTERS = ipaddress.IPv6Address("ff02::2")

# Receivers drop neighbour discovery whose hop limit is not 255: it proves the
# packet was not forwarded from off-link (RFC 4861 6.1).
_ND_HOP_LIMIT = 255
_CUR_HOP_LIMIT = 64

# Until the job end brings carrier up the host end has no link-local, and the
# kernel refuses it as a source: poll for it briefly rather than listen to
# netlink, since it appears within milliseconds of the job end coming up.
_RETRY_STEP = 0.002
_RETRY_FOR = 3.0
# A fresh link may lose an early RA (the job end is still settling): repeat
# soon, before falling back to the slow periodic schedule.
_REPEATS = (0.5, 1.5)
_ANSWER_GAP = 0.05

# <linux/icmpv6.h>: not exported by Python's socket module.
_ICMP6_FILTER = 1
_SIOCGIFNAME = 0x8910

# What sendmsg says while the host end has no usable link-local yet (EINVAL
# for a source address the kernel does not have), is down, or its queue is
# full: all worth a retry.  Anything else is logged once per interface.
_NOT_YET = frozenset(
    {
        errno.EINVAL,
        errno.EADDRNOTAVAIL,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENXIO,
        errno.ENOBUFS,
        errno.EAGAIN,
    }
)
_GONE = frozenset({errno.ENODEV, errno.ENXIO})

_U32 = 0xFFFFFFFF


def router_advertisement(
    *,
    router_lifetime: int,
    prefix: ipaddress.IPv6Network,
    valid_lifetime: int,
    preferred_lifetime: int,
    mac: bytes,
    mtu: int | None = None,
) -> bytes:
    """The ICMPv6 message (checksum left 0: the kernel fills it in for raw ICMPv6)."""
    # M=O=0 and no reachable/retrans times: addresses come from SLAAC only (no
    # DHCPv6), and the job keeps its kernel's neighbour discovery defaults.
    msg = struct.pack("!BBHBBHII", ROUTER_ADVERT, 0, 0, _CUR_HOP_LIMIT, 0, router_lifetime, 0, 0)
    # Source link-layer address: saves the job a neighbour solicitation before
    # its first packet to the router.
    msg += struct.pack("!BB", 1, 1) + mac
    if mtu is not None:
        msg += struct.pack("!BBHI", 5, 1, 0, mtu)
    # Prefix information with L (the job reaches the /64 without the router)
    # and A (the job forms its own address in it).
    msg += struct.pack(
        "!BBBBIII16s",
        3,
        4,
        prefix.prefixlen,
        0xC0,
        valid_lifetime,
        preferred_lifetime,
        0,
        prefix.network_address.packed,
    )
    return msg


def _only_solicitations() -> bytes:
    """struct icmp6_filter where a set bit blocks that ICMPv6 type."""
    words = [_U32] * 8
    words[ROUTER_SOLICIT >> 5] &= ~(1 << (ROUTER_SOLICIT & 31)) & _U32
    return struct.pack("=8I", *words)


def _membership(group: ipaddress.IPv6Address, ifindex: int) -> bytes:
    return group.packed + struct.pack("=I", ifindex)


@dataclass(eq=False)
class _Link:
    ifindex: int
    packet: bytes
    pktinfo: bytes
    due: float
    # While set, a failed send is retried every _RETRY_STEP until this time.
    retry_until: float | None
    # Time of the send that ended the last run of failures; the repeats count from it.
    anchor: float | None = None
    repeats_done: int = 0
    last_answer: float = float("-inf")
    sent: int = 0
    # None: not joined yet (try again on the next send); False: gave up.
    joined: bool | None = None
    warned: bool = False


class Advertiser:
    """Sends router advertisements on many job interfaces from one thread and one raw ICMPv6 socket.

    After remove(ifindex) returns, no further RA leaves on that interface.
    """

    def __init__(
        self,
        *,
        router_lifetime: int = 1800,
        valid_lifetime: int = 3600,
        preferred_lifetime: int = 1800,
        min_interval: float = 200.0,
        max_interval: float = 600.0,
    ) -> None:
        if not 0 < min_interval <= max_interval:
            raise ValueError(
                f"RA interval: need 0 < min_interval <= max_interval, got {min_interval}, "
                f"{max_interval}"
            )
        if not 0 <= router_lifetime <= 0xFFFF:
            raise ValueError(f"router_lifetime {router_lifetime} is not in 0..65535 s")
        # Jobs run for days on one RA stream: if a lifetime were shorter than
        # the gap between RAs, the job's default route or address would lapse.
        if router_lifetime and router_lifetime <= max_interval:
            raise ValueError(
                f"router_lifetime {router_lifetime} s must exceed max_interval {max_interval} s"
            )
        if not max_interval < valid_lifetime <= _U32:
            raise ValueError(
                f"valid_lifetime {valid_lifetime} s must exceed max_interval {max_interval} s"
            )
        if not 0 <= preferred_lifetime <= valid_lifetime:
            raise ValueError(
                f"preferred_lifetime {preferred_lifetime} s must be in 0..valid_lifetime"
            )
        # Source address selection takes a deprecated address only as a last
        # resort: keep the job's address preferred from one RA to the next.
        if preferred_lifetime and preferred_lifetime <= max_interval:
            raise ValueError(
                f"preferred_lifetime {preferred_lifetime} s must exceed max_interval "
                f"{max_interval} s"
            )
        self._router_lifetime = router_lifetime
        self._valid_lifetime = valid_lifetime
        self._preferred_lifetime = preferred_lifetime
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._random = random.Random()

        self._lock = threading.Lock()
        self._links: dict[int, _Link] = {}
        self._heap: list[tuple[float, int, _Link]] = []
        self._seq = 0
        self._closed = False

        self._sock = self._open_socket()
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="larkns-ra", daemon=True)
        # The thread is born with signals blocked (it inherits the mask), so a
        # signal for the process is always delivered to a thread that expects
        # it: `larkns run` blocks them while it tears down, and the kernel
        # must not pick this thread instead and run the default action.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, EXTERNAL_SIGNALS)
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    @staticmethod
    def _open_socket() -> socket.socket:
        sock = socket.socket(
            socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMPV6
        )
        try:
            sock.setblocking(False)
            ipv6 = socket.IPPROTO_IPV6
            sock.setsockopt(ipv6, socket.IPV6_MULTICAST_HOPS, _ND_HOP_LIMIT)
            sock.setsockopt(ipv6, socket.IPV6_UNICAST_HOPS, _ND_HOP_LIMIT)
            # A looped-back copy would be processed by the host's own stack, and
            # a host end that accepts RAs would configure itself from the job's
            # prefix.
            sock.setsockopt(ipv6, socket.IPV6_MULTICAST_LOOP, 0)
            sock.setsockopt(ipv6, socket.IPV6_RECVPKTINFO, 1)
            sock.setsockopt(ipv6, socket.IPV6_RECVHOPLIMIT, 1)
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, _only_solicitations())
        except BaseException:
            sock.close()
            raise
        return sock

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add(
        self,
        ifindex: int,
        prefix: ipaddress.IPv6Network,
        source: ipaddress.IPv6Address,
        mac: bytes,
        mtu: int | None = None,
    ) -> None:
        """Advertise `prefix` on `ifindex` from `source` (its link-local), starting now.

        Adding an interface already advertised replaces what is advertised there.
        """
        if ifindex <= 0:
            raise ValueError(f"ifindex {ifindex} is not an interface index")
        if prefix.prefixlen != 64:
            raise ValueError(f"SLAAC needs a /64, got {prefix}")
        if not source.is_link_local:
            raise ValueError(f"RA source {source} is not a link-local address")
        if len(mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {len(mac)}")
        if mtu is not None and not 1280 <= mtu <= _U32:
            raise ValueError(f"IPv6 MTU {mtu} is not in 1280..{_U32}")
        packet = router_advertisement(
            router_lifetime=self._router_lifetime,
            prefix=prefix,
            valid_lifetime=self._valid_lifetime,
            preferred_lifetime=self._preferred_lifetime,
            mac=mac,
            mtu=mtu,
        )
        now = time.monotonic()
        link = _Link(
            ifindex=ifindex,
            packet=packet,
            pktinfo=source.packed + struct.pack("=I", ifindex),
            due=now,
            retry_until=now + _RETRY_FOR,
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("router advertiser is closed")
            old = self._links.get(ifindex)
            if old is not None:
                link.joined = old.joined
                link.sent = old.sent
            self._links[ifindex] = link
            self._schedule(link, now)
        self._wake()

    def remove(self, ifindex: int) -> None:
        """Stop advertising on `ifindex`; nothing happens if it is not advertised."""
        with self._lock:
            link = self._links.pop(ifindex, None)
            if link is not None and not self._closed:
                self._leave(link)

    def sent(self, ifindex: int) -> int:
        """RAs sent so far on `ifindex` while advertised there; 0 once removed or dropped."""
        with self._lock:
            link = self._links.get(ifindex)
            return 0 if link is None else link.sent

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        # Closing the socket drops every group membership it holds.
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the thread ----------------------------------------------------------

    def _wake(self) -> None:
        # A full pipe already holds a pending wakeup.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                with self._lock:
                    if self._closed:
                        return
                    timeout = self._timeout_ms()
                for fd, _ in poller.poll(timeout):
                    if fd == self._wake_r:
                        self._drain_wakeups()
                    else:
                        self._receive()
                with self._lock:
                    if self._closed:
                        return
                    self._send_due()
            except Exception:
                # A dead thread would let every job's default route lapse:
                # log, pause so a persistent fault cannot spin, and go on.
                import traceback

                _say("router advertiser: unexpected error, continuing:\n" + traceback.format_exc())
                time.sleep(0.1)

    def _timeout_ms(self) -> int | None:
        while self._heap and self._stale(self._heap[0]):
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        delay = self._heap[0][0] - time.monotonic()
        # poll() counts whole milliseconds: round up, or we wake just early and spin.
        return max(0, int(delay * 1000.0 + 0.999))

    def _stale(self, entry: tuple[float, int, _Link]) -> bool:
        due, _, link = entry
        return self._links.get(link.ifindex) is not link or link.due != due

    def _schedule(self, link: _Link, due: float) -> None:
        link.due = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, link))

    def _interval(self) -> float:
        return self._random.uniform(self._min_interval, self._max_interval)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if not self._stale(entry):
                self._advertise(entry[2])

    def _advertise(self, link: _Link) -> None:
        if link.joined is None:
            self._join(link)
        now = time.monotonic()
        ok = self._send(link, ALL_NODES)
        if ok is None:
            return
        if ok:
            link.retry_until = None
            if link.anchor is None:
                link.anchor = now
                link.repeats_done = 0
            if link.repeats_done < len(_REPEATS):
                due = link.anchor + _REPEATS[link.repeats_done]
                link.repeats_done += 1
            else:
                due = now + self._interval()
        elif link.retry_until is not None and now < link.retry_until:
            due = now + _RETRY_STEP
        else:
            link.retry_until = None
            due = now + self._interval()
        self._schedule(link, due)

    def _send(self, link: _Link, dest: ipaddress.IPv6Address) -> bool | None:
        """True if sent, False if not (yet), None if the interface is gone (then dropped)."""
        try:
            self._sock.sendmsg(
                [link.packet],
                [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, link.pktinfo)],
                0,
                (str(dest), 0, 0, link.ifindex),
            )
        except OSError as e:
            if e.errno in _GONE and not self._exists(link.ifindex):
                del self._links[link.ifindex]
                self._leave(link)
                return None
            if e.errno not in _NOT_YET and not link.warned:
                link.warned = True
                _say(f"router advertisement on ifindex {link.ifindex} failed: {e}")
            return False
        link.sent += 1
        return True

    def _forwards(self, ifindex: int) -> bool:
        ifreq = struct.pack("=16si20x", b"", ifindex)
        try:
            got = fcntl.ioctl(self._sock.fileno(), _SIOCGIFNAME, ifreq)
            name = got[:16].rstrip(b"\0").decode()
            # /proc/sys/net is this thread's namespace: the socket's.
            with open(f"/proc/sys/net/ipv6/conf/{name}/forwarding") as f:
                return f.read().strip() == "1"
        except OSError:
            return False

    def _exists(self, ifindex: int) -> bool:
        # Asked through our own socket, so in its namespace, whichever thread runs this.
        ifreq = struct.pack("=16si20x", b"", ifindex)
        try:
            fcntl.ioctl(self._sock.fileno(), _SIOCGIFNAME, ifreq)
        except OSError as e:
            return e.errno != errno.ENODEV
        return True

    def _join(self, link: _Link) -> None:
        # RSs go to ff02::2, which the kernel only accepts on an interface that
        # joined it; it joins by itself where forwarding is on (nat, routed),
        # and there a membership of our socket would only cost option memory
        # (net.core.optmem_max, 128 KiB: ~2,300 of them, fewer than a large
        # node's jobs).
        if self._forwards(link.ifindex):
            link.joined = False
            return
        try:
            self._sock.setsockopt(
                socket.IPPROTO_IPV6,
                socket.IPV6_JOIN_GROUP,
                _membership(ALL_ROUTERS, link.ifindex),
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                link.joined = True
            elif e.errno != errno.ENODEV:
                # Out of socket option memory (net.core.optmem_max): periodic
                # RAs still serve the job; only its solicitations go unheard.
                link.joined = False
                _say(f"cannot hear router solicitations on ifindex {link.ifindex}: {e}")
            return
        link.joined = True

    def _leave(self, link: _Link) -> None:
        # The socket keeps a membership even after its interface is gone, and
        # each one costs option memory: a node runs thousands of jobs in turn.
        if link.joined:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(
                    socket.IPPROTO_IPV6,
                    socket.IPV6_LEAVE_GROUP,
                    _membership(ALL_ROUTERS, link.ifindex),
                )
        link.joined = None

    def _receive(self) -> None:
        # Bounded, so a job flooding solicitations cannot starve the schedule.
        for _ in range(64):
            try:
                data, ancdata, _, addr = self._sock.recvmsg(
                    1280, socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)
                )
            except (BlockingIOError, InterruptedError):
                return
            ifindex = 0
            hop_limit = -1
            for level, kind, value in ancdata:
                if level != socket.IPPROTO_IPV6:
                    continue
                if kind == socket.IPV6_PKTINFO and len(value) >= 20:
                    (ifindex,) = struct.unpack_from("=I", value, 16)
                elif kind == socket.IPV6_HOPLIMIT and len(value) >= 4:
                    (hop_limit,) = struct.unpack_from("=i", value)
            if len(data) < 8 or data[0] != ROUTER_SOLICIT or data[1] != 0:
                continue
            if hop_limit != _ND_HOP_LIMIT:
                continue
            solicitor = ipaddress.IPv6Address(addr[0].split("%", 1)[0])
            with self._lock:
                if not self._closed:
                    self._answer(ifindex, solicitor)

    def _answer(self, ifindex: int, solicitor: ipaddress.IPv6Address) -> None:
        link = self._links.get(ifindex)
        if link is None:
            return
        now = time.monotonic()
        if now - link.last_answer < _ANSWER_GAP:
            return
        link.last_answer = now
        # Unicast only to a link-local solicitor: the address must be on this
        # link, and a job may write any source address it likes.
        dest = solicitor if solicitor.is_link_local else ALL_NODES
        ok = self._send(link, dest)
        if ok is False and (link.retry_until is None or now >= link.retry_until):
            # The job end is up (it solicited) but our link-local is not there
            # yet, or came back after a flap: advertise as soon as it is.
            link.retry_until = now + _RETRY_FOR
            link.anchor = None
            self._schedule(link, now + _RETRY_STEP)
