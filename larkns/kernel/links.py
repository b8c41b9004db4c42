"""Links: the veth pair that joins a job's namespace to the host."""

from __future__ import annotations

import errno
import os
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from larkns.kernel import rtnl
from larkns.kernel.rtnl import Rtnl, RtnlError


def create_veth(
    host_rtnl: Rtnl,
    host: str,
    host_index: int,
    host_mac: str,
    peer: str,
    peer_index: int,
    peer_mac: str,
    peer_netns: str,
) -> int:
    """Create the pair, the peer born inside `peer_netns`; returns the host end's index.

    The peer is created in the job's namespace rather than moved there, so it
    takes that namespace's default sysctls (accept_dad=0).  Indexes are
    chosen (see plan.py) so setup needs no lookups; should the host index be
    taken, the kernel picks one.
    """
    fd = os.open(peer_netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            host_rtnl.run(rtnl.veth(host, host_index, host_mac, peer, peer_index, peer_mac, fd))
            return host_index
        except RtnlError as e:
            # EEXIST is the kernel's answer both for a name and for an index
            # in use (a request with an index names an existing link): only
            # the name is the caller's business.
            if e.errno != errno.EEXIST or host_rtnl.link_index(host) is not None:
                raise
        host_rtnl.run(rtnl.veth(host, 0, host_mac, peer, peer_index, peer_mac, fd))
    finally:
        os.close(fd)
    idx = host_rtnl.link_index(host)
    if idx is None:
        raise OSError(errno.ENODEV, f"veth {host} vanished right after it was made")
    return idx


def index(ipr: IPRoute, name: str) -> int | None:
    found: list[int] = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def delete(ipr: IPRoute, name: str) -> bool:
    """Delete link `name`; False if it was not there."""
    idx = index(ipr, name)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise
        return False
    return True


def veths_with_prefix(ipr: IPRoute, prefix: str) -> list[str]:
    """veth links whose name starts with `prefix` (a link of another kind is never larkns's)."""
    out = []
    link: Any
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name and name.startswith(prefix) and _kind(link) == "veth":
            out.append(name)
    return out


def is_veth(ipr: IPRoute, name: str) -> bool:
    link: Any
    for link in ipr.get_links(ifname=name):
        return _kind(link) == "veth"
    return False


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def is_up(ipr: IPRoute, idx: int) -> bool:
    link: Any = ipr.get_links(idx)[0]
    return bool(link.get_attr("IFLA_OPERSTATE") == "UP")


def kind(ipr: IPRoute, idx: int) -> str | None:
    """The link's kind (veth, bridge, ...); None for a plain device."""
    found = ipr.get_links(idx)
    return _kind(found[0]) if found else None
