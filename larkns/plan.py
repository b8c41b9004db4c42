"""JobNetwork: what one job's network will be, as plain data.

A plan is built from settings and a slot (the job's index in the address
pools) without touching the kernel, so it can be printed, journaled and tested
without root.  Everything the engine creates is named here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any

from larkns.config import ConfigError, Settings

JOB_LINK = "eth0"
HOST_LINK_PREFIX = "lk-"
# Link indexes are chosen, not looked up: the job end is the first link of a
# fresh namespace (lo is 1), the host end is numbered after the slot, far above
# what a host's own links use.  Known indexes spare setup every lookup, and
# the two ends never share an index (when they do, the kernel delays the
# carrier change, and the first RA, by up to a second).
JOB_INDEX = 2
HOST_INDEX_BASE = 1_000_000
# routed mode: a job's IPv4 is a /32, and its gateway this link-local address,
# the same on every job's host end (as Calico does): no address of the routed
# range is spent on the host side.
ROUTED_GATEWAY4 = ipaddress.IPv4Interface("169.254.0.1/32")
# CLAT (464XLAT): the job's IPv4 address (RFC 7335), the translator's own,
# and the interface id of the job's translated IPv6 address.
CLAT_JOB4 = ipaddress.IPv4Interface("192.0.0.1/32")
CLAT_SELF4 = ipaddress.IPv4Address("192.0.0.2")
CLAT_IID = 0x464
# Modes in which a job has a link to the host (and counters, and the guard).
LINKED_MODES = ("nat", "routed", "bridge")
# Modes whose traffic the host routes (table inet larkns); bridge-mode
# traffic is switched (table bridge larkns).
ROUTED_MODES = ("nat", "routed")


def slot_count(settings: Settings, ipv6_prefix: ipaddress.IPv6Network) -> int:
    """How many jobs the pools can address at once."""
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


def _inbound(settings: Settings, slot: int) -> tuple[int, int] | None:
    if settings.inbound_ports is None:
        return None
    first = settings.inbound_ports[0] + slot * settings.inbound_per_job
    last = first + settings.inbound_per_job - 1
    if last > settings.inbound_ports[1]:
        raise ConfigError(f"slot {slot} is outside LARKNS_INBOUND_PORTS")
    return (first, last)


def _routed_ipv4(pool: ipaddress.IPv4Network) -> tuple[int, int]:
    """(first address, how many) of a routed pool's job addresses: not its
    network and broadcast addresses, which some hosts refuse to talk to."""
    if pool.prefixlen >= 31:
        return int(pool.network_address), pool.num_addresses
    return int(pool.network_address) + 1, pool.num_addresses - 2


def routed_slot_count(settings: Settings, ipv6_prefix: ipaddress.IPv6Network) -> int:
    """How many slots a routed job may take: slots are shared by all modes
    (they number host links and MACs), so within the NAT pools' too."""
    count = slot_count(settings, ipv6_prefix)
    if settings.routed_ipv6_prefix is not None:
        count = min(count, 1 << min(64 - settings.routed_ipv6_prefix.prefixlen, 32))
    if settings.routed_ipv4_pool is not None:
        count = min(count, _routed_ipv4(settings.routed_ipv4_pool)[1])
    return count


def _mac(first: int, slot: int) -> str:
    # Locally administered unicast; the slot makes it unique on this host, and a
    # fixed MAC makes the job's SLAAC (EUI-64) address known before it exists.
    b = [first, 0x6C, 0x6B, (slot >> 16) & 0xFF, (slot >> 8) & 0xFF, slot & 0xFF]
    return ":".join(f"{x:02x}" for x in b)


