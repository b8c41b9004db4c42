"""What the types whose traffic the worker routes (nat, routed) share: the
job's addresses on both ends of its veth, the `inet larkns` table (counters,
guard), larkns's own router advertisements, SLAAC, and the CLAT on workers
without IPv4."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from larkns.config import host_ula_prefix
from larkns.journal import Record
from larkns.kernel import addrs, sysctl
from larkns.kernel.mac import parse as parse_mac
from larkns.kernel.nft import Inbound, NftError, Ruleset, policy_fingerprint
from larkns.kernel.rtnl import Rtnl
from larkns.modes import clat
from larkns.modes.base import Failures, Requirement, all_classes, classes_of
from larkns.modes.link import LinkedDriver
from larkns.plan import HOST_LINK_PREFIX, Address, LinkedNetwork, eui64
from larkns.policy import Destinations, Policy
from larkns.traffic import Count, Traffic


@dataclass(frozen=True, kw_only=True)
class RoutingNetwork(LinkedNetwork):
    """A job whose traffic the worker routes."""

    ipv4_host: ipaddress.IPv4Interface | None = None
    ipv4_job: ipaddress.IPv4Interface | None = None
    # The job's /64, from larkns's RAs (None: no IPv6).
    ipv6_prefix: ipaddress.IPv6Network | None = None
    # IPv6-only worker: the job's IPv4 is a CLAT's (192.0.0.1), translated
    # to IPv6 toward this NAT64 prefix; the job's link has no IPv4.
    nat64_prefix: ipaddress.IPv6Network | None = None
    # What translates for that CLAT: "bpf" (the kernel) or "tayga" (a
    # process); None for a plan of a larkns that had only tayga.
    clat_translator: str | None = None
    # Its destination policy (larkns/policy.py), as text, and the
    # fingerprint its chain is named after; None: open.
    policy: str | None = None
    policy_id: str | None = None

    @property
    def destination_policy(self) -> str:
        return self.policy or "open"

    @property
    def clat(self) -> bool:
        return self.nat64_prefix is not None

    @property
    def translator(self) -> str | None:
        """The CLAT's translator; None: no CLAT."""
        if not self.clat:
            return None
        return self.clat_translator or "tayga"

    @property
    def ipv6_job(self) -> ipaddress.IPv6Address | None:
        """The address the job will form by SLAAC from larkns's RA."""
        return None if self.ipv6_prefix is None else eui64(self.ipv6_prefix, self.job_mac)

    @property
    def ipv6_clat(self) -> ipaddress.IPv6Address | None:
        """The IPv6 address the job's IPv4 traffic leaves from (in its /64)."""
        if self.ipv6_prefix is None or not self.clat:
            return None
        return clat.address(self.ipv6_prefix)

    @property
    def planned_ipv4(self) -> ipaddress.IPv4Address | None:
        if self.clat:
            return clat.JOB4.ip
        return None if self.ipv4_job is None else self.ipv4_job.ip

    @property
    def planned_ipv6(self) -> ipaddress.IPv6Address | None:
        return self.ipv6_job

    @property
    def waits_for_slaac(self) -> bool:
        return self.ipv6_prefix is not None

    def sources(self) -> list[Address]:
        """The addresses the job may send from: its IPv4, its link-local,
        its SLAAC address, its CLAT's."""
        out: list[Address] = [self.job_link_local]
        if self.ipv4_job is not None:
            out.insert(0, self.ipv4_job.ip)
        out += [a for a in (self.ipv6_job, self.ipv6_clat) if a is not None]
        return out

    def describe(self) -> str:
        lines = [super().describe()]
        if self.ipv4_job:
            lines.append(
                f"  ipv4 {self.ipv4_job} via {self.ipv4_host.ip if self.ipv4_host else '-'}"
            )
        if self.ipv6_prefix:
            lines.append(
                f"  ipv6 {self.ipv6_job} (SLAAC in {self.ipv6_prefix}) via {self.host_link_local}"
            )
        if self.clat:
            lines.append(
                f"  ipv4 {clat.JOB4.ip} by CLAT ({self.translator}), as {self.ipv6_clat} "
                f"toward {self.nat64_prefix}"
            )
        if self.policy:
            lines.append(f"  destination policy {self.policy}")
        return "\n".join(lines)


R = TypeVar("R", bound=RoutingNetwork)


