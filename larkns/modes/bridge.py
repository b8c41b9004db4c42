"""bridge: the job's veth is a port of the site network's bridge
(LARKNS_BRIDGE).  Its IPv4 is either static, from this node's range of the
site's subnet (LARKNS_BRIDGE_IPV4_POOL), or leased by DHCP from the site's
server (LARKNS_BRIDGE_IPV4=dhcp) with larkns's own client; its IPv6 comes by
SLAAC from the site's router.  Counting and the guard are in `bridge larkns`."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from larkns.config import ConfigError, Settings, host_ula_prefix
from larkns.journal import Record
from larkns.kernel import addrs, dhcp, links, netns, rtnl
from larkns.kernel.bridge import BridgeRuleset
from larkns.kernel.nft import NftError
from larkns.kernel.rtnl import Rtnl
from larkns.modes.base import Failures, SetupError, all_classes, classes_of
from larkns.modes.link import LinkedDriver
from larkns.modes.nat import slot_count
from larkns.plan import (
    HOST_LINK_PREFIX,
    LINK_LOCAL,
    LinkedNetwork,
    eui64,
    host_range,
    linked_fields,
    random_mac,
    slot_mac,
)
from larkns.policy import Policy
from larkns.traffic import Count

if TYPE_CHECKING:
    from larkns.engine import Engine


@dataclass(frozen=True, kw_only=True)
class BridgeNetwork(LinkedNetwork):
    mode = "bridge"

    bridge: str
    # A static address from this node's range (None: by DHCP, or none).
    ipv4_job: ipaddress.IPv4Interface | None = None
    gateway4: ipaddress.IPv4Address | None = None  # the site's, for a static address
    # The site's IPv6 prefixes (from the bridge's own addresses) the job may
    # take by SLAAC.
    site_prefixes: tuple[ipaddress.IPv6Network, ...] = ()
    dhcp: bool = False  # IPv4 by DHCP from the site's server

    def allowed_ipv6(self) -> list[ipaddress.IPv6Address]:
        """The IPv6 sources the job may use, as far as known before it has
        them: its link-local and its SLAAC address in each of the site's
        prefixes (EUI-64: the MAC is fixed)."""
        return [eui64(n, self.job_mac) for n in (LINK_LOCAL, *self.site_prefixes)]

    @property
    def planned_ipv4(self) -> ipaddress.IPv4Address | None:
        return None if self.ipv4_job is None else self.ipv4_job.ip

    @property
    def planned_ipv6(self) -> ipaddress.IPv6Address | None:
        return eui64(self.site_prefixes[0], self.job_mac) if self.site_prefixes else None

    @property
    def waits_for_slaac(self) -> bool:
        return bool(self.site_prefixes)

    def describe(self) -> str:
        lines = [super().describe(), f"  port of bridge {self.bridge}"]
        if self.ipv4_job:
            lines.append(f"  ipv4 {self.ipv4_job} via {self.gateway4}")
        elif self.dhcp:
            lines.append("  ipv4 by DHCP")
        for p in self.site_prefixes:
            lines.append(f"  ipv6 {eui64(p, self.job_mac)} (SLAAC in {p}, the site's router)")
        return "\n".join(lines)


@dataclass(frozen=True)
class BridgeFacts:
    """What the worker's bridge says of the site network."""

    subnet: ipaddress.IPv4Network | None  # the bridge's IPv4 subnet
    gateway: ipaddress.IPv4Address | None  # the worker's default gateway on it
    prefixes: tuple[ipaddress.IPv6Network, ...]  # the bridge's global /64s


def ipv4_method(settings: Settings) -> str:
    """static, dhcp or none: LARKNS_BRIDGE_IPV4, by default static when a
    pool is set."""
    return settings.bridge_ipv4 or ("static" if settings.bridge_ipv4_pool is not None else "none")


def bridge_slot_count(settings: Settings, ipv6_prefix: ipaddress.IPv6Network) -> int:
    """Slots a bridge-mode job may take: within LARKNS_BRIDGE_IPV4_POOL."""
    count = slot_count(settings, ipv6_prefix)
    if settings.bridge_ipv4_pool is not None and ipv4_method(settings) == "static":
        count = min(count, host_range(settings.bridge_ipv4_pool)[1])
    return count