def eui64(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    b = bytes(int(x, 16) for x in mac.split(":"))
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return ipaddress.IPv6Address(prefix.network_address.packed[:8] + iid)


@dataclass(frozen=True)
class JobNetwork:
    name: str
    mode: str
    netns: str
    slot: int | None = None
    host_link: str | None = None
    job_link: str | None = None
    host_index: int | None = None
    job_index: int | None = None
    host_mac: str | None = None
    job_mac: str | None = None
    ipv4_host: ipaddress.IPv4Interface | None = None
    ipv4_job: ipaddress.IPv4Interface | None = None
    ipv6_prefix: ipaddress.IPv6Network | None = None
    # The traffic classes the job is counted in (LARKNS_CLASSES when it was
    # set up; another process, with other classes, may tear it down).  None:
    # a record from before larkns wrote them down.
    classes: tuple[str, ...] | None = None
    # nat mode: the worker's ports forwarded to the job, first and last.
    inbound_ports: tuple[int, int] | None = None
    # bridge mode: the bridge, the site's IPv4 gateway, and the site's IPv6
    # prefixes (from the bridge's own addresses) the job may take by SLAAC.
    bridge: str | None = None
    gateway4: ipaddress.IPv4Address | None = None
    site_prefixes: tuple[ipaddress.IPv6Network, ...] = ()
    # bridge mode: IPv4 by DHCP from the site's server (larkns's client).
    dhcp: bool = False
    # IPv6-only worker: the job's IPv4 is a CLAT's (192.0.0.1), translated
    # to IPv6 toward this NAT64 prefix.
    nat64_prefix: ipaddress.IPv6Network | None = None

    @property
    def clat(self) -> bool:
        return self.nat64_prefix is not None

    @property
    def ipv6_clat(self) -> ipaddress.IPv6Address | None:
        """The IPv6 address the job's IPv4 traffic leaves from (in its /64)."""
        if self.ipv6_prefix is None or not self.clat:
            return None
        return self.ipv6_prefix.network_address + CLAT_IID

    def job_env(self) -> dict[str, str]:
        """What the job's environment learns of its network."""
        if self.inbound_ports is None:
            return {}
        return {"LARKNS_JOB_PORTS": f"{self.inbound_ports[0]}-{self.inbound_ports[1]}"}

    @property
    def linked(self) -> bool:
        """Whether the job has a link to the host (all but "none")."""
        return self.mode in LINKED_MODES

    @property
    def host_routed(self) -> bool:
        """Whether the host routes the job's traffic (nat, routed)."""
        return self.mode in ROUTED_MODES

    def allowed_ipv6(self) -> list[ipaddress.IPv6Address]:
        """bridge mode: the IPv6 sources the job may use, as far as known
        before it has them: its link-local and its SLAAC address in each of
        the site's prefixes (EUI-64: the MAC is fixed)."""
        if self.job_mac is None:
            return []
        nets = [ipaddress.IPv6Network("fe80::/64"), *self.site_prefixes]
        return [eui64(n, self.job_mac) for n in nets]

    @property
    def ipv6_job(self) -> ipaddress.IPv6Address | None:
        """The address the job will form by SLAAC from larkns's RA."""
        if self.ipv6_prefix is None or self.job_mac is None:
            return None
        return eui64(self.ipv6_prefix, self.job_mac)

    @property
    def host_link_local(self) -> ipaddress.IPv6Address | None:
        if self.host_mac is None:
            return None
        return eui64(ipaddress.IPv6Network("fe80::/64"), self.host_mac)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, ipaddress._BaseNetwork | ipaddress._BaseAddress):
                return str(v)
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v

        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobNetwork:
        def opt(kind: type[Any], key: str) -> Any:
            v = d.get(key)
            return None if v is None else kind(v)

        return cls(
            name=d["name"],
            mode=d["mode"],
            netns=d["netns"],
            slot=d.get("slot"),
            host_link=d.get("host_link"),
            job_link=d.get("job_link"),
            host_index=d.get("host_index"),
            job_index=d.get("job_index"),
            host_mac=d.get("host_mac"),
            job_mac=d.get("job_mac"),
            ipv4_host=opt(ipaddress.IPv4Interface, "ipv4_host"),
            ipv4_job=opt(ipaddress.IPv4Interface, "ipv4_job"),
            ipv6_prefix=opt(ipaddress.IPv6Network, "ipv6_prefix"),
            classes=opt(tuple, "classes"),
            inbound_ports=opt(tuple, "inbound_ports"),
            bridge=d.get("bridge"),
            gateway4=opt(ipaddress.IPv4Address, "gateway4"),
            site_prefixes=tuple(ipaddress.IPv6Network(p) for p in d.get("site_prefixes") or ()),
            dhcp=bool(d.get("dhcp", False)),
            nat64_prefix=opt(ipaddress.IPv6Network, "nat64_prefix"),
        )

    def describe(self) -> str:
        lines = [f"job {self.name}: mode {self.mode}, netns {self.netns}"]
        if self.host_link:
            lines.append(
                f"  veth {self.host_link} (host, {self.host_mac})"
                f" <-> {self.job_link} (job, {self.job_mac})"
            )
        if self.ipv4_job:
            lines.append(
                f"  ipv4 {self.ipv4_job} via {self.ipv4_host.ip if self.ipv4_host else '-'}"
            )
        if self.ipv6_prefix:
            lines.append(
                f"  ipv6 {self.ipv6_job} (SLAAC in {self.ipv6_prefix}) via {self.host_link_local}"
            )
        if self.classes:
            lines.append(f"  traffic classes {', '.join(self.classes)}")
        if self.inbound_ports:
            lines.append(f"  forwarded ports {self.inbound_ports[0]}-{self.inbound_ports[1]}")
        if self.clat:
            lines.append(
                f"  ipv4 {CLAT_JOB4.ip} by CLAT, as {self.ipv6_clat} toward {self.nat64_prefix}"
            )
        return "\n".join(lines)


