"""Addresses and routes on the job's links."""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any

from pyroute2 import IPRoute

# IFA_F_TENTATIVE | IFA_F_DADFAILED: an address in either state cannot be used.
_UNUSABLE = 0x40 | 0x08


def add(ipr: IPRoute, idx: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
    ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def default_route(ipr: IPRoute, gateway: ipaddress.IPv4Address, idx: int) -> None:
    ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=idx)


def prefix_route(ipr: IPRoute, prefix: ipaddress.IPv6Network, idx: int) -> None:
    ipr.route("add", dst=str(prefix), oif=idx)


def ipv6_global(ipr: IPRoute, idx: int) -> list[ipaddress.IPv6Address]:
    """Usable global-scope IPv6 addresses on link `idx`."""
    out = []
    msg: Any
    for msg in ipr.get_addr(family=socket.AF_INET6, index=idx):
        if msg["scope"] != 0:
            continue
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if flags & _UNUSABLE:
            continue
        out.append(ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS")))
    return out


def has_ipv6_default(ipr: IPRoute) -> bool:
    return bool(ipr.get_default_routes(family=socket.AF_INET6))


def wait_slaac(
    ipr: IPRoute, idx: int, prefix: ipaddress.IPv6Network, timeout: float
) -> float | None:
    """Wait until the link has a usable address in `prefix` and a default route.

    Returns the seconds waited, or None on timeout.  Polling at 1 ms is cheaper
    and simpler than a netlink event subscription for a wait of a few ms.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if any(a in prefix for a in ipv6_global(ipr, idx)) and has_ipv6_default(ipr):
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)