def plan(
    settings: Settings, name: str, slot: int, facts: BridgeFacts, job_mac: str
) -> BridgeNetwork:
    """A bridge-mode job: a port of the site's bridge, an address of this
    node's range of the site's subnet (if set), IPv6 by the site's RAs."""
    if settings.bridge is None:
        raise ConfigError("--mode bridge: set LARKNS_BRIDGE (the site network's bridge)")
    ipv4_job = None
    pool = settings.bridge_ipv4_pool
    how = ipv4_method(settings)
    if how == "static":
        if pool is None:
            raise ConfigError("LARKNS_BRIDGE_IPV4: static needs LARKNS_BRIDGE_IPV4_POOL")
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
        first, count = host_range(pool)
        if not 0 <= slot < count:
            raise ConfigError(f"slot {slot} is outside LARKNS_BRIDGE_IPV4_POOL")
        ipv4_job = ipaddress.IPv4Interface((first + slot, facts.subnet.prefixlen))
    return BridgeNetwork(
        # High, so that the bridge never takes a port's address as its own
        # (it takes the lowest of its ports' unless set by hand).
        **linked_fields(
            settings.classes, settings.netns_prefix, name, slot, slot_mac(0xFE, slot), job_mac
        ),
        ipv4_job=ipv4_job,
        bridge=settings.bridge,
        gateway4=facts.gateway if ipv4_job else None,
        site_prefixes=facts.prefixes,
        dhcp=how == "dhcp",
    )