class RoutingDriver(LinkedDriver[R]):
    table = Ruleset
    advertises = True
    # Whether the host masquerades the job's traffic.
    masquerade = False

    def rules(self) -> Ruleset:
        return self.engine.table(Ruleset)

    def inbound(self, plan: R) -> Inbound | None:
        """The worker's ports forwarded to the job."""
        return None

    def clat(self) -> clat.Clat:
        return self.engine.shared(clat.Clat)

    def prepare(self, plan: R) -> None:
        if plan.translator is not None:
            clat.Clat.prepare(plan.translator)

    def build(self, plan: R, job: Rtnl, record: Record) -> None:
        """The job's veth, addresses and routes, counters, RAs."""
        engine = self.engine
        if not engine.forwarding:
            sysctl.enable_forwarding()
            engine.forwarding = True
        self.rules().add_job(
            plan.name,
            plan.host_link,
            masquerade=self.masquerade,
            inbound=self.inbound(plan),
            sources=plan.sources(),
            policy=plan.policy_id,
        )
        idx = self.create_veth(plan)
        addrs.host_side(
            engine.rtnl,
            idx,
            plan.host_link,
            plan.ipv4_host,
            plan.host_link_local,
            plan.ipv6_prefix,
            plan.ipv4_job,
            # Both ends' MACs are chosen in advance, so neither end needs
            # the kernel's neighbour tables, which are full at a few hundred
            # jobs (rtnl.neighbour).
            [(a, parse_mac(plan.job_mac)) for a in plan.sources()],
        )
        gateway = plan.ipv4_host.ip if plan.ipv4_host else None
        host_mac = parse_mac(plan.host_mac)
        pinned = [(a, host_mac) for a in (gateway, plan.host_link_local) if a is not None]
        addrs.job_side(job, plan.job_index, plan.ipv4_job, gateway, pinned)
        if engine.advertiser is not None and plan.ipv6_prefix is not None:
            self._advertise(plan, idx)
        self.publish(plan)
        if plan.clat:
            assert plan.nat64_prefix is not None and plan.ipv6_clat is not None
            if plan.translator == "bpf":
                self.clat().start_bpf(
                    plan.name,
                    plan.nat64_prefix,
                    plan.ipv6_clat,
                    plan.job_mac,
                    plan.host_mac,
                    job,
                    plan.job_index,
                    idx,
                )
            else:
                self.clat().start(
                    plan.name, plan.netns, plan.nat64_prefix, plan.ipv6_clat, plan.job_mac, job, idx
                )

    # -- planning: the type's pools, its plan for a slot --------------------

    def refuse(self, name: str, prefix: ipaddress.IPv6Network, clat: bool) -> None:
        """Refuse, before a slot is taken, a job the settings cannot address."""

    def slot_count(self, prefix: ipaddress.IPv6Network) -> int:
        raise NotImplementedError

    def pools(self, prefix: ipaddress.IPv6Network) -> str:
        """The settings that bound slot_count (for the error when all are taken)."""
        raise NotImplementedError

    def plan_slot(self, name: str, slot: int, prefix: ipaddress.IPv6Network) -> R:
        raise NotImplementedError

    # -- destination policies ------------------------------------------------

    def _policy_id(self, policy: Policy) -> str | None:
        if policy.unrestricted:
            return None
        return policy_fingerprint(policy, self._sets(), self.settings.internal_classes)

    def _sets(self) -> dict[str, Destinations]:
        return {d.name: d for d in self.settings.destinations}

    def requirements(self, policy: Policy) -> list[Requirement]:
        rules = self.rules()
        out = super().requirements(policy)
        fingerprint = self._policy_id(policy)
        if fingerprint is not None:
            # The internal classes' sets: a class has a set for each IP
            # version it has prefixes of.
            internal = [
                (name, sorted({n.version for n in nets}))
                for name, nets in self.settings.classes
                if name in self.settings.internal_classes
            ]
            out.append(
                Requirement(
                    lambda: rules.has_policy(fingerprint),
                    lambda: rules.add_policy(fingerprint, policy, self._sets(), internal),
                )
            )
        return out

    def counts_refused(self, plan: R) -> bool:
        return plan.policy_id is not None

    def plan(self, name: str, policy: Policy) -> R:
        settings = self.settings
        prefix = settings.ipv6_prefix or host_ula_prefix(settings.lib_dir)
        clat = self.clat().needed()
        self.refuse(name, prefix, clat)
        # Chosen (and refused, if forced and unusable) before a slot is taken.
        translator = self.clat().translator() if clat else None
        slot = self.engine.lease_slot(name, self.slot_count(prefix), self.pools(prefix))
        p = self.plan_slot(name, slot, prefix)
        if clat:
            # No IPv4 on the job's link: its IPv4 is the CLAT's, in the job.
            p = dataclasses.replace(
                p,
                ipv4_host=None,
                ipv4_job=None,
                nat64_prefix=settings.nat64_prefix,
                clat_translator=translator,
            )
        fingerprint = self._policy_id(policy)
        if fingerprint is not None:
            p = dataclasses.replace(p, policy=policy.text(), policy_id=fingerprint)
        return p

    def stats(self, plan: R) -> Traffic:
        counts = super().stats(plan)
        if plan.translator != "bpf":
            return counts
        # What the kernel-side CLAT dropped, from the job's namespace (gone
        # if the job is being torn down: then what the nft counters say).
        try:
            with self.engine.job_socket(plan) as job:
                lost = clat.Clat.untranslated(job, plan.job_index)
        except OSError:
            return counts
        return dataclasses.replace(counts, untranslated=Count(packets=lost))

    def publish(self, plan: R, add: bool = True) -> None:
        """Make the job's addresses known to the site (or no longer)."""

    def adopt(self, plan: R, record: Record) -> None:
        if self.engine.advertiser is None or plan.ipv6_prefix is None:
            return
        idx = self.engine.rtnl.link_index(plan.host_link)
        if idx is not None:
            self._advertise(plan, idx)

    def _advertise(self, plan: R, idx: int) -> None:
        advertiser = self.engine.advertiser
        assert advertiser is not None and plan.ipv6_prefix is not None
        advertiser.add(idx, plan.ipv6_prefix, plan.host_link_local, parse_mac(plan.host_mac))
        self.engine.advertised[plan.name] = idx

    def wait_ready(self, plan: R, timeout: float, cancel: Callable[[], bool]) -> float | None:
        """Wait for the job's SLAAC address."""
        if plan.ipv6_prefix is None:
            return 0.0
        engine = self.engine
        with engine.job_socket(plan) as job:
            waited = addrs.wait_slaac(job, plan.job_index, plan.ipv6_prefix, timeout, cancel)
            got = addrs.ipv6_global(job, plan.job_index)
        # An address other than the one foreseen (a host whose new namespaces
        # inherit stable-privacy addressing): the guard lets it through, and
        # the journal keeps it for teardown.
        foreseen = plan.sources()
        extra = [a for a in got if a not in foreseen and a in plan.ipv6_prefix]
        if extra:
            with engine.lock:
                self.rules().allow(plan.host_link, extra)
                record = engine.journal.read(plan.name)
                if record is not None:
                    record.sources = tuple(extra)
                    engine.journal.write(record)
        return waited

    def addresses(self, plan: R) -> tuple[str | None, list[str]]:
        with self.engine.job_socket(plan) as job:
            v6 = [str(a) for a in addrs.ipv6_global(job, plan.job_index)]
        ipv4 = plan.planned_ipv4
        return (None if ipv4 is None else str(ipv4), v6)

    def release(self, name: str, plan: R | None, record: Record | None, failures: Failures) -> None:
        engine = self.engine
        idx = engine.advertised.pop(name, None)
        if idx is not None and engine.advertiser is not None:
            engine.advertiser.remove(idx)
        if plan is None:
            return
        with failures.step(f"addresses of {plan.host_link}"):
            host_idx = engine.rtnl.link_index(plan.host_link)
            if host_idx is not None:
                addrs.release(
                    engine.rtnl, host_idx, plan.ipv4_host, plan.ipv6_prefix, plan.ipv4_job
                )
        with failures.step(f"proxy entries of {name}"):
            self.publish(plan, add=False)

    def remove(self, name: str, plan: R | None, record: Record | None, failures: Failures) -> None:
        self.clat().reap(name, failures)
        with failures.step(f"nft counters and guard of {name}"):
            rules = self.rules()
            taken: list[Address] = list(record.sources) if record is not None else []
            if plan is None:
                # Killed before its plan was written: nothing of it in the
                # table is known but its name (and so its link's).
                rules.remove_job(
                    name,
                    HOST_LINK_PREFIX + name,
                    all_classes(rules, self.settings),
                    masquerade=True,
                    policy=True,
                )
                return
            rules.remove_job(
                name,
                plan.host_link,
                classes_of(plan, rules, self.settings),
                masquerade=self.masquerade,
                inbound=self.inbound(plan),
                sources=[*plan.sources(), *taken],
                policy=plan.policy_id is not None,
            )

    def restore(self, plan: R, record: Record, start: dict[str, Count]) -> None:
        self.rules().add_job(
            plan.name,
            plan.host_link,
            masquerade=self.masquerade,
            inbound=self.inbound(plan),
            sources=[*plan.sources(), *record.sources],
            policy=plan.policy_id,
            start=start,
            classes=self.restore_classes(plan),
        )

    def sweep(self, live: set[str], left: list[str]) -> list[str]:
        removed: list[str] = []
        try:
            rules = self.rules()
            table = rules.job_objects()
        except Exception:
            return removed
        # An orphan has no record to say which classes it has: every class
        # in the table, whichever configuration added it.  Map entries
        # first: they hold references to the counters (EBUSY).
        for link in sorted(table.links):
            job = link[len(HOST_LINK_PREFIX) :]
            if job not in live:
                try:
                    rules.remove_job(
                        job, link, table.classes, sources=table.sources.get(link, []), policy=True
                    )
                    removed.append(f"nft map entries of {link}")
                except NftError as e:
                    left.append(f"nft map entries of {link}: {e}")
        for job in sorted(table.jobs - live):
            try:
                rules.remove_job(job, None, table.classes, policy=True)
                removed.append(f"nft counters of {job}")
            except NftError as e:
                left.append(f"nft counters of {job}: {e}")
        return removed
