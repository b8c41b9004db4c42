"""A small synchronous rtnetlink socket: everything larkns asks of rtnetlink.

pyroute2 would do, but importing its package costs ~100 ms (it brings ndb,
ipdb, conntrack and asyncio), a third of a whole `larkns run -- true`, and
each of its calls runs an asyncio loop: ~0.2 ms before the kernel sees
anything.  A job's setup is a handful of requests whose values are all known
in advance (even the link indexes: see plan.py), so they are encoded here
with struct and sent in one sendmsg per namespace; the kernel handles them
in order and acks each.

Only what larkns sends is encoded: RTM_NEWLINK (veth pair, link up),
RTM_DELLINK, RTM_NEWADDR/RTM_DELADDR, RTM_NEWROUTE/RTM_DELROUTE,
RTM_NEWNEIGH/RTM_DELNEIGH; and only what it reads is decoded: links (name,
kind, operational state), addresses, routes.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import NamedTuple

from larkns.kernel import netlink
from larkns.kernel.mac import parse as parse_mac
from larkns.kernel.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ERROR

# netlink / rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h)
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_GETADDR = 22
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
NDA_DST = 1
NDA_LLADDR = 2
NTF_PROXY = 0x08
NUD_PERMANENT = 0x80
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_BRPORT_GUARD = 5
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_AF_SPEC = 26
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_METRICS = 8
RTAX_MTU = 2
RTA_TABLE = 15
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
IFF_UP = 0x1
IF_OPER_UP = 6

_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags


RtnlError = netlink.NetlinkError
_attr = netlink.attr


def _family(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


# Records are NamedTuples: a frozen dataclass costs ~0.4 ms to define, at
# every start of larkns, and this module has four.
class Request(NamedTuple):
    what: str  # for error messages: "add veth lk-a"
    type: int
    flags: int
    body: bytes


def veth(
    host: str,
    host_index: int,
    host_mac: str,
    peer: str,
    peer_index: int,
    peer_mac: str,
    peer_netns_fd: int,
) -> Request:
    """A veth pair with chosen indexes (0: the kernel's choice), the peer born
    inside another netns; both down (a veth end cannot be opened before its
    peer is registered: ENOTCONN)."""
    peer_msg = (
        _IFINFO.pack(0, 0, peer_index, 0, 0)
        + _attr(IFLA_IFNAME, peer.encode() + b"\0")
        + _attr(IFLA_ADDRESS, parse_mac(peer_mac))
        + _attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
    )
    linkinfo = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(
        IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_msg)
    )
    body = (
        _IFINFO.pack(0, 0, host_index, 0, 0)
        + _attr(IFLA_IFNAME, host.encode() + b"\0")
        + _attr(IFLA_ADDRESS, parse_mac(host_mac))
        + _attr(IFLA_LINKINFO, linkinfo)
    )
    return Request(f"add veth {host}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def ifb(name: str, index: int) -> Request:
    """An IFB (intermediate functional block) device, down."""
    linkinfo = _attr(IFLA_INFO_KIND, b"ifb\0")
    body = (
        _IFINFO.pack(0, 0, index, 0, 0)
        + _attr(IFLA_IFNAME, name.encode() + b"\0")
        + _attr(IFLA_LINKINFO, linkinfo)
    )
    return Request(f"add ifb {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def delete_named(name: str) -> Request:
    body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    return Request(f"delete link {name}", RTM_DELLINK, 0, body)


def rename(index: int, name: str, up: bool) -> Request:
    """Rename link `index` (which must be down) and bring it up or leave it down."""
    flags = IFF_UP if up else 0
    body = _IFINFO.pack(0, 0, index, flags, IFF_UP) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    return Request(f"rename link {index} to {name}", RTM_NEWLINK, 0, body)


def link_down(index: int, what: str) -> Request:
    return Request(f"set {what} down", RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, 0, IFF_UP))


def no_link_local(index: int, what: str) -> Request:
    """Stop the kernel from making an EUI-64 link-local on this link.

    The kernel would run DAD on it (a second, with the host's default
    accept_dad), and no RA can leave before it is done; larkns adds the same
    address itself, without DAD.
    """
    spec = _attr(
        socket.AF_INET6,
        _attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE])),
        nested=True,
    )
    body = _IFINFO.pack(0, 0, index, 0, 0) + _attr(IFLA_AF_SPEC, spec, nested=True)
    return Request(f"set {what} addrgenmode none", RTM_NEWLINK, 0, body)


def link_master(index: int, master: int, what: str) -> Request:
    """Make link `index` a port of bridge `master`."""
    body = _IFINFO.pack(0, 0, index, 0, 0) + _attr(IFLA_MASTER, struct.pack("=I", master))
    return Request(f"add {what} to its bridge", RTM_NEWLINK, 0, body)


def bpdu_guard(index: int, what: str) -> Request:
    """Disable bridge port `index` should a BPDU come in on it.

    On a bridge that runs STP, the bridge takes BPDUs for itself before any
    nftables hook sees them: a job could otherwise make itself the root of
    the site's spanning tree.  (Without STP, BPDUs are forwarded like any
    frame, and the bridge table drops them.)
    """
    info = _attr(IFLA_BRPORT_GUARD, b"\x01")
    body = _IFINFO.pack(socket.AF_BRIDGE, 0, index, 0, 0) + _attr(IFLA_PROTINFO, info, nested=True)
    return Request(f"set {what}'s BPDU guard", RTM_SETLINK, 0, body)


def link_up(index: int, what: str) -> Request:
    return Request(f"set {what} up", RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP))


def address(
    index: int,
    iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
    delete: bool = False,
    nodad: bool = False,
) -> Request:
    fam = _family(iface.ip)
    body = (
        _IFADDR.pack(fam, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        + _attr(IFA_LOCAL, iface.ip.packed)
        + _attr(IFA_ADDRESS, iface.ip.packed)
    )
    if nodad:
        body += _attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
    if delete:
        return Request(f"delete address {iface}", RTM_DELADDR, 0, body)
    return Request(f"add address {iface}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)


def route(
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network,
    oif: int,
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    delete: bool = False,
    mtu: int | None = None,
) -> Request:
    fam = _family(dst.network_address)
    scope = RT_SCOPE_LINK if gateway is None and fam == socket.AF_INET else RT_SCOPE_UNIVERSE
    body = _RTMSG.pack(fam, dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
    if dst.prefixlen:
        body += _attr(RTA_DST, dst.network_address.packed)
    body += _attr(RTA_OIF, struct.pack("=i", oif))
    if gateway is not None:
        body += _attr(RTA_GATEWAY, gateway.packed)
    if mtu is not None:
        body += _attr(RTA_METRICS, _attr(RTAX_MTU, struct.pack("=I", mtu)))
    if delete:
        return Request(f"delete route {dst}", RTM_DELROUTE, 0, body)
    # replace: a finished job's route may still sit on its dying link
    return Request(f"add route {dst}", RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)


class Rtnl(netlink.Socket):
    """An rtnetlink socket bound to the netns of the thread that made it."""

    def __init__(self) -> None:
        super().__init__(socket.NETLINK_ROUTE)

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, *requests: Request, ignore: tuple[int, ...] = ()) -> None:
        """Send all requests at once and wait for every ack (see await_acks)."""
        out = bytearray()
        pending: dict[int, str] = {}
        for r in requests:
            seq, msg = self.message(r.type, r.flags | NLM_F_REQUEST | NLM_F_ACK, r.body)
            pending[seq] = r.what
            out += msg
        self.send(bytes(out))
        self.await_acks(pending, ignore)

    def link(self, index: int = 0, name: str | None = None) -> Link | None:
        """Link `index` (or, with index 0, link `name`) in this socket's netns, or None."""
        body = _IFINFO.pack(0, 0, index, 0, 0)
        if name is not None:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        seq, msg = self.message(RTM_GETLINK, NLM_F_REQUEST, body)
        self.send(msg)
        for mtype, payload in self.replies(seq):
            if mtype == NLMSG_ERROR:
                code = netlink.error_code(payload)
                if code == errno.ENODEV:
                    return None
                raise RtnlError(code, f"look up link {name or index}")
            if mtype == RTM_NEWLINK:
                return _link(payload)
        return None

    def link_index(self, name: str) -> int | None:
        """The index of link `name` in this socket's netns, or None."""
        found = self.link(name=name)
        return None if found is None else found.ifindex

    def links(self) -> list[Link]:
        """Every link in this socket's netns."""
        return [
            _link(p)
            for t, p in self.dump(RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0))
            if t == RTM_NEWLINK
        ]

    def delete_link(self, index: int, what: str) -> bool:
        """Delete link `index`; False if it was not there."""
        try:
            self.run(Request(f"delete {what}", RTM_DELLINK, 0, _IFINFO.pack(0, 0, index, 0, 0)))
        except RtnlError as e:
            if e.errno != errno.ENODEV:
                raise
            return False
        return True

    def addresses(self, family: int, index: int) -> list[Address]:
        """Every address of `family` on link `index`."""
        out = []
        for mtype, payload in self.dump(RTM_GETADDR, _IFADDR.pack(family, 0, 0, 0, 0)):
            if mtype != RTM_NEWADDR:
                continue
            fam, plen, flags, scope, idx = _IFADDR.unpack_from(payload)
            # Without strict checking the kernel dumps every link's addresses.
            if idx != index or fam != family:
                continue
            addr = None
            for kind, data in netlink.attrs(payload, _IFADDR.size):
                if kind == IFA_ADDRESS:
                    addr = ipaddress.ip_address(data)
                elif kind == IFA_FLAGS:
                    # The 8-bit flags of ifaddrmsg lack the newer ones.
                    (flags,) = struct.unpack_from("=I", data)
            if addr is not None:
                out.append(Address(addr, plen, scope, flags))
        return out

    def ipv6_addresses(self, index: int) -> list[tuple[ipaddress.IPv6Address, int, int]]:
        """(address, scope, flags) of every IPv6 address on link `index`."""
        return [
            (a.address, a.scope, a.flags)
            for a in self.addresses(socket.AF_INET6, index)
            if isinstance(a.address, ipaddress.IPv6Address)
        ]

    def default_routes(self, family: int, table: int = RT_TABLE_MAIN) -> list[Route]:
        """The routes of `family` to everywhere (no destination) in `table`."""
        out = []
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for mtype, payload in self.dump(RTM_GETROUTE, body):
            if mtype != RTM_NEWROUTE:
                continue
            fam, dst_len, _src, _tos, rtm_table, *_ = _RTMSG.unpack_from(payload)
            if fam != family or dst_len:
                continue
            oif = None
            gateway = None
            has_dst = False
            for kind, data in netlink.attrs(payload, _RTMSG.size):
                if kind == RTA_TABLE:
                    # Tables above 255 are only named here.
                    (rtm_table,) = struct.unpack_from("=I", data)
                elif kind == RTA_OIF:
                    (oif,) = struct.unpack_from("=i", data)
                elif kind == RTA_GATEWAY:
                    gateway = ipaddress.ip_address(data)
                elif kind == RTA_DST:
                    has_dst = True
            if rtm_table == table and not has_dst:
                out.append(Route(oif, gateway))
        return out

    def dump(self, mtype: int, body: bytes) -> list[tuple[int, bytes]]:
        seq, msg = self.message(mtype, NLM_F_REQUEST | NLM_F_DUMP, body)
        self.send(msg)
        replies = self.replies(seq, dump=True)
        for t, payload in replies:
            if t == NLMSG_ERROR:
                raise RtnlError(netlink.error_code(payload), f"dump (rtnetlink type {mtype})")
        return replies


