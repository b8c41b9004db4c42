"""The verbs: setup, check, teardown, gc, stats.

Each verb is idempotent (CNI style): teardown of a job that is half built, or
already gone, succeeds and removes exactly what is left.  The journal record
of a job is written before any of its objects exists and removed after the
last one is gone, so gc can always find what a killed process left behind.

All kernel work happens in the network namespace of the calling thread: the
worker node's (in tests, a namespace that plays it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import grp
import ipaddress
import os
import pwd
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from larkns import core, leases
from larkns.config import ConfigError, Settings, check_name, host_ula_prefix
from larkns.journal import Journal, NameInUse, Process, Record, pid_alive
from larkns.kernel import addrs, links, netns, rtnl, sysctl
from larkns.kernel.bridge import BridgeRuleset
from larkns.kernel.iproute import PinnedIPRoute
from larkns.kernel.nft import Inbound, NftError, Ruleset, TableJobs
from larkns.kernel.rtnl import Rtnl, RtnlError
from larkns.plan import (
    CLAT_JOB4,
    CLAT_SELF4,
    HOST_LINK_PREFIX,
    LINKED_MODES,
    ROUTED_MODES,
    BridgeFacts,
    JobNetwork,
    bridge_slot_count,
    bridged,
    build,
    eui64,
    nat_slot_count,
    random_mac,
    routed_slot_count,
)
from larkns.traffic import Traffic

if TYPE_CHECKING:
    from larkns.kernel import dhcp
    from larkns.kernel.ra import Advertiser


class SetupError(ConfigError):
    """A job's network could not be built; nothing of it is left.  Its
    message is a one-line reason, shown (and refused) as a ConfigError's."""


