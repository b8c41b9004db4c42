"""nat: the job gets an IPv4 /31 from LARKNS_IPV4_POOL and an IPv6 /64 of
LARKNS_IPV6_PREFIX (SLAAC from larkns's RAs); the worker masquerades both
families, and may forward a block of its ports to the job."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from larkns.config import ConfigError, Settings
from larkns.kernel.nft import Inbound
from larkns.modes.routing import RoutingDriver, RoutingNetwork
from larkns.plan import linked_fields, slash64


@dataclass(frozen=True, kw_only=True)
class NatNetwork(RoutingNetwork):
    mode = "nat"

    # The worker's ports forwarded to the job, first and last.
    inbound_ports: tuple[int, int] | None = None

    def job_env(self) -> dict[str, str]:
        if self.inbound_ports is None:
            return {}
        return {"LARKNS_JOB_PORTS": f"{self.inbound_ports[0]}-{self.inbound_ports[1]}"}

    @property
    def forwarded_ports(self) -> tuple[int, int] | None:
        return self.inbound_ports

    def describe(self) -> str:
        out = super().describe()
        if self.inbound_ports:
            out += f"\n  forwarded ports {self.inbound_ports[0]}-{self.inbound_ports[1]}"
        return out


def slot_count(settings: Settings, ipv6_prefix: ipaddress.IPv6Network) -> int:
    """How many jobs the pools can address at once: slots are shared by all
    types (they number host links and MACs), so every type's count is
    within this one."""
    v4 = settings.ipv4_pool.num_addresses // 2
    v6 = 1 << min(64 - ipv6_prefix.prefixlen, 32)
    return min(v4, v6)


def nat_slot_count(settings: Settings, ipv6_prefix: ipaddress.IPv6Network) -> int:
    """How many slots a nat job may take: with forwarded ports, as many as
    LARKNS_INBOUND_PORTS has blocks for."""
    count = slot_count(settings, ipv6_prefix)
    if settings.inbound_ports is not None:
        lo, hi = settings.inbound_ports
        count = min(count, (hi - lo + 1) // settings.inbound_per_job)
    return count


def _inbound_ports(settings: Settings, slot: int) -> tuple[int, int] | None:
    if settings.inbound_ports is None:
        return None
    first = settings.inbound_ports[0] + slot * settings.inbound_per_job
    last = first + settings.inbound_per_job - 1
    if last > settings.inbound_ports[1]:
        raise ConfigError(f"slot {slot} is outside LARKNS_INBOUND_PORTS")
    return (first, last)


def plan(
    settings: Settings, name: str, slot: int, ipv6_prefix: ipaddress.IPv6Network
) -> NatNetwork:
    """The plan of nat job `name`, addressed from pool index `slot`."""
    if not 0 <= slot < slot_count(settings, ipv6_prefix):
        raise ConfigError(f"slot {slot} is outside the address pools")
    base4 = int(settings.ipv4_pool.network_address) + 2 * slot
    return NatNetwork(
        **linked_fields(settings.classes, settings.netns_prefix, name, slot),
        ipv4_host=ipaddress.IPv4Interface((base4, 31)),
        ipv4_job=ipaddress.IPv4Interface((base4 + 1, 31)),
        ipv6_prefix=slash64(ipv6_prefix, slot),
        inbound_ports=_inbound_ports(settings, slot),
    )


class NatDriver(RoutingDriver[NatNetwork]):
    mode = "nat"
    masquerade = True

    def inbound(self, plan: NatNetwork) -> Inbound | None:
        if plan.inbound_ports is None:
            return None
        first, last = plan.inbound_ports
        ipv4 = plan.ipv4_job.ip if plan.ipv4_job else None
        return Inbound(range(first, last + 1), ipv4, plan.ipv6_job)

    def slot_count(self, prefix: ipaddress.IPv6Network) -> int:
        return nat_slot_count(self.settings, prefix)

    def pools(self, prefix: ipaddress.IPv6Network) -> str:
        return f"LARKNS_IPV4_POOL={self.settings.ipv4_pool}, LARKNS_IPV6_PREFIX={prefix}"

    def plan_slot(self, name: str, slot: int, prefix: ipaddress.IPv6Network) -> NatNetwork:
        return plan(self.settings, name, slot, prefix)


DRIVER = NatDriver