class Link(NamedTuple):
    ifindex: int
    name: str
    kind: str | None  # veth, bridge, ...; None for a plain device
    up: bool  # operational state UP: carrier, and both ends of a veth up
    master: int = 0  # the bridge (or bond) it is a port of; 0: none


class Address(NamedTuple):
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int
    scope: int
    flags: int


class Route(NamedTuple):
    oif: int | None  # None: a multipath route
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None


def _link(payload: bytes) -> Link:
    index = _IFINFO.unpack_from(payload)[2]
    name = ""
    kind = None
    up = False
    master = 0
    for t, data in netlink.attrs(payload, _IFINFO.size):
        if t == IFLA_IFNAME:
            name = data.rstrip(b"\0").decode(errors="replace")
        elif t == IFLA_MASTER:
            (master,) = struct.unpack_from("=I", data)
        elif t == IFLA_OPERSTATE:
            up = data[:1] == bytes([IF_OPER_UP])
        elif t == IFLA_LINKINFO:
            for t2, d2 in netlink.attrs(data, 0):
                if t2 == IFLA_INFO_KIND:
                    kind = d2.rstrip(b"\0").decode(errors="replace")
    return Link(int(index), name, kind, up, master)


_NDMSG = struct.Struct("=BBHiHBB")


def proxy_neighbour(
    index: int, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, delete: bool = False
) -> Request:
    """Answer ARP / neighbour solicitations for `addr` on link `index`
    (`ip neigh add proxy ADDR dev LINK`)."""
    body = _NDMSG.pack(_family(addr), 0, 0, index, NUD_PERMANENT, NTF_PROXY, 0)
    body += _attr(NDA_DST, addr.packed)
    if delete:
        return Request(f"delete proxy neighbour {addr}", RTM_DELNEIGH, 0, body)
    return Request(f"add proxy neighbour {addr}", RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)


def neighbour(
    index: int, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, mac: bytes
) -> Request:
    """A permanent neighbour entry: `addr` is at `mac` on link `index`
    (`ip neigh replace ADDR lladdr MAC dev LINK nud permanent`).

    The kernel's neighbour tables are one for all namespaces, and their
    dynamic entries are capped by net.ipv{4,6}.neigh.default.gc_thresh3
    (1024 by default, settable only in the host's namespace): with a few
    entries per job, a node with hundreds of jobs fills them, and packets
    wait for an entry that cannot be made.  Permanent entries are exempt
    from that cap (and need no resolution traffic)."""
    body = _NDMSG.pack(_family(addr), 0, 0, index, NUD_PERMANENT, 0, 0)
    body += _attr(NDA_DST, addr.packed) + _attr(NDA_LLADDR, mac)
    return Request(
        f"add neighbour {addr} on link {index}", RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body
    )


def ignore_missing() -> tuple[int, ...]:
    """Errnos meaning "already gone", for idempotent removal."""
    return (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)