def build(
    settings: Settings,
    name: str,
    mode: str,
    slot: int | None,
    ipv6_prefix: ipaddress.IPv6Network | None,
) -> JobNetwork:
    """The plan of job `name` in `mode`, addressed from pool index `slot`."""
    netns = settings.netns_prefix + name
    if mode == "none":
        return JobNetwork(name=name, mode=mode, netns=netns)
    if mode == "bridge":
        raise ValueError("bridge-mode plans need the bridge's facts: see bridged()")
    if mode not in LINKED_MODES:
        raise ConfigError(
            f"--mode: unknown network type {mode!r} (expected nat, routed, bridge or none)"
        )
    if slot is None or ipv6_prefix is None:
        raise ValueError(f"{mode} mode needs a slot and an IPv6 prefix")
    if mode == "routed":
        return _routed(settings, name, slot, ipv6_prefix)
    if not 0 <= slot < slot_count(settings, ipv6_prefix):
        raise ConfigError(f"slot {slot} is outside the address pools")
    base4 = int(settings.ipv4_pool.network_address) + 2 * slot
    prefix6 = _slash64(ipv6_prefix, slot)
    return _linked(
        settings,
        name,
        mode,
        slot,
        ipv4_host=ipaddress.IPv4Interface((base4, 31)),
        ipv4_job=ipaddress.IPv4Interface((base4 + 1, 31)),
        ipv6_prefix=prefix6,
        inbound_ports=_inbound(settings, slot),
    )


def _linked(
    settings: Settings,
    name: str,
    mode: str,
    slot: int,
    host_mac: str | None = None,
    job_mac: str | None = None,
    **addressing: Any,
) -> JobNetwork:
    """A job with a link to the host: what every linked mode names alike
    (links, indexes, MACs, classes), and its own addressing."""
    return JobNetwork(
        name=name,
        mode=mode,
        netns=settings.netns_prefix + name,
        slot=slot,
        host_link=HOST_LINK_PREFIX + name,
        job_link=JOB_LINK,
        host_index=HOST_INDEX_BASE + slot,
        job_index=JOB_INDEX,
        host_mac=host_mac or _mac(0x02, slot),
        job_mac=job_mac or _mac(0x06, slot),
        classes=tuple(n for n, _ in settings.classes),
        **addressing,
    )


