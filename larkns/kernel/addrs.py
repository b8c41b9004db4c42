"""Addresses and routes of a job's link, and waiting for its SLAAC address."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence

from larkns.kernel import rtnl
from larkns.kernel.rtnl import Rtnl

_UNUSABLE = rtnl.IFA_F_TENTATIVE | rtnl.IFA_F_DADFAILED
_ANY4 = ipaddress.IPv4Network("0.0.0.0/0")

# (address, MAC) pairs to pin as permanent neighbour entries (rtnl.neighbour).
Neighbours = Sequence[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, bytes]]


def host_side(
    host: Rtnl,
    idx: int,
    name: str,
    iface: ipaddress.IPv4Interface | None,
    link_local: ipaddress.IPv6Address,
    prefix: ipaddress.IPv6Network | None,
    job4: ipaddress.IPv4Interface | None = None,
    neighbours: Neighbours = (),
) -> None:
    """Bring the host end up with its addresses and the routes to the job,
    and `neighbours` (the job's addresses and its MAC) pinned on it.

    Its link-local is added by hand, without DAD (both ends of the link are
    ours), so RAs can leave from it as soon as the job's end has carrier.
    A job with a /32 (routed mode) is reached by a route to it on the link;
    a /31's other half is on the link already.
    """
    requests = [
        rtnl.no_link_local(idx, name),
        rtnl.address(idx, ipaddress.IPv6Interface(f"{link_local}/64"), nodad=True),
        rtnl.link_up(idx, name),
    ]
    if iface is not None:
        requests.append(rtnl.address(idx, iface))
    if job4 is not None and job4.network.prefixlen == 32:
        requests.append(rtnl.route(job4.network, idx))
    if prefix is not None:
        requests.append(rtnl.route(prefix, idx))
    requests += [rtnl.neighbour(idx, a, mac) for a, mac in neighbours]
    host.run(*requests)


def job_side(
    job: Rtnl,
    idx: int,
    iface: ipaddress.IPv4Interface | None,
    gateway: ipaddress.IPv4Address | None,
    neighbours: Neighbours = (),
) -> None:
    """Loopback and the job's link up, its IPv4 address and default route,
    and `neighbours` (the host end's addresses and MAC) pinned on it."""
    requests = [rtnl.link_up(1, "lo"), rtnl.link_up(idx, "job link")]
    if iface is not None and gateway is not None:
        requests.append(rtnl.address(idx, iface))
        if gateway not in iface.network:
            # A /32: the gateway is reached on the link itself.
            requests.append(rtnl.route(ipaddress.IPv4Network(gateway), idx))
        requests.append(rtnl.route(_ANY4, idx, gateway))
    requests += [rtnl.neighbour(idx, a, mac) for a, mac in neighbours]
    job.run(*requests)


def release(
    host: Rtnl,
    idx: int,
    iface: ipaddress.IPv4Interface | None,
    prefix: ipaddress.IPv6Network | None,
    job4: ipaddress.IPv4Interface | None = None,
) -> None:
    """Take a finished job's addresses and routes off its host link.

    The link itself goes away with the job's namespace, but asynchronously:
    until then it must not hold an address or route a new job may be given.
    Missing ones are fine (teardown is idempotent).
    """
    requests = []
    if iface is not None:
        requests.append(rtnl.address(idx, iface, delete=True))
    if job4 is not None and job4.network.prefixlen == 32:
        requests.append(rtnl.route(job4.network, idx, delete=True))
    if prefix is not None:
        requests.append(rtnl.route(prefix, idx, delete=True))
    if requests:
        host.run(*requests, ignore=rtnl.ignore_missing())


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
