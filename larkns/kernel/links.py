"""Links: the veth pair that joins a job's namespace to the host."""

from __future__ import annotations

import errno
import os
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


def index(ipr: IPRoute, name: str) -> int | None:
    found: list[int] = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def create_veth(
    ipr: IPRoute, host: str, host_mac: str, peer: str, peer_mac: str, peer_netns: str
) -> int:
    """Create the pair with `peer` born inside `peer_netns`; returns the host end's index.

    Creating the peer directly in the job's namespace (rather than moving it)
    makes it take that namespace's default sysctls, such as accept_dad=0.
    """
    fd = os.open(peer_netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ipr.link(
            "add",
            ifname=host,
            address=host_mac,
            kind="veth",
            peer={"ifname": peer, "address": peer_mac, "net_ns_fd": fd},
        )
    finally:
        os.close(fd)
    idx = index(ipr, host)
    if idx is None:
        raise OSError(errno.ENODEV, f"veth {host} vanished right after it was made")
    return idx


def up(ipr: IPRoute, idx: int) -> None:
    ipr.link("set", index=idx, state="up")


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


def names_with_prefix(ipr: IPRoute, prefix: str) -> list[str]:
    out = []
    link: Any
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name and name.startswith(prefix):
            out.append(name)
    return out