def _slash64(prefix: ipaddress.IPv6Network, slot: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((int(prefix.network_address) + (slot << 64), 64))


def _routed(
    settings: Settings, name: str, slot: int, nat_prefix: ipaddress.IPv6Network
) -> JobNetwork:
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
        first, _ = _routed_ipv4(v4)
        ipv4_job = ipaddress.IPv4Interface((first + slot, 32))
    return _linked(
        settings,
        name,
        "routed",
        slot,
        ipv4_host=ROUTED_GATEWAY4 if ipv4_job else None,
        ipv4_job=ipv4_job,
        ipv6_prefix=None if v6 is None else _slash64(v6, slot),
    )


@dataclass(frozen=True)
class BridgeFacts:
    """What the worker's bridge says of the site network (read by the engine)."""

    subnet: ipaddress.IPv4Network | None  # the bridge's IPv4 subnet
    gateway: ipaddress.IPv4Address | None  # the worker's default gateway on it
    prefixes: tuple[ipaddress.IPv6Network, ...]  # the bridge's global /64s


def bridge_slot_count(settings: Settings, ipv6_prefix: ipaddress.IPv6Network) -> int:
    """Slots a bridge-mode job may take: within LARKNS_BRIDGE_IPV4_POOL."""
    count = slot_count(settings, ipv6_prefix)
    if settings.bridge_ipv4_pool is not None and settings.bridge_ipv4 in (None, "static"):
        count = min(count, _routed_ipv4(settings.bridge_ipv4_pool)[1])
    return count


def bridged(
    settings: Settings, name: str, slot: int, facts: BridgeFacts, job_mac: str
) -> JobNetwork:
    """A bridge-mode job: a port of the site's bridge, an address of this
    node's range of the site's subnet (if set), IPv6 by the site's RAs."""
    if settings.bridge is None:
        raise ConfigError("--mode bridge: set LARKNS_BRIDGE (the site network's bridge)")
    ipv4_job = None
    pool = settings.bridge_ipv4_pool
    how = settings.bridge_ipv4 or ("static" if pool is not None else "none")
    if how == "static" and pool is None:
        raise ConfigError("LARKNS_BRIDGE_IPV4: static needs LARKNS_BRIDGE_IPV4_POOL")
    if how == "static":
        assert pool is not None
        if facts.subnet is None or not pool.subnet_of(facts.subnet):
            raise ConfigError(
                f"LARKNS_BRIDGE_IPV4_POOL: {pool} is not within the IPv4 subnet of "
                f"{settings.bridge} ({facts.subnet or 'it has no IPv4 address'})"
            )
        if facts.gateway is None:
            raise ConfigError(
                f"LARKNS_BRIDGE: the worker has no IPv4 default route via {settings.bridge}, "
                "so a job would have no gateway"
            )
        first, count = _routed_ipv4(pool)
        if not 0 <= slot < count:
            raise ConfigError(f"slot {slot} is outside LARKNS_BRIDGE_IPV4_POOL")
        ipv4_job = ipaddress.IPv4Interface((first + slot, facts.subnet.prefixlen))
    return _linked(
        settings,
        name,
        "bridge",
        slot,
        # High, so that the bridge never takes a port's address as its own
        # (it takes the lowest of its ports' unless set by hand).
        host_mac=_mac(0xFE, slot),
        job_mac=job_mac,
        ipv4_job=ipv4_job,
        bridge=settings.bridge,
        gateway4=facts.gateway if ipv4_job else None,
        site_prefixes=facts.prefixes,
        dhcp=how == "dhcp",
    )


def random_mac() -> str:
    """A locally administered unicast MAC: unique on a site's L2 network,
    where slot-numbered ones (unique per worker only) could meet."""
    import secrets

    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)
