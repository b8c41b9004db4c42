"""Links: the veth pair that joins a job's namespace to the host."""

from __future__ import annotations

import errno
import os

from larkns.kernel import rtnl
from larkns.kernel.iproute import PinnedIPRoute
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


def create_ifb(host_rtnl: Rtnl, name: str, index: int) -> int:
    """An IFB device, up; its index (`index` unless taken)."""
    for idx in (index, 0):
        try:
            host_rtnl.run(rtnl.ifb(name, idx))
            break
        except RtnlError as e:
            # EEXIST is for the name or for the index (see create_veth).
            if e.errno != errno.EEXIST or host_rtnl.link_index(name) is not None:
                raise
    if idx == 0:
        found = host_rtnl.link_index(name)
        if found is None:
            raise OSError(errno.ENODEV, f"ifb {name} vanished right after it was made")
        idx = found
    host_rtnl.run(rtnl.link_up(idx, name))
    return idx


def delete_named(host_rtnl: Rtnl, name: str) -> bool:
    """Delete link `name` (one request, no lookup); False if it was not there."""
    try:
        host_rtnl.run(rtnl.delete_named(name))
    except RtnlError as e:
        if e.errno != errno.ENODEV:
            raise
        return False
    return True


def index(ipr: PinnedIPRoute, name: str) -> int | None:
    found = ipr.link(name=name)
    return None if found is None else found.ifindex


def delete(ipr: PinnedIPRoute, name: str) -> bool:
    """Delete link `name`; False if it was not there."""
    idx = index(ipr, name)
    if idx is None:
        return False
    return ipr.delete_link(idx, f"link {name}")


def veths_with_prefix(ipr: PinnedIPRoute, prefix: str) -> list[str]:
    """veth links whose name starts with `prefix` (a link of another kind is never larkns's)."""
    return [
        link.name for link in ipr.links() if link.name.startswith(prefix) and link.kind == "veth"
    ]


def with_prefix(ipr: PinnedIPRoute, prefix: str, kind: str) -> list[str]:
    """Links of `kind` whose name starts with `prefix`."""
    return [link.name for link in ipr.links() if link.name.startswith(prefix) and link.kind == kind]


def is_veth(ipr: PinnedIPRoute, name: str) -> bool:
    found = ipr.link(name=name)
    return found is not None and found.kind == "veth"


def is_up(ipr: PinnedIPRoute, idx: int) -> bool:
    found = ipr.link(idx)
    return found is not None and found.up


def kind(ipr: PinnedIPRoute, idx: int) -> str | None:
    """The link's kind (veth, bridge, ...); None for a plain device, or no such link."""
    found = ipr.link(idx)
    return None if found is None else found.kind