class Engine:
    def __init__(
        self,
        settings: Settings,
        advertiser: Advertiser | None = None,
        clean_when_idle: bool = True,
    ) -> None:
        self.settings = settings
        self.journal = Journal(settings.state_dir)
        self.advertiser = advertiser
        # `larkns run` leaves nothing behind, not even the empty table or the
        # state dir; a daemon that serves jobs all day keeps them.
        self.clean_when_idle = clean_when_idle
        self._rtnl: Rtnl | None = None
        self._ipr: PinnedIPRoute | None = None
        self._ruleset: Ruleset | None = None
        self._bridge_rules: BridgeRuleset | None = None
        self._forwarding = False
        self._advertised: dict[str, int] = {}
        self._proxying: set[str] = set()  # uplinks with proxy_ndp on
        self._dhcp: dict[str, dhcp.Renewer] = {}  # bridge-mode jobs' leases kept here
        self._tayga: dict[str, int] = {}  # CLATs this process started: pidfds
        self._bridge_extra6: dict[str, list[ipaddress.IPv6Address]] = {}
        # For the engine's shared netlink and nft handles when more than one
        # thread works with it (larknsd takes it around every verb; the DHCP
        # renewers and wait_ready's late guard updates take it themselves).
        self.lock = threading.RLock()
        self._v4_uplink: tuple[float, bool] | None = None

    # -- resources ---------------------------------------------------------

    @property
    def rtnl(self) -> Rtnl:
        """Netlink for the hot path (setup, teardown)."""
        if self._rtnl is None:
            self._rtnl = Rtnl()
        return self._rtnl

    @property
    def ipr(self) -> PinnedIPRoute:
        """pyroute2, for dumps and deletions by name (check, gc)."""
        if self._ipr is None:
            self._ipr = PinnedIPRoute()
        return self._ipr

    @property
    def bridge_rules(self) -> BridgeRuleset:
        """The `bridge larkns` table (bridge mode)."""
        if self._bridge_rules is None:
            self._bridge_rules = BridgeRuleset(self.settings.classes)
        return self._bridge_rules

    @property
    def ruleset(self) -> Ruleset:
        if self._ruleset is None:
            self._ruleset = Ruleset(self.settings.classes)
        return self._ruleset

    def close(self) -> None:
        # Jobs that outlive this process keep their leases: the next larkns
        # process (a restarted larknsd) renews them (adopt), or gc releases.
        for renewer in self._dhcp.values():
            renewer.stop(release=False)
        self._dhcp.clear()
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._ruleset is not None:
            self._ruleset.close()
            self._ruleset = None
        if self._bridge_rules is not None:
            self._bridge_rules.close()
            self._bridge_rules = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup -------------------------------------------------------------

    def setup(
        self, name: str, mode: str, owner: Process, client: Process | None = None
    ) -> JobNetwork:
        """Build job `name`'s network; on any failure remove what was built and raise."""
        check_name(name)
        if mode in LINKED_MODES:
            _ = self.ruleset  # no nftables: refuse before anything is built
        claimed = False
        try:
            # Shared: the last job out cannot remove the state dir or the
            # table while this job is being set up.
            with self._setup_lock(mode):
                # Checked before the lease too, so that a name in use is
                # reported as such even when the pool is full; claim() below
                # is what guarantees it.
                in_use = SetupError(f"job name {name!r} is in use (see `larkns list`)")
                if self.journal.path(name).exists():
                    raise in_use
                plan = self._plan(name, mode)
                record = Record(name=name, owner=owner, state="building", plan=plan, client=client)
                try:
                    self.journal.claim(record)
                except NameInUse:
                    if plan.slot is not None:
                        leases.release(self.journal, plan.slot, name)
                    raise in_use from None
                claimed = True
                self._build(plan)
                record.state = "ready"
                renewer = self._dhcp.get(name)
                if renewer is not None and renewer.lease is not None:
                    record.extra["dhcp"] = renewer.lease.to_dict()
                self.journal.write(record)
                return plan
        except (OSError, RtnlError, NftError, core.SpawnError) as e:
            # What the kernel refused: a one-line reason, not a traceback.
            if claimed:
                self.teardown(name)
            raise SetupError(f"job {name}: cannot build its network: {e}") from e
        except BaseException:
            if claimed:
                self.teardown(name)  # outside the lock: teardown may take it exclusively
            raise

    @contextlib.contextmanager
    def _setup_lock(self, mode: str) -> Iterator[None]:
        """The journal's shared lock, held once the table counts this
        process's traffic classes as configured.

        Under the shared lock no other larkns process can change the table's
        classes or remove the table (both take the lock exclusively), so what
        serves_classes() finds holds until the job's counters are in.  When
        the classes differ (LARKNS_CLASSES changed while jobs were alive, or
        the table is not there yet), the table is brought in line under the
        exclusive lock: the journal's lock rather than a failing nft `create`
        alone, because a process must see the table as it is while it decides
        what to add, and only the lock keeps another from changing it in
        between.  flock cannot turn a shared lock into an exclusive one
        without letting go of it, hence the loop: look again once back under
        the shared lock.
        """
        rules: Ruleset | BridgeRuleset | None = None
        if mode in ROUTED_MODES:
            rules = self.ruleset
        elif mode == "bridge":
            rules = self.bridge_rules
        for _ in range(3):
            with self.journal.lock(exclusive=False):
                if rules is None or rules.serves_classes():
                    yield
                    return
            with self.journal.lock(exclusive=True):
                rules.update_classes()
        raise SetupError(
            f"the nft table inet larkns does not keep LARKNS_CLASSES "
            f"({', '.join(n for n, _ in self.settings.classes)}): something else changes it"
        )

    def _plan(self, name: str, mode: str) -> JobNetwork:
        if mode == "none":
            return build(self.settings, name, mode, None, None)
        if mode not in LINKED_MODES:
            raise ConfigError(
                f"--mode: unknown network type {mode!r} (expected nat, routed, bridge or none)"
            )
        prefix = self.settings.ipv6_prefix or host_ula_prefix(self.settings.lib_dir)
        if mode == "bridge":
            return self._plan_bridge(name, prefix)
        clat = self._needs_clat()
        if mode == "routed":
            # Refused before a slot is taken: routed needs its prefixes.
            probe = build(self.settings, name, mode, 0, prefix)
            if clat and probe.ipv6_prefix is None:
                raise ConfigError(
                    "--mode routed on a worker without IPv4 needs LARKNS_ROUTED_IPV6_PREFIX "
                    "(the CLAT translates jobs' IPv4 to IPv6)"
                )
        count = (routed_slot_count if mode == "routed" else nat_slot_count)(self.settings, prefix)
        try:
            slot = leases.lease(self.journal, name, count)
        except leases.PoolExhausted as e:
            raise SetupError(
                f"address pool exhausted: {e} (LARKNS_IPV4_POOL={self.settings.ipv4_pool}, "
                f"LARKNS_IPV6_PREFIX={prefix})"
            ) from None
        plan = build(self.settings, name, mode, slot, prefix)
        if clat:
            # No IPv4 on the job's link: its IPv4 is the CLAT's, in the job.
            plan = dataclasses.replace(
                plan, ipv4_host=None, ipv4_job=None, nat64_prefix=self.settings.nat64_prefix
            )
        return plan

    def _needs_clat(self) -> bool:
        """Whether jobs get IPv4 through a CLAT: LARKNS_CLAT on, or auto on a
        worker without an IPv4 default route (looked at every few seconds)."""
        if self.settings.clat != "auto":
            return self.settings.clat == "on"
        now = time.monotonic()
        if self._v4_uplink is None or now - self._v4_uplink[0] > 5:
            has = bool(self.ipr.get_default_routes(family=socket.AF_INET))
            self._v4_uplink = (now, has)
        return not self._v4_uplink[1]

    def _bridge_facts(self) -> BridgeFacts:
        """The site network as the worker's bridge sees it."""
        name = self.settings.bridge
        if name is None:
            raise ConfigError("--mode bridge: set LARKNS_BRIDGE (the site network's bridge)")
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise ConfigError(f"LARKNS_BRIDGE: no link {name!r} on this worker")
        (idx,) = found
        if links.kind(self.ipr, idx) != "bridge":
            raise ConfigError(f"LARKNS_BRIDGE: {name} is not a bridge")
        subnet = None
        for a in self.ipr.get_addr(index=idx, family=socket.AF_INET):
            subnet = ipaddress.IPv4Interface(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            ).network
            break
        gateway = None
        for r in self.ipr.get_default_routes(family=socket.AF_INET):
            if r.get_attr("RTA_OIF") == idx and r.get_attr("RTA_GATEWAY"):
                gateway = ipaddress.IPv4Address(r.get_attr("RTA_GATEWAY"))
        prefixes = []
        for a in self.ipr.get_addr(index=idx, family=socket.AF_INET6):
            if a["scope"] == 0 and a["prefixlen"] == 64:
                net = ipaddress.IPv6Interface(f"{a.get_attr('IFA_ADDRESS')}/64").network
                if net not in prefixes:
                    prefixes.append(net)
        return BridgeFacts(subnet, gateway, tuple(prefixes))

    def _plan_bridge(self, name: str, prefix: ipaddress.IPv6Network) -> JobNetwork:
        facts = self._bridge_facts()
        # A configuration that cannot work is refused before a slot is taken.
        bridged(self.settings, name, 0, facts, random_mac())
        try:
            slot = leases.lease(self.journal, name, bridge_slot_count(self.settings, prefix))
        except leases.PoolExhausted as e:
            raise SetupError(
                f"address pool exhausted: {e} "
                f"(LARKNS_BRIDGE_IPV4_POOL={self.settings.bridge_ipv4_pool})"
            ) from None
        return bridged(self.settings, name, slot, facts, random_mac())

    def _build(self, plan: JobNetwork) -> None:
        try:
            netns.create(plan.netns)
        except FileExistsError:
            # Our name is claimed, so a namespace by that name has no live
            # owner: it is what a killed job left. Remove it and go on.
            self._remove_netns(plan.netns)
            netns.create(plan.netns)
        with netns.entered(plan.netns):
            # Set before the job's link exists, which then inherits "default":
            # DAD would hold every address tentative for a second or more.
            # ("all" is 0 in a new namespace; DAD runs only if both are 1.)
            sysctl.write("ipv6/conf/default/accept_dad", 0)
            if plan.clat:
                # The job's namespace forwards between its CLAT and its link;
                # a forwarding link takes RAs only with accept_ra=2.
                sysctl.write("ipv6/conf/default/accept_ra", 2)
                sysctl.write("ipv6/conf/all/forwarding", 1)
            job = Rtnl()
        with job:
            if plan.mode == "bridge":
                self._build_bridge(plan, job)
            elif plan.linked:
                self._build_linked(plan, job)
            else:
                job.run(rtnl.link_up(1, "lo"))

    def _build_linked(self, plan: JobNetwork, job: Rtnl) -> None:
        """The job's veth, addresses and routes, counters, RAs (nat, routed)."""
        assert plan.host_link and plan.job_link and plan.host_mac and plan.job_mac
        assert plan.host_index and plan.job_index and plan.host_link_local
        if not self._forwarding:
            sysctl.enable_forwarding()
            self._forwarding = True
        self.ruleset.add_job(
            plan.name,
            plan.host_link,
            masquerade=plan.mode == "nat",
            inbound=_inbound(plan),
            sources=_sources(plan),
        )
        idx = self._create_veth(plan)
        addrs.host_side(
            self.rtnl,
            idx,
            plan.host_link,
            plan.ipv4_host,
            plan.host_link_local,
            plan.ipv6_prefix,
            plan.ipv4_job,
        )
        gateway = plan.ipv4_host.ip if plan.ipv4_host else None
        addrs.job_side(job, plan.job_index, plan.ipv4_job, gateway)
        if self.advertiser is not None and plan.ipv6_prefix is not None:
            self._advertise(plan, idx)
        if plan.mode == "routed" and self.settings.proxy_nd:
            self._proxy(plan, add=True)
        if plan.clat:
            self._start_clat(plan, job, idx)

    def _start_clat(self, plan: JobNetwork, job: Rtnl, host_idx: int) -> None:
        """A CLAT in the job's namespace (tayga): the job's IPv4 (192.0.0.1)
        goes out as IPv6 from the job's CLAT address toward the site's NAT64
        prefix, and back.  The host routes the CLAT address to the job."""
        assert plan.ipv6_clat and plan.nat64_prefix and plan.job_mac and plan.job_index
        import shutil

        tayga = shutil.which("tayga", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if tayga is None:
            raise SetupError(
                "this worker has no IPv4: jobs need a CLAT, and tayga is not installed"
            )
        job_ll = plan_eui64_ll(plan.job_mac)
        self.rtnl.run(rtnl.route(ipaddress.IPv6Network(plan.ipv6_clat), host_idx, job_ll))
        conf = self.journal.clat_config(plan.name)
        # tayga parses every packet the job sends: once its tun device is
        # open it runs as a user of its own, without capabilities, chrooted
        # to an empty directory it cannot write (its data-dir).
        root = self.journal.clat_root(plan.name)
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o555)
        user, group = clat_user()
        conf.write_text(
            f"tun-device {CLAT_TUN}\n"
            f"ipv4-addr {CLAT_SELF4}\n"
            f"prefix {plan.nat64_prefix}\n"
            f"map {CLAT_JOB4.ip} {plan.ipv6_clat}\n"
            f"data-dir {root}\n"
        )
        ns_fd = os.open(netns.path(plan.netns), os.O_RDONLY | os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            spec = core.SpawnSpec(
                path=tayga,
                argv=[
                    *("tayga", "--nodetach", "-c", str(conf)),
                    *("--user", user, "--group", group, "--chroot"),
                ],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                ns_fds=[ns_fd],
                groups=(),
                stdio=(null, null, null),
                new_session=True,
                caps=CLAT_CAPS,
            )
            _pid, pidfd = core.spawn(spec)
        finally:
            os.close(ns_fd)
            os.close(null)
        self._tayga[plan.name] = pidfd
        deadline = time.monotonic() + 3
        # poll, not select: select cannot watch an fd above 1023, and larknsd
        # may have thousands open.
        ended = select.poll()
        ended.register(pidfd, select.POLLIN)
        while (tun := job.link_index(CLAT_TUN)) is None:
            if time.monotonic() > deadline or ended.poll(2):
                raise SetupError("the job's CLAT (tayga) did not start")
        job.run(
            rtnl.link_up(tun, "CLAT"),
            rtnl.address(tun, CLAT_JOB4),
            rtnl.route(ipaddress.IPv4Network("0.0.0.0/0"), tun),
            rtnl.route(ipaddress.IPv6Network(plan.ipv6_clat), tun),
        )

    def _create_veth(self, plan: JobNetwork) -> int:
        """The job's veth pair; the host end's index."""
        assert plan.host_link and plan.job_link and plan.host_mac and plan.job_mac
        assert plan.host_index and plan.job_index
        args = (
            plan.host_link,
            plan.host_index,
            plan.host_mac,
            plan.job_link,
            plan.job_index,
            plan.job_mac,
            netns.path(plan.netns),
        )
        try:
            return links.create_veth(self.rtnl, *args)
        except RtnlError as e:
            if e.errno != errno.EEXIST:
                raise
            if not links.is_veth(self.ipr, plan.host_link):
                raise SetupError(
                    f"link {plan.host_link} exists and is not larkns's; rename it or the job"
                ) from None
            # A previous job of this name whose namespace the kernel is still
            # dismantling (that is asynchronous): remove its link now.
            links.delete(self.ipr, plan.host_link)
            return links.create_veth(self.rtnl, *args)

    def _build_bridge(self, plan: JobNetwork, job: Rtnl) -> None:
        """The job's veth, a port of the site's bridge, guarded before it is up."""
        assert plan.host_link and plan.job_link and plan.host_mac and plan.job_mac
        assert plan.host_index and plan.job_index and plan.bridge
        master = self.rtnl.link_index(plan.bridge)
        if master is None:
            raise SetupError(f"LARKNS_BRIDGE: no link {plan.bridge!r} on this worker")
        ipv4 = plan.ipv4_job.ip if plan.ipv4_job else None
        self.bridge_rules.add_job(
            plan.name, plan.host_link, plan.job_mac, ipv4, plan.allowed_ipv6()
        )
        idx = self._create_veth(plan)
        # A port has no addresses of its own; it joins the bridge, then comes up.
        self.rtnl.run(
            rtnl.no_link_local(idx, plan.host_link),
            rtnl.link_master(idx, master, plan.host_link),
            rtnl.bpdu_guard(idx, plan.host_link),
            rtnl.link_up(idx, plan.host_link),
        )
        addrs.job_side(job, plan.job_index, plan.ipv4_job, plan.gateway4)
        if plan.dhcp:
            self._dhcp_start(plan, job)

    def _dhcp_start(self, plan: JobNetwork, job: Rtnl, lease: dhcp.Lease | None = None) -> None:
        """Lease the job's IPv4 address from the site's DHCP server (or take
        up `lease`, after a restart), apply it, let the guard allow it, and
        keep it for as long as the job runs."""
        assert plan.job_mac and plan.job_link and plan.job_index
        from larkns.kernel import dhcp  # bridge mode only

        client = dhcp.Client(plan.netns, plan.job_link, plan.job_mac)
        try:
            if lease is None:
                try:
                    lease = client.obtain(self.settings.dhcp_timeout)
                except dhcp.DhcpError as e:
                    raise SetupError(f"DHCP on {plan.bridge}: {e}") from None
                self._dhcp_apply(plan, job, None, lease)
        except BaseException:
            client.close()
            raise
        self._dhcp[plan.name] = dhcp.Renewer(
            client, lease, lambda old, new: self._dhcp_changed(plan, old, new)
        )

    def _dhcp_apply(
        self, plan: JobNetwork, job: Rtnl, old: dhcp.Lease | None, new: dhcp.Lease | None
    ) -> None:
        """The job's link goes from lease `old` to lease `new` (None: none)."""
        assert plan.job_index and plan.job_mac
        if old is not None and (new is None or old.address != new.address):
            job.run(
                rtnl.address(plan.job_index, old.address, delete=True), ignore=rtnl.ignore_missing()
            )
        if new is not None and (old is None or old.address != new.address):
            requests = [rtnl.address(plan.job_index, new.address)]
            if new.router is not None:
                requests.append(
                    rtnl.route(ipaddress.IPv4Network("0.0.0.0/0"), plan.job_index, new.router)
                )
            job.run(*requests)
        # The guard lets the job send from the leased address, and no other.
        self._bridge_guard(plan, None if new is None else new.address.ip)

    def _bridge_guard(self, plan: JobNetwork, ipv4: ipaddress.IPv4Address | None) -> None:
        """What a bridge-mode job may send from, all of it: its MAC, `ipv4`,
        its foreseen IPv6 addresses and the ones it took besides."""
        assert plan.job_mac
        v6 = plan.allowed_ipv6() + self._bridge_extra6.get(plan.name, [])
        self.bridge_rules.allow(plan.name, plan.job_mac, ipv4, v6)

    def _bridge_ipv4(self, plan: JobNetwork) -> ipaddress.IPv4Address | None:
        renewer = self._dhcp.get(plan.name)
        if renewer is not None:
            return None if renewer.lease is None else renewer.lease.address.ip
        return plan.ipv4_job.ip if plan.ipv4_job else None

    def _dhcp_changed(
        self, plan: JobNetwork, old: dhcp.Lease | None, new: dhcp.Lease | None
    ) -> bool:
        """From the renewer's thread: a renewed, changed, lost or new lease;
        whether it is applied (the renewer tries again if not)."""
        # Shared netlink and nft handles: under the engine's lock.
        if not self.lock.acquire(timeout=2):
            return False
        try:
            if (old is None) != (new is None) or (
                old is not None and new is not None and old.address != new.address
            ):
                try:
                    with self._job_socket(plan) as job:
                        self._dhcp_apply(plan, job, old, new)
                except Exception as e:
                    print(f"larkns: job {plan.name}: DHCP change not applied: {e}", file=sys.stderr)
                    return False
            record = self.journal.read(plan.name)
            if record is not None:
                record.extra["dhcp"] = None if new is None else new.to_dict()
                with contextlib.suppress(OSError):
                    self.journal.write(record)
            return True
        finally:
            self.lock.release()

    def adopt(self, plan: JobNetwork) -> None:
        """Serve a running job's network again after a restart: what lives in
        the process (router advertisements) rather than in the kernel."""
        if plan.mode == "bridge":
            record = self.journal.read(plan.name)
            taken = record.extra.get("sources", []) if record is not None else []
            if taken:
                self._bridge_extra6[plan.name] = [ipaddress.IPv6Address(a) for a in taken]
        if plan.dhcp and plan.name not in self._dhcp:
            # Keep renewing the lease the last larkns process got.
            record = self.journal.read(plan.name)
            saved = record.extra.get("dhcp") if record is not None else None
            if saved:
                from larkns.kernel import dhcp  # bridge mode only

                with self._job_socket(plan) as job:
                    self._dhcp_start(plan, job, dhcp.Lease.from_dict(saved))
        if not plan.linked or self.advertiser is None or plan.host_link is None:
            return
        if plan.ipv6_prefix is None:
            return
        idx = self.rtnl.link_index(plan.host_link)
        if idx is not None:
            self._advertise(plan, idx)

    def _advertise(self, plan: JobNetwork, idx: int) -> None:
        assert self.advertiser and plan.ipv6_prefix and plan.host_link_local and plan.host_mac
        mac = bytes(int(x, 16) for x in plan.host_mac.split(":"))
        self.advertiser.add(idx, plan.ipv6_prefix, plan.host_link_local, mac)
        self._advertised[plan.name] = idx

    def _proxy(self, plan: JobNetwork, add: bool) -> None:
        """Answer neighbour discovery and ARP for a routed job's addresses on
        the uplink (LARKNS_PROXY_ND), where the site takes them for on-link
        instead of routing them to this worker."""
        uplink = self.settings.proxy_nd
        assert uplink is not None
        idx = self.rtnl.link_index(uplink)
        if idx is None:
            if add:
                raise SetupError(f"LARKNS_PROXY_ND: no link {uplink!r} on this worker")
            return
        if add and uplink not in self._proxying:
            sysctl.write(f"ipv6/conf/{uplink}/proxy_ndp", 1)
            self._proxying.add(uplink)
        targets: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for a6 in (plan.ipv6_job, plan.ipv6_clat):
            if a6 is not None:
                targets.append(a6)
        if plan.ipv4_job is not None:
            targets.append(plan.ipv4_job.ip)
        self.rtnl.run(
            *(rtnl.proxy_neighbour(idx, a, delete=not add) for a in targets),
            ignore=() if add else rtnl.ignore_missing(),
        )

    @staticmethod
    def _job_socket(plan: JobNetwork) -> Rtnl:
        # Opened on demand, not kept per job: a process with hundreds of jobs
        # would otherwise hold hundreds of sockets for nothing.
        with netns.entered(plan.netns):
            return Rtnl()

    def wait_ready(
        self, plan: JobNetwork, timeout: float, cancel: Callable[[], bool] = lambda: False
    ) -> float | None:
        """Wait for the job's SLAAC address; seconds waited, or None on timeout
        (or when `cancel()` says so)."""
        if plan.mode == "bridge":
            return self._wait_bridge(plan, timeout, cancel)
        if not plan.linked or plan.ipv6_prefix is None or plan.job_index is None:
            return 0.0
        with self._job_socket(plan) as job:
            waited = addrs.wait_slaac(job, plan.job_index, plan.ipv6_prefix, timeout, cancel)
            got = addrs.ipv6_global(job, plan.job_index)
        # An address other than the one foreseen (a host whose new namespaces
        # inherit stable-privacy addressing): the guard lets it through, and
        # the journal keeps it for teardown.
        extra = [a for a in got if a not in _sources(plan) and a in plan.ipv6_prefix]
        if extra and plan.host_link:
            with self.lock:
                self.ruleset.allow(plan.host_link, extra)
                record = self.journal.read(plan.name)
                if record is not None:
                    record.extra["sources"] = [str(a) for a in extra]
                    self.journal.write(record)
        return waited

    def _wait_bridge(
        self, plan: JobNetwork, timeout: float, cancel: Callable[[], bool]
    ) -> float | None:
        """Wait for the job's SLAAC address from the site's router; then let
        the guard allow whatever addresses it took."""
        if not plan.site_prefixes or plan.job_index is None or plan.job_mac is None:
            return 0.0
        with self._job_socket(plan) as job:
            waited = addrs.wait_slaac(job, plan.job_index, plan.site_prefixes[0], timeout, cancel)
            got = addrs.ipv6_global(job, plan.job_index)
        allowed = plan.allowed_ipv6()
        extra = [a for a in got if a not in allowed]
        if extra:
            with self.lock:
                self._bridge_extra6[plan.name] = extra
                self._bridge_guard(plan, self._bridge_ipv4(plan))
                record = self.journal.read(plan.name)
                if record is not None:
                    record.extra["sources"] = [str(a) for a in extra]
                    self.journal.write(record)
        return waited

    def job_addresses(self, plan: JobNetwork) -> tuple[str | None, list[str]]:
        """(IPv4, [IPv6 global addresses]) the job has now."""
        if not plan.linked or plan.job_index is None:
            return (None, [])
        with self._job_socket(plan) as job:
            v6 = [str(a) for a in addrs.ipv6_global(job, plan.job_index)]
        if plan.mode == "bridge":
            ipv4 = self._bridge_ipv4(plan)
            return (None if ipv4 is None else str(ipv4), v6)
        if plan.clat:
            return (str(CLAT_JOB4.ip), v6)
        return (str(plan.ipv4_job.ip) if plan.ipv4_job else None, v6)

    # -- check / stats -----------------------------------------------------

    def check(self, name: str) -> list[str]:
        """What is missing or wrong in job `name`'s network (empty: all well)."""
        record = self.journal.read(name)
        if record is None:
            return [f"job {name}: no record"]
        if record.plan is None:
            return [f"job {name}: setup never finished planning (state {record.state})"]
        plan = record.plan
        problems = []
        if not netns.exists(plan.netns):
            problems.append(f"netns {plan.netns} is missing")
        if plan.mode == "bridge" and name not in self.bridge_rules.jobs():
            problems.append(f"bridge guard of {name} is missing")
        if plan.linked:
            assert plan.host_link
            idx = links.index(self.ipr, plan.host_link)
            if idx is None:
                problems.append(f"link {plan.host_link} is missing")
            else:
                if not links.is_up(self.ipr, idx):
                    problems.append(f"link {plan.host_link} is not up")
            # A bridged job's counters are in bridge larkns, the others' in inet larkns.
            rules = self.bridge_rules if plan.mode == "bridge" else self.ruleset
            if not rules.has_job(name, self._classes(plan)):
                problems.append(f"nft counters of {name} are missing")
        return problems

    def stats(self, name: str) -> Traffic:
        record = self.journal.read(name)
        if record is None or record.plan is None or not record.plan.linked:
            return Traffic()
        plan = record.plan
        # The classes the job was set up with: this process's may differ.
        # (For a record of an older larkns, this process's: stats are read
        # often, and should not list the table.)
        classes = plan.classes
        if classes is None:
            classes = tuple(n for n, _ in self.settings.classes)
        if plan.mode == "bridge":
            c = self.bridge_rules.counters(name, classes)
        else:
            c = self.ruleset.counters(name, classes)
        return Traffic(
            ipv4_in=c["in4"],
            ipv4_out=c["out4"],
            ipv6_in=c["in6"],
            ipv6_out=c["out6"],
            control_in=c["ctl-in"],
            control_out=c["ctl-out"],
            dropped=c["drop"],
            classes={n: (c[f"cin-{n}"], c[f"cout-{n}"]) for n in classes},
        )

    # -- teardown / gc -----------------------------------------------------

    def teardown(self, name: str) -> bool:
        """Remove everything of job `name`; False if there was no such job."""
        removed = self._teardown(name)
        self._clean_when_idle()
        return removed

    def _teardown(self, name: str) -> bool:
        record = self.journal.read(name)
        plan = record.plan if record is not None else None
        if plan is not None:
            slots = [] if plan.slot is None else [plan.slot]
        else:
            # No plan: a setup killed between its lease and its claim.  Only
            # leases whose leaser is gone (or is us) are that job's; another
            # may be about to claim the same name.
            slots = [
                s
                for s, lease in leases.leased(self.journal).items()
                if lease.name == name and (lease.pid == os.getpid() or not pid_alive(lease.pid))
            ]
        if record is None and not slots:
            return False
        # Names derive from the job name, so a record that never got its
        # plan (killed right after claiming) still tells what to remove.
        ns_name = plan.netns if plan else self.settings.netns_prefix + name
        host_link = plan.host_link if plan else HOST_LINK_PREFIX + name
        if plan is not None and plan.dhcp and record is not None:
            # The lease goes back to the site's server before the link goes.
            self._dhcp_release(plan, record)
        self._bridge_extra6.pop(name, None)
        idx = self._advertised.pop(name, None)
        if idx is not None and self.advertiser is not None:
            self.advertiser.remove(idx)
        if plan is not None and plan.host_routed and host_link:
            host_idx = self.rtnl.link_index(host_link)
            if host_idx is not None:
                addrs.release(self.rtnl, host_idx, plan.ipv4_host, plan.ipv6_prefix, plan.ipv4_job)
            if plan.mode == "routed" and self.settings.proxy_nd:
                self._proxy(plan, add=False)
        self._remove_netns(ns_name)
        tayga = self._tayga.pop(name, None)
        if tayga is not None:
            # Killed with everything else in the job's namespace: reap it.
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, tayga, os.WEXITED)
            os.close(tayga)
        if plan is None or plan.host_routed:
            with contextlib.suppress(OSError):
                self._nft_remove(name, host_link, plan)
        if plan is None or plan.mode == "bridge":
            with contextlib.suppress(Exception):
                if plan is not None or self.bridge_rules.has_table():
                    classes = plan.classes if plan is not None else None
                    if classes is None:
                        classes = self.bridge_rules.table_classes()
                    self.bridge_rules.remove_job(name, host_link, classes)
        for slot in slots:
            leases.release(self.journal, slot, name)
        self.journal.remove(name)
        return True

    def _dhcp_release(self, plan: JobNetwork, record: Record) -> None:
        renewer = self._dhcp.pop(plan.name, None)
        if renewer is not None:
            renewer.stop(release=True)
            return
        # Another process's (killed) job: release what its record says.
        saved = record.extra.get("dhcp")
        if saved and plan.job_link and plan.job_mac and netns.exists(plan.netns):
            from larkns.kernel import dhcp  # bridge mode only

            with contextlib.suppress(Exception):
                client = dhcp.Client(plan.netns, plan.job_link, plan.job_mac)
                try:
                    client.release(dhcp.Lease.from_dict(saved))
                finally:
                    client.close()

    def _nft_remove(self, name: str, host_link: str | None, plan: JobNetwork | None = None) -> None:
        try:
            ruleset = self.ruleset
        except Exception:
            return
        record = self.journal.read(name)
        taken = record.extra.get("sources", []) if record is not None else []
        ruleset.remove_job(
            name,
            host_link,
            self._classes(plan),
            masquerade=plan is None or plan.mode == "nat",
            inbound=None if plan is None else _inbound(plan),
            sources=[]
            if plan is None
            else [*_sources(plan), *(ipaddress.ip_address(a) for a in taken)],
        )

    def _classes(self, plan: JobNetwork | None) -> Sequence[str]:
        """The traffic classes job `plan` has counters for: as its record
        says, since the process that set it up may have had other
        LARKNS_CLASSES; for a record that does not say, every class the
        table has (a listing: slow, but only for records of older larkns)."""
        if plan is not None and plan.classes is not None:
            return plan.classes
        try:
            return self.ruleset.table_classes()
        except NftError:
            # Teardown goes on whatever fails: remove at least what this
            # process's classes name.
            return tuple(n for n, _ in self.settings.classes)

    def _remove_netns(self, ns_name: str) -> None:
        ino = netns.inode(ns_name)
        if ino is not None:
            # A job's processes would keep its namespace (and link) alive.
            netns.kill_all(ino)
        netns.delete(ns_name)

    def clean_if_idle(self) -> None:
        """Remove the table and the state dir if no job is left (a daemon stopping)."""
        with self.journal.lock(exclusive=True):
            self._clean_if_idle_locked()

    def _clean_when_idle(self) -> None:
        """The last job out removes the table and the state dir."""
        # Checked first without the lock: a teardown while other jobs run
        # must not wait for every setup in progress.
        if not self.clean_when_idle or self.journal.names():
            return
        with self.journal.lock(exclusive=True):
            self._clean_if_idle_locked()

    def _clean_if_idle_locked(self) -> None:
        if not self.journal.names():
            with contextlib.suppress(Exception):
                self.ruleset.delete_table()
            with contextlib.suppress(Exception):
                self.bridge_rules.delete_table()
            self.journal.remove_if_idle()

    def records(self) -> list[Record]:
        out = []
        for name in self.journal.names():
            r = self.journal.read(name)
            if r is not None:
                out.append(r)
        return out

    def gc(self) -> list[str]:
        """Remove every orphan; returns what was removed, one line each.

        Runs under the exclusive state lock, which every setup holds shared
        from its lease to its last object: so nothing gc sees without a
        record can be a job being set up (or one reusing a finished job's
        name) right now.
        """
        with self.journal.lock(exclusive=True):
            removed = self._gc_locked()
            if self.clean_when_idle:
                self._clean_if_idle_locked()
        return removed

    def _gc_locked(self) -> list[str]:
        removed: list[str] = []
        for record in self.records():
            if record.alive():
                continue
            self._teardown(record.name)
            gone = record.owner if not record.owner.alive() else record.client
            assert gone is not None
            removed.append(f"job {record.name} (its owner or client, pid {gone.pid}, is gone)")
        live = set(self.journal.names())

        for ns_name in netns.names():
            if ns_name.startswith(self.settings.netns_prefix) and (
                ns_name[len(self.settings.netns_prefix) :] not in live
            ):
                self._remove_netns(ns_name)
                removed.append(f"netns {ns_name}")
        for link in links.veths_with_prefix(self.ipr, HOST_LINK_PREFIX):
            if link[len(HOST_LINK_PREFIX) :] not in live and links.delete(self.ipr, link):
                removed.append(f"link {link}")
        try:
            table = self.ruleset.job_objects()
        except Exception:
            table = TableJobs(set(), set(), (), {})
        # An orphan has no record to say which classes it has: every class
        # in the table, whichever configuration added it.
        for job in sorted(table.jobs - live):
            self.ruleset.remove_job(job, None, table.classes)
            removed.append(f"nft counters of {job}")
        for link in sorted(table.links):
            if link[len(HOST_LINK_PREFIX) :] not in live:
                self.ruleset.remove_job(
                    link[len(HOST_LINK_PREFIX) :],
                    link,
                    table.classes,
                    sources=table.sources.get(link, []),
                )
                removed.append(f"nft map entries of {link}")
        try:
            bridged_jobs = self.bridge_rules.jobs()
        except Exception:
            bridged_jobs = set()
        bridge_classes = self.bridge_rules.table_classes() if bridged_jobs - live else ()
        for job in sorted(bridged_jobs - live):
            self.bridge_rules.remove_job(job, HOST_LINK_PREFIX + job, bridge_classes)
            removed.append(f"bridge guard and counters of {job}")
        for slot, lease in sorted(leases.leased(self.journal).items()):
            # A lease is taken just before its job's record is claimed: one
            # without a record is orphaned only once its leaser is gone.
            if lease.name not in live and not pid_alive(lease.pid):
                leases.release(self.journal, slot, lease.name)
                removed.append(f"address slot {slot} (of {lease.name})")
        for tmp in self.journal.stale_temp_files():
            tmp.unlink(missing_ok=True)
            removed.append(f"journal temp file {tmp.name}")
        for note in self.journal.stale_exit_files():
            note.unlink(missing_ok=True)
            removed.append(f"exit note {note.name}")
        return removed


