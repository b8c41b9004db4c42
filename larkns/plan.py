"""JobNetwork: what one job's network will be, as plain data.

A plan is built from settings and a slot (the job's index in the address
pools) without touching the kernel, so it can be printed, journaled and tested
without root.  Everything the engine creates is named here.

The common core is JobNetwork (a job, its namespace, its slot); a job with a
link to the host is a LinkedNetwork (its veth, numbered by the slot); each
network type adds its own fields in its own module under larkns/modes, and
registers its plan class here by its type's name, which is how a journal
record finds its way back to the right class.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any, ClassVar

from larkns.kernel.mac import format as format_mac
from larkns.kernel.mac import parse as parse_mac

JOB_LINK = "eth0"
HOST_LINK_PREFIX = "lk-"
# A capped job's upload shaper, an IFB on the host: "lkb" + NAME, which
# like "lk-" + NAME fits IFNAMSIZ (15 characters) for a 12-character name.
SHAPER_LINK_PREFIX = "lkb"
# A long-running larkns (larknsd) keeps a finished job's IFB for its next
# capped job, as "lkb." + its index (no job name starts with "."):
# deleting a link costs 10-40 ms (the kernel waits for an RCU grace period),
# renaming one ~1 ms.
SPARE_SHAPER_PREFIX = SHAPER_LINK_PREFIX + "."
# The IFBs of the uplink's share (larkns/kernel/uplink.py), the node's.
SHARE_DOWN_LINK = "lkshare.down"
SHARE_UP_LINK = "lkshare.up"
# Link indexes are chosen, not looked up: the job end is the first link of a
# fresh namespace (lo is 1), the host end is numbered after the slot, far above
# what a host's own links use.  Known indexes spare setup every lookup, and
# the two ends never share an index (when they do, the kernel delays the
# carrier change, and the first RA, by up to a second).
JOB_INDEX = 2
HOST_INDEX_BASE = 1_000_000
SHAPER_INDEX_BASE = 2_000_000
LINK_LOCAL = ipaddress.IPv6Network("fe80::/64")


class PlanError(ValueError):
    """A journaled plan this version cannot read."""


def slot_mac(first: int, slot: int) -> str:
    # Locally administered unicast; the slot makes it unique on this host, and a
    # fixed MAC makes the job's SLAAC (EUI-64) address known before it exists.
    return format_mac(
        bytes([first, 0x6C, 0x6B, (slot >> 16) & 0xFF, (slot >> 8) & 0xFF, slot & 0xFF])
    )


def random_mac() -> str:
    """A locally administered unicast MAC: unique on a site's L2 network,
    where slot-numbered ones (unique per worker only) could meet."""
    import secrets

    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return format_mac(bytes(b))


def eui64(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    b = parse_mac(mac)
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return ipaddress.IPv6Address(prefix.network_address.packed[:8] + iid)


def slash64(prefix: ipaddress.IPv6Network, slot: int) -> ipaddress.IPv6Network:
    """The slot's /64 of `prefix`."""
    return ipaddress.IPv6Network((int(prefix.network_address) + (slot << 64), 64))


def host_range(pool: ipaddress.IPv4Network) -> tuple[int, int]:
    """(first address, how many) of a pool's host addresses: not its
    network and broadcast addresses, which some hosts refuse to talk to."""
    if pool.prefixlen >= 31:
        return int(pool.network_address), pool.num_addresses
    return int(pool.network_address) + 1, pool.num_addresses - 2


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, kw_only=True)
class JobNetwork:
    """What every job's network has: a name, a namespace, and the traffic
    classes it is counted in."""

    mode: ClassVar[str] = ""
    types: ClassVar[dict[str, type[JobNetwork]]] = {}

    name: str
    netns: str
    slot: int | None = None
    # The traffic classes the job is counted in (LARKNS_CLASSES when it was
    # set up; another process, with other classes, may tear it down).  None:
    # a record from before larkns wrote them down.
    classes: tuple[str, ...] | None = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.mode:
            JobNetwork.types[cls.mode] = cls

    # -- what callers ask of any plan -------------------------------------

    def job_env(self) -> dict[str, str]:
        """What the job's environment learns of its network."""
        return {}

    @property
    def forwarded_ports(self) -> tuple[int, int] | None:
        """The worker's ports forwarded to the job, first and last."""
        return None

    @property
    def planned_ipv4(self) -> ipaddress.IPv4Address | None:
        """The job's IPv4 address as far as known before it runs."""
        return None

    @property
    def planned_ipv6(self) -> ipaddress.IPv6Address | None:
        """The job's main IPv6 address as far as known before it runs."""
        return None

    @property
    def waits_for_slaac(self) -> bool:
        """Whether the job's IPv6 comes by SLAAC, which setup waits for."""
        return False

    @property
    def destination_policy(self) -> str:
        """Where the job may send (larkns/policy.py), as reports say it."""
        return "open"

    def describe(self) -> str:
        return f"job {self.name}: mode {self.mode}, netns {self.netns}"

    # -- journal ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> JobNetwork:
        """A plan as to_dict() wrote it, this version's or the previous
        one's (which kept every type's fields in one flat dict, unused
        ones None: they are ignored here)."""
        from larkns import modes

        mode = d.get("mode")
        if mode not in modes.TYPES:
            raise PlanError(f"unknown network type {mode!r}")
        modes.driver_class(mode)  # its module registers its plan class
        cls = JobNetwork.types[mode]
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d and d[f.name] is not None:
                kwargs[f.name] = _decode(str(f.type), d[f.name])
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise PlanError(f"a {mode} plan: {e}") from None


