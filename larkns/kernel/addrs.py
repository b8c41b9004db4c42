"""Addresses and routes of a job's link, and waiting for its SLAAC address."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from larkns.kernel import rtnl
from larkns.kernel.rtnl import Rtnl

_UNUSABLE = rtnl.IFA_F_TENTATIVE | rtnl.IFA_F_DADFAILED
_ANY4 = ipaddress.IPv4Network("0.0.0.0/0")


def host_side(
    host: Rtnl,
    idx: int,
    name: str,
    iface: ipaddress.IPv4Interface,
    link_local: ipaddress.IPv6Address,
    prefix: ipaddress.IPv6Network,
) -> None:
    """Bring the host end up with its addresses and the route to the job's /64.

    Its link-local is added by hand, without DAD (both ends of the link are
    ours), so RAs can leave from it as soon as the job's end has carrier.
    """
    host.run(
        rtnl.no_link_local(idx, name),
        rtnl.address(idx, ipaddress.IPv6Interface(f"{link_local}/64"), nodad=True),
        rtnl.link_up(idx, name),
        rtnl.address(idx, iface),
        rtnl.route(prefix, idx),
    )


def job_side(
    job: Rtnl, idx: int, iface: ipaddress.IPv4Interface, gateway: ipaddress.IPv4Address
) -> None:
    """Loopback and the job's link up, its IPv4 address and default route."""
    job.run(
        rtnl.link_up(1, "lo"),
        rtnl.link_up(idx, "job link"),
        rtnl.address(idx, iface),
        rtnl.route(_ANY4, idx, gateway),
    )


def release(
    host: Rtnl, idx: int, iface: ipaddress.IPv4Interface, prefix: ipaddress.IPv6Network
) -> None:
    """Take a finished job's address and route off its host link.

    The link itself goes away with the job's namespace, but asynchronously:
    until then it must not hold an address or route a new job may be given.
    Missing ones are fine (teardown is idempotent).
    """
    host.run(
        rtnl.address(idx, iface, delete=True),
        rtnl.route(prefix, idx, delete=True),
        ignore=rtnl.ignore_missing(),
    )


def ipv6_global(job: Rtnl, idx: int) -> list[ipaddress.IPv6Address]:
    """Usable global-scope IPv6 addresses on link `idx`."""
    return [
        a
        for a, scope, flags in job.ipv6_addresses(idx)
        if scope == rtnl.RT_SCOPE_UNIVERSE and not flags & _UNUSABLE
    ]


def wait_slaac(
    job: Rtnl,
    idx: int,
    prefix: ipaddress.IPv6Network,
    timeout: float,
    cancel: Callable[[], bool] = lambda: False,
) -> float | None:
    """Wait until the link has a usable address in `prefix`; seconds waited, or None.

    The kernel installs the RA's default route before it forms the address
    from the prefix option, so an address means a route too.  A dump every
    0.5 ms costs less than subscribing to events for a wait of a few ms.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if any(a in prefix for a in ipv6_global(job, idx)):
            return time.monotonic() - start
        if time.monotonic() >= deadline or cancel():
            return None
        time.sleep(0.0005)
