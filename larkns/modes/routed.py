"""routed: no NAT.  The job gets a /64 of LARKNS_ROUTED_IPV6_PREFIX (SLAAC
from larkns's RAs) and a /32 of LARKNS_ROUTED_IPV4_POOL, prefixes the site
routes to this worker; LARKNS_PROXY_ND answers ND and ARP for them on the
uplink where the site takes them for on-link instead."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from larkns.config import ConfigError, Settings
from larkns.kernel import rtnl, sysctl
from larkns.modes.base import SetupError
from larkns.modes.nat import slot_count
from larkns.modes.routing import RoutingDriver, RoutingNetwork
from larkns.plan import Address, host_range, linked_fields, slash64

if TYPE_CHECKING:
    from larkns.engine import Engine

# A job's IPv4 is a /32, and its gateway this link-local address, the same on
# every job's host end (as Calico does): no address of the routed range is
# spent on the host side.
GATEWAY4 = ipaddress.IPv4Interface("169.254.0.1/32")


@dataclass(frozen=True, kw_only=True)
class RoutedNetwork(RoutingNetwork):
    mode = "routed"


def routed_slot_count(settings: Settings, ipv6_prefix: ipaddress.IPv6Network) -> int:
    """How many slots a routed job may take: within the NAT pools' too
    (slots number every type's host links and MACs)."""
    count = slot_count(settings, ipv6_prefix)
    if settings.routed_ipv6_prefix is not None:
        count = min(count, 1 << min(64 - settings.routed_ipv6_prefix.prefixlen, 32))
    if settings.routed_ipv4_pool is not None:
        count = min(count, host_range(settings.routed_ipv4_pool)[1])
    return count


def plan(
    settings: Settings, name: str, slot: int, nat_prefix: ipaddress.IPv6Network
) -> RoutedNetwork:
    """A routed job: a /64 of the routed IPv6 prefix, a /32 of the routed
    IPv4 pool (either may be absent), no NAT."""
    v6, v4 = settings.routed_ipv6_prefix, settings.routed_ipv4_pool
    if v6 is None and v4 is None:
        raise ConfigError(
            "--mode routed: set LARKNS_ROUTED_IPV6_PREFIX and/or LARKNS_ROUTED_IPV4_POOL "
            "(prefixes the site routes to this worker)"
        )
    if not 0 <= slot < routed_slot_count(settings, nat_prefix):
        raise ConfigError(f"slot {slot} is outside the routed address pools")
    ipv4_job = None
    if v4 is not None:
        ipv4_job = ipaddress.IPv4Interface((host_range(v4)[0] + slot, 32))
    return RoutedNetwork(
        **linked_fields(settings.classes, settings.netns_prefix, name, slot),
        ipv4_host=GATEWAY4 if ipv4_job else None,
        ipv4_job=ipv4_job,
        ipv6_prefix=None if v6 is None else slash64(v6, slot),
    )


class RoutedDriver(RoutingDriver[RoutedNetwork]):
    mode = "routed"

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._proxying: set[str] = set()  # uplinks with proxy_ndp on

    @staticmethod
    def validate(settings: Settings) -> None:
        if settings.proxy_nd is not None and (
            settings.routed_ipv6_prefix is None and settings.routed_ipv4_pool is None
        ):
            raise ConfigError(
                "LARKNS_PROXY_ND: set LARKNS_ROUTED_IPV6_PREFIX and/or LARKNS_ROUTED_IPV4_POOL "
                "(the addresses it answers for)"
            )
        if (
            settings.clat == "on"
            and settings.routed_ipv4_pool is not None
            and (settings.routed_ipv6_prefix is None)
        ):
            raise ConfigError(
                "LARKNS_CLAT=on: routed jobs need LARKNS_ROUTED_IPV6_PREFIX "
                "(the CLAT translates their IPv4 to IPv6)"
            )

    def refuse(self, name: str, prefix: ipaddress.IPv6Network, clat: bool) -> None:
        # Before a slot is taken: routed needs its prefixes.
        probe = plan(self.settings, name, 0, prefix)
        if clat and probe.ipv6_prefix is None:
            raise ConfigError(
                "--mode routed on a worker without IPv4 needs LARKNS_ROUTED_IPV6_PREFIX "
                "(the CLAT translates jobs' IPv4 to IPv6)"
            )

    def slot_count(self, prefix: ipaddress.IPv6Network) -> int:
        return routed_slot_count(self.settings, prefix)

    def pools(self, prefix: ipaddress.IPv6Network) -> str:
        return (
            f"LARKNS_ROUTED_IPV4_POOL={self.settings.routed_ipv4_pool}, "
            f"LARKNS_ROUTED_IPV6_PREFIX={self.settings.routed_ipv6_prefix}"
        )

    def plan_slot(self, name: str, slot: int, prefix: ipaddress.IPv6Network) -> RoutedNetwork:
        return plan(self.settings, name, slot, prefix)

    def publish(self, plan: RoutedNetwork, add: bool = True) -> None:
        """Answer neighbour discovery and ARP for the job's addresses on the
        uplink (LARKNS_PROXY_ND), where the site takes them for on-link
        instead of routing them to this worker."""
        uplink = self.settings.proxy_nd
        if uplink is None:
            return
        engine = self.engine
        idx = engine.rtnl.link_index(uplink)
        if idx is None:
            if add:
                raise SetupError(f"LARKNS_PROXY_ND: no link {uplink!r} on this worker")
            return
        if add and uplink not in self._proxying:
            sysctl.write(f"ipv6/conf/{uplink}/proxy_ndp", 1)
            self._proxying.add(uplink)
        targets: list[Address] = [a for a in (plan.ipv6_job, plan.ipv6_clat) if a is not None]
        if plan.ipv4_job is not None:
            targets.append(plan.ipv4_job.ip)
        engine.rtnl.run(
            *(rtnl.proxy_neighbour(idx, a, delete=not add) for a in targets),
            ignore=() if add else rtnl.ignore_missing(),
        )


DRIVER = RoutedDriver