@dataclass(frozen=True, kw_only=True)
class LinkedNetwork(JobNetwork):
    """A job with a link to the host: a veth pair numbered by its slot."""

    slot: int
    host_link: str
    job_link: str = JOB_LINK
    host_index: int
    job_index: int = JOB_INDEX
    host_mac: str
    job_mac: str
    # The job's cap, (down, up) bits/s on the link (larkns/shaping.py);
    # None: not shaped.
    bandwidth: tuple[int, int] | None = None
    # Its weight in the uplink's share (larkns/kernel/uplink.py); None: the
    # uplink is not shared.
    weight: float | None = None

    @property
    def shaper_link(self) -> str:
        """The IFB its upload is shaped on (when capped)."""
        return SHAPER_LINK_PREFIX + self.name

    @property
    def shaper_index(self) -> int:
        return SHAPER_INDEX_BASE + self.slot

    @property
    def host_link_local(self) -> ipaddress.IPv6Address:
        return eui64(LINK_LOCAL, self.host_mac)

    @property
    def job_link_local(self) -> ipaddress.IPv6Address:
        return eui64(LINK_LOCAL, self.job_mac)

    def describe(self) -> str:
        return (
            f"{super().describe()}\n"
            f"  veth {self.host_link} (host, {self.host_mac})"
            f" <-> {self.job_link} (job, {self.job_mac})"
            + (f"\n  traffic classes {', '.join(self.classes)}" if self.classes else "")
            + (
                f"\n  capped at {self.bandwidth[0]} bit/s down, {self.bandwidth[1]} bit/s up"
                f" (upload shaped on {self.shaper_link})"
                if self.bandwidth
                else ""
            )
            + (f"\n  weight {self.weight:g} in the uplink's share" if self.weight else "")
        )


def linked_fields(
    settings_classes: tuple[tuple[str, object], ...],
    netns_prefix: str,
    name: str,
    slot: int,
    host_mac: str | None = None,
    job_mac: str | None = None,
) -> dict[str, Any]:
    """What every linked type names alike (links, indexes, MACs, classes)."""
    return {
        "name": name,
        "netns": netns_prefix + name,
        "slot": slot,
        "host_link": HOST_LINK_PREFIX + name,
        "host_index": HOST_INDEX_BASE + slot,
        "host_mac": host_mac or slot_mac(0x02, slot),
        "job_mac": job_mac or slot_mac(0x06, slot),
        "classes": tuple(n for n, _ in settings_classes),
    }


def _plain(v: Any) -> Any:
    if isinstance(v, ipaddress._BaseNetwork | ipaddress._BaseAddress):
        return str(v)
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


# How a journaled value becomes a field's value again, by the field's
# annotation (kept as a string: `from __future__ import annotations`).
_DECODERS: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "ipaddress.IPv4Interface": ipaddress.IPv4Interface,
    "ipaddress.IPv4Address": ipaddress.IPv4Address,
    "ipaddress.IPv6Network": ipaddress.IPv6Network,
    "ipaddress.IPv6Address": ipaddress.IPv6Address,
    "tuple[str, ...]": lambda v: tuple(str(x) for x in v),
    "tuple[int, int]": lambda v: (int(v[0]), int(v[1])),
    "tuple[ipaddress.IPv6Network, ...]": lambda v: tuple(ipaddress.IPv6Network(x) for x in v),
}


def _decode(annotation: str, value: Any) -> Any:
    kind = annotation.removesuffix(" | None")
    decode = _DECODERS.get(kind)
    if decode is None:
        raise PlanError(f"no decoder for a field of type {annotation}")
    try:
        return decode(value)
    except (ValueError, TypeError, IndexError) as e:
        raise PlanError(f"{value!r} is no {kind}: {e}") from None