def _inbound(plan: JobNetwork) -> Inbound | None:
    if plan.inbound_ports is None:
        return None
    first, last = plan.inbound_ports
    ipv4 = plan.ipv4_job.ip if plan.ipv4_job else None
    return Inbound(range(first, last + 1), ipv4, plan.ipv6_job)


CLAT_TUN = "clat"
# All tayga needs before it drops to its user: its tun device, then
# setgid, setuid and chroot.
CLAT_CAPS = frozenset({core.CAP_NET_ADMIN, core.CAP_SETGID, core.CAP_SETUID, core.CAP_SYS_CHROOT})
# The CLATs' own user, made by setup.sh: a job's packets reach no file or
# process of any other user through a subverted tayga.
CLAT_USER = "larkns-tayga"


@functools.cache
def clat_user() -> tuple[str, str]:
    """The user and group tayga runs as: CLAT_USER's, else nobody's (said
    once per process: a node that was not set up by setup.sh)."""
    for name in (CLAT_USER, "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        try:
            group = grp.getgrgid(pw.pw_gid).gr_name
        except KeyError:
            continue
        if name != CLAT_USER:
            print(
                f"larkns: no user {CLAT_USER} (setup.sh makes it): CLATs run as {name}:{group}",
                file=sys.stderr,
            )
        return name, group
    raise SetupError(f"no user {CLAT_USER} and no user nobody to run the job's CLAT as")


def plan_eui64_ll(mac: str) -> ipaddress.IPv6Address:
    """The link-local address a link with `mac` forms (EUI-64)."""
    return eui64(ipaddress.IPv6Network("fe80::/64"), mac)


def _sources(plan: JobNetwork) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a job (nat, routed) may send from: its IPv4, its
    link-local, its SLAAC address, its CLAT's."""
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if plan.ipv4_job is not None:
        out.append(plan.ipv4_job.ip)
    if plan.job_mac is not None:
        out.append(plan_eui64_ll(plan.job_mac))
    for a in (plan.ipv6_job, plan.ipv6_clat):
        if a is not None:
            out.append(a)
    return out