class BridgeDriver(LinkedDriver[BridgeNetwork]):
    mode = "bridge"
    table = BridgeRuleset

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._dhcp: dict[str, dhcp.Renewer] = {}  # the leases of jobs this process serves

    @staticmethod
    def validate(settings: Settings) -> None:
        if settings.bridge is None:
            for knob, value in (
                ("LARKNS_BRIDGE_IPV4_POOL", settings.bridge_ipv4_pool),
                ("LARKNS_BRIDGE_IPV4", settings.bridge_ipv4),
            ):
                if value is not None:
                    raise ConfigError(f"{knob} is set, but LARKNS_BRIDGE (the bridge) is not")
        if settings.bridge_ipv4 == "static" and settings.bridge_ipv4_pool is None:
            raise ConfigError("LARKNS_BRIDGE_IPV4: static needs LARKNS_BRIDGE_IPV4_POOL")

    def rules(self) -> BridgeRuleset:
        return self.engine.table(BridgeRuleset)

    def facts(self) -> BridgeFacts:
        """The site network as the worker's bridge sees it."""
        name = self.settings.bridge
        if name is None:
            raise ConfigError("--mode bridge: set LARKNS_BRIDGE (the site network's bridge)")
        ipr = self.engine.ipr
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise ConfigError(f"LARKNS_BRIDGE: no link {name!r} on this worker")
        (idx,) = found
        if links.kind(ipr, idx) != "bridge":
            raise ConfigError(f"LARKNS_BRIDGE: {name} is not a bridge")
        subnet = None
        for a in ipr.get_addr(index=idx, family=socket.AF_INET):
            subnet = ipaddress.IPv4Interface(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            ).network
            break
        gateway = None
        for r in ipr.get_default_routes(family=socket.AF_INET):
            if r.get_attr("RTA_OIF") == idx and r.get_attr("RTA_GATEWAY"):
                gateway = ipaddress.IPv4Address(r.get_attr("RTA_GATEWAY"))
        prefixes = []
        for a in ipr.get_addr(index=idx, family=socket.AF_INET6):
            if a["scope"] == 0 and a["prefixlen"] == 64:
                net = ipaddress.IPv6Interface(f"{a.get_attr('IFA_ADDRESS')}/64").network
                if net not in prefixes:
                    prefixes.append(net)
        return BridgeFacts(subnet, gateway, tuple(prefixes))

    def plan(self, name: str, policy: Policy) -> BridgeNetwork:
        settings = self.settings
        if not policy.unrestricted:
            # Refused rather than run unrestricted: the bridge table has no
            # policy chains (yet).
            raise SetupError(
                f"destination policy {policy.text()!r}: bridge-mode jobs can only be open "
                "(policies are for nat and routed jobs)"
            )
        facts = self.facts()
        # A configuration that cannot work is refused before a slot is taken.
        plan(settings, name, 0, facts, random_mac())
        prefix = settings.ipv6_prefix or host_ula_prefix(settings.lib_dir)
        slot = self.engine.lease_slot(
            name,
            bridge_slot_count(settings, prefix),
            f"LARKNS_BRIDGE_IPV4_POOL={settings.bridge_ipv4_pool}",
        )
        return plan(settings, name, slot, facts, random_mac())

    def build(self, plan: BridgeNetwork, job: Rtnl, record: Record) -> None:
        """The job's veth, a port of the site's bridge, guarded before it is up."""
        engine = self.engine
        master = engine.rtnl.link_index(plan.bridge)
        if master is None:
            raise SetupError(f"LARKNS_BRIDGE: no link {plan.bridge!r} on this worker")
        ipv4 = plan.ipv4_job.ip if plan.ipv4_job else None
        self.rules().add_job(plan.name, plan.host_link, plan.job_mac, ipv4, plan.allowed_ipv6())
        idx = self.create_veth(plan)
        # A port has no addresses of its own; it joins the bridge, then comes up.
        engine.rtnl.run(
            rtnl.no_link_local(idx, plan.host_link),
            rtnl.link_master(idx, master, plan.host_link),
            rtnl.bpdu_guard(idx, plan.host_link),
            rtnl.link_up(idx, plan.host_link),
        )
        addrs.job_side(job, plan.job_index, plan.ipv4_job, plan.gateway4)
        if plan.dhcp:
            record.dhcp = self._dhcp_start(plan, job, record)

    # -- DHCP ----------------------------------------------------------------

    def _dhcp_start(
        self, plan: BridgeNetwork, job: Rtnl, record: Record, lease: dhcp.Lease | None = None
    ) -> dhcp.Lease:
        """Lease the job's IPv4 address from the site's DHCP server (or take
        up `lease`, after a restart), apply it, let the guard allow it, and
        keep it for as long as the job runs."""
        client = dhcp.Client(plan.netns, plan.job_link, plan.job_mac)
        try:
            if lease is None:
                try:
                    lease = client.obtain(self.settings.dhcp_timeout)
                except dhcp.DhcpError as e:
                    raise SetupError(f"DHCP on {plan.bridge}: {e}") from None
                self._dhcp_apply(plan, job, None, lease, record.sources)
        except BaseException:
            client.close()
            raise
        self._dhcp[plan.name] = dhcp.Renewer(
            client, lease, lambda old, new: self._dhcp_changed(plan, old, new)
        )
        return lease

    def _dhcp_apply(
        self,
        plan: BridgeNetwork,
        job: Rtnl,
        old: dhcp.Lease | None,
        new: dhcp.Lease | None,
        taken: tuple[ipaddress.IPv6Address, ...],
    ) -> None:
        """The job's link goes from lease `old` to lease `new` (None: none)."""
        if old is not None and (new is None or old.address != new.address):
            job.run(
                rtnl.address(plan.job_index, old.address, delete=True),
                ignore=rtnl.ignore_missing(),
            )
        if new is not None and (old is None or old.address != new.address):
            requests = [rtnl.address(plan.job_index, new.address)]
            if new.router is not None:
                requests.append(
                    rtnl.route(ipaddress.IPv4Network("0.0.0.0/0"), plan.job_index, new.router)
                )
            job.run(*requests)
        # The guard lets the job send from the leased address, and no other.
        self._guard(plan, None if new is None else new.address.ip, taken)

    def _guard(
        self,
        plan: BridgeNetwork,
        ipv4: ipaddress.IPv4Address | None,
        taken: tuple[ipaddress.IPv6Address, ...],
    ) -> None:
        """What the job may send from, all of it: its MAC, `ipv4`, its
        foreseen IPv6 addresses and the ones it took besides."""
        self.rules().allow(plan.name, plan.job_mac, ipv4, [*plan.allowed_ipv6(), *taken])

    def _ipv4(self, plan: BridgeNetwork) -> ipaddress.IPv4Address | None:
        renewer = self._dhcp.get(plan.name)
        if renewer is not None:
            return None if renewer.lease is None else renewer.lease.address.ip
        return plan.planned_ipv4

    def _dhcp_changed(
        self, plan: BridgeNetwork, old: dhcp.Lease | None, new: dhcp.Lease | None
    ) -> bool:
        """From the renewer's thread: a renewed, changed, lost or new lease;
        whether it is applied (the renewer tries again if not)."""
        engine = self.engine
        # Shared netlink and nft handles: under the engine's lock.
        if not engine.lock.acquire(timeout=2):
            return False
        try:
            record = engine.journal.read(plan.name)
            if (old is None) != (new is None) or (
                old is not None and new is not None and old.address != new.address
            ):
                try:
                    with engine.job_socket(plan) as job:
                        taken = record.sources if record is not None else ()
                        self._dhcp_apply(plan, job, old, new, taken)
                except Exception as e:
                    print(f"larkns: job {plan.name}: DHCP change not applied: {e}", file=sys.stderr)
                    return False
            if record is not None:
                record.dhcp = new
                with contextlib.suppress(OSError):
                    engine.journal.write(record)
            return True
        finally:
            engine.lock.release()

    # -- the rest of the verbs ------------------------------------------------

    def adopt(self, plan: BridgeNetwork, record: Record) -> None:
        if plan.dhcp and plan.name not in self._dhcp and record.dhcp is not None:
            # Keep renewing the lease the last larkns process got.
            with self.engine.job_socket(plan) as job:
                self._dhcp_start(plan, job, record, record.dhcp)

    def wait_ready(
        self, plan: BridgeNetwork, timeout: float, cancel: Callable[[], bool]
    ) -> float | None:
        """Wait for the job's SLAAC address from the site's router; then let
        the guard allow whatever addresses it took."""
        if not plan.site_prefixes:
            return 0.0
        engine = self.engine
        with engine.job_socket(plan) as job:
            waited = addrs.wait_slaac(job, plan.job_index, plan.site_prefixes[0], timeout, cancel)
            got = addrs.ipv6_global(job, plan.job_index)
        allowed = plan.allowed_ipv6()
        extra = tuple(a for a in got if a not in allowed)
        if extra:
            with engine.lock:
                self._guard(plan, self._ipv4(plan), extra)
                record = engine.journal.read(plan.name)
                if record is not None:
                    record.sources = extra
                    engine.journal.write(record)
        return waited

    def addresses(self, plan: BridgeNetwork) -> tuple[str | None, list[str]]:
        with self.engine.job_socket(plan) as job:
            v6 = [str(a) for a in addrs.ipv6_global(job, plan.job_index)]
        ipv4 = self._ipv4(plan)
        return (None if ipv4 is None else str(ipv4), v6)

    def check(self, plan: BridgeNetwork) -> list[str]:
        problems = super().check(plan)
        if plan.name not in self.rules().jobs():
            problems.insert(0, f"bridge guard of {plan.name} is missing")
        return problems

    def release(
        self, name: str, plan: BridgeNetwork | None, record: Record | None, failures: Failures
    ) -> None:
        if plan is None or not plan.dhcp:
            return
        # The lease goes back to the site's server before the link goes.
        renewer = self._dhcp.pop(name, None)
        if renewer is not None:
            renewer.stop(release=True)
            return
        # Another process's (killed) job: release what its record says.  A
        # server that never hears of it lets the lease expire: no failure.
        if record is not None and record.dhcp is not None and netns.exists(plan.netns):
            with contextlib.suppress(Exception):
                client = dhcp.Client(plan.netns, plan.job_link, plan.job_mac)
                try:
                    client.release(record.dhcp)
                finally:
                    client.close()

    def remove(
        self, name: str, plan: BridgeNetwork | None, record: Record | None, failures: Failures
    ) -> None:
        with failures.step(f"bridge guard and counters of {name}"):
            rules = self.rules()
            if plan is not None:
                rules.remove_job(name, plan.host_link, classes_of(plan, rules, self.settings))
            elif rules.has_table():
                rules.remove_job(name, HOST_LINK_PREFIX + name, all_classes(rules, self.settings))

    def restore(self, plan: BridgeNetwork, record: Record, start: dict[str, Count]) -> None:
        ipv4 = self._ipv4(plan)
        if ipv4 is None and record.dhcp is not None:
            ipv4 = record.dhcp.address.ip  # another process's lease
        rules = self.rules()
        rules.add_job(
            plan.name,
            plan.host_link,
            plan.job_mac,
            ipv4,
            [*plan.allowed_ipv6(), *record.sources],
            start=start,
        )

    def sweep(self, live: set[str], left: list[str]) -> list[str]:
        try:
            rules = self.rules()
            orphans = rules.jobs() - live
            classes = rules.table_classes() if orphans else ()
        except Exception:
            return []
        removed = []
        for job in sorted(orphans):
            try:
                rules.remove_job(job, HOST_LINK_PREFIX + job, classes)
                removed.append(f"bridge guard and counters of {job}")
            except NftError as e:
                left.append(f"bridge guard and counters of {job}: {e}")
        return removed

    def close(self) -> None:
        # Jobs that outlive this process keep their leases: the next larkns
        # process (a restarted larknsd) renews them (adopt), or gc releases.
        for renewer in self._dhcp.values():
            renewer.stop(release=False)
        self._dhcp.clear()


DRIVER = BridgeDriver
