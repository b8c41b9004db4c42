"""The verbs: setup, check, teardown, gc, stats.

Each verb is idempotent (CNI style): teardown of a job that is half built, or
already gone, succeeds and removes exactly what is left.  The journal record
of a job is written before any of its objects exists and removed after the
last one is gone, so gc can always find what a killed process left behind.
A teardown that cannot remove everything keeps the record (state
"teardown-failed", with what is left) for gc to try again.

What a job's network is made of depends on its type, and is its driver's
(larkns/modes); the engine holds what is common: the name claimed in the
journal, the slot, the namespace, the locks, the rollback, gc.

All kernel work happens in the network namespace of the calling thread: the
worker node's (in tests, a namespace that plays it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from larkns import core, leases, modes
from larkns.config import Settings, check_name
from larkns.journal import Journal, NameInUse, Process, Record, pid_alive
from larkns.kernel import links, netns, sysctl
from larkns.kernel.iproute import PinnedIPRoute
from larkns.kernel.nft import LarknsTable, NftError
from larkns.kernel.rtnl import Rtnl, RtnlError
from larkns.modes.base import Driver, Failures, Requirement, SetupError
from larkns.plan import (
    HOST_LINK_PREFIX,
    SHAPER_LINK_PREFIX,
    SHARE_DOWN_LINK,
    SHARE_UP_LINK,
    SPARE_SHAPER_PREFIX,
    JobNetwork,
    LinkedNetwork,
)
from larkns.policy import OPEN, Policy
from larkns.traffic import Count, Traffic

if TYPE_CHECKING:
    from larkns.kernel import tc, uplink
    from larkns.kernel.ra import Advertiser

__all__ = ["Engine", "SetupError", "Swept", "TeardownError"]

# At most this many spare IFBs (each a net device the host lists): enough
# for as many capped jobs as end together to start together again.
MAX_SPARE_SHAPERS = 64

# A record's states once its job's network is whole (`larkns run` marks its
# job running once the command is started).
LIVE_STATES = ("ready", "running")

T = TypeVar("T")
TB = TypeVar("TB", bound=LarknsTable)


class Swept(NamedTuple):
    """What gc removed, and what it could not (one line each)."""

    removed: list[str]
    left: list[str]


class TeardownError(Exception):
    """Teardown left objects behind; the job's record says which, and gc
    tries again."""

    def __init__(self, name: str, problems: list[str]) -> None:
        super().__init__(
            f"job {name}: teardown left {len(problems)} object(s): " + "; ".join(problems)
        )
        self.name = name
        self.problems = problems


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
        self._tables: dict[type[LarknsTable], LarknsTable] = {}
        self._drivers: dict[str, Driver[Any]] = {}
        self._shared: dict[Any, Any] = {}
        self.forwarding = False  # enabled on the worker by this process
        # The leaf qdisc under the caps of this process's jobs (tc.leaf()).
        self.shaper_leaf: str | None = None
        # Finished jobs' IFBs kept for the next capped jobs (see
        # SPARE_SHAPER_PREFIX); only a process that serves many keeps any.
        # None: not yet looked for those a previous larknsd kept.
        self._spares: list[tc.Spare] | None = None
        # The uplink's share as this process made or found it (uplink.ensure).
        self._share: uplink.Shared | None = None
        # job -> (when, its counters then): the last reading, from which a
        # flushed job's counters go on.
        self.last_counts: dict[str, tuple[float, dict[str, Count]]] = {}
        self.advertised: dict[str, int] = {}  # job -> host link RAs go out of
        # For the engine's shared netlink and nft handles when more than one
        # thread works with it (larknsd takes it around every verb; the DHCP
        # renewers and wait_ready's late guard updates take it themselves).
        self.lock = threading.RLock()

    @staticmethod
    def validate(settings: Settings, types: Sequence[str] = modes.TYPES) -> None:
        """Refuse settings of `types` that cannot work together: at the start
        of larknsd (every type) or `larkns run` (its job's), not at the
        first job of a type."""
        settings.check_policies()
        for mode in types:
            modes.driver_class(mode).validate(settings)

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

    def table(self, kind: type[TB]) -> TB:
        """This engine's handle on an nft table larkns counts jobs in."""
        t = self._tables.get(kind)
        if t is None:
            t = self._tables[kind] = kind(self.settings.classes)
        return cast(TB, t)

    def open_tables(self) -> None:
        """Every table's handle, with libnftables loaded (NftError if it
        cannot be): larknsd opens them at start, while its descriptors are
        few (libnftables waits on its socket with select(2), which cannot
        take a descriptor above 1023)."""
        for d in self.drivers():
            if d.table is not None:
                self.table(d.table).open()

    def driver(self, mode: str) -> Driver[Any]:
        """The driver of network type `mode`."""
        d = self._drivers.get(mode)
        if d is None:
            d = self._drivers[mode] = modes.driver_class(mode)(self)
        return d

    def drivers(self) -> list[Driver[Any]]:
        return [self.driver(mode) for mode in modes.TYPES]

    def shared(self, kind: Callable[[Engine], T]) -> T:
        """The one `kind` (a component more than one driver uses, such as
        the CLATs) of this engine."""
        c = self._shared.get(kind)
        if c is None:
            c = self._shared[kind] = kind(self)
        return cast(T, c)

    def job_socket(self, plan: JobNetwork) -> Rtnl:
        """Netlink in the job's namespace.  Opened on demand, not kept per
        job: a process with hundreds of jobs would otherwise hold hundreds
        of sockets for nothing."""
        with netns.entered(plan.netns):
            return Rtnl()

    def close(self) -> None:
        for d in self._drivers.values():
            d.close()
        for c in self._shared.values():
            c.close()
        self._shared.clear()
        for t in self._tables.values():
            t.close()
        self._tables.clear()
        for handle in (self._rtnl, self._ipr):
            if handle is not None:
                handle.close()
        self._rtnl = self._ipr = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup -------------------------------------------------------------

    def setup(
        self,
        name: str,
        mode: str,
        owner: Process,
        client: Process | None = None,
        policy: Policy = OPEN,
        bandwidth: tuple[int, int] | None = None,
        weight: float | None = None,
    ) -> JobNetwork:
        """Build job `name`'s network (with destination `policy`); on any
        failure remove what was built and raise.  `bandwidth`: the cap the
        job asked for, (down, up) bits/s (refused above LARKNS_BANDWIDTH_MAX
        before anything is built); `weight`: its weight in the uplink's
        share, if the uplink is shared (None: LARKNS_WEIGHT's)."""
        check_name(name)
        cap = None
        settings = self.settings
        if bandwidth or settings.bandwidth or settings.bandwidth_max or settings.bandwidth_expr:
            # Imported only for a cap: a job without one costs nothing.
            from larkns.shaping import job_cap

            cap = job_cap(settings, bandwidth, "the job's cap")
        driver = self.driver(mode)
        # No nftables: refused before anything is built.
        needs = driver.requirements(policy)
        claimed = False
        try:
            # Shared: the last job out cannot remove the state dir or the
            # table while this job is being set up.
            with self._setup_lock(needs):
                # Checked before the lease too, so that a name in use is
                # reported as such even when the pool is full; claim() below
                # is what guarantees it.
                in_use = SetupError(f"job name {name!r} is in use (see `larkns list`)")
                if self.journal.path(name).exists():
                    raise in_use
                plan: JobNetwork = driver.plan(name, policy)
                if isinstance(plan, LinkedNetwork) and settings.uplink_bandwidth is not None:
                    plan = dataclasses.replace(
                        plan, weight=settings.weight if weight is None else weight
                    )
                if cap is not None and isinstance(plan, LinkedNetwork):
                    plan = dataclasses.replace(plan, bandwidth=cap)
                record = Record(name=name, owner=owner, state="building", plan=plan, client=client)
                try:
                    self.journal.claim(record)
                except NameInUse:
                    if plan.slot is not None:
                        leases.release(self.journal, plan.slot, name)
                    raise in_use from None
                claimed = True
                self._build(driver, plan, record)
                record.state = "ready"
                self.journal.write(record)
                return plan
        except (OSError, RtnlError, NftError, core.SpawnError) as e:
            # What the kernel refused: a one-line reason, not a traceback.
            if claimed:
                self._rollback(name)
            raise SetupError(f"job {name}: cannot build its network: {e}") from e
        except BaseException:
            if claimed:
                self._rollback(name)  # outside the lock: teardown may take it exclusively
            raise

    def _rollback(self, name: str) -> None:
        """Remove what a failed setup built; what cannot be removed stays in
        the record for gc (the setup's own error is the one reported)."""
        try:
            self.teardown(name)
        except TeardownError as e:
            print(f"larkns: {e}", file=sys.stderr)

    def lease_slot(self, name: str, count: int, pools: str) -> int:
        """A free slot below `count` for job `name`; `pools` names the
        settings that bound `count`, for the error when none is free."""
        try:
            return leases.lease(self.journal, name, count)
        except leases.PoolExhausted as e:
            raise SetupError(f"address pool exhausted: {e} ({pools})") from None

    @contextlib.contextmanager
    def _setup_lock(self, needs: list[Requirement]) -> Iterator[None]:
        """The journal's shared lock, held once what the job needs is met:
        the table counts this process's traffic classes as configured, the
        job's policy has its chain.

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
        for _ in range(3):
            with self.journal.lock(exclusive=False):
                if all(n.met() for n in needs):
                    yield
                    return
            with self.journal.lock(exclusive=True):
                for n in needs:
                    if not n.met():
                        n.meet()
        raise SetupError(
            f"the nft table larkns does not keep LARKNS_CLASSES "
            f"({', '.join(n for n, _ in self.settings.classes)}): something else changes it"
        )

    def _build(self, driver: Driver[Any], plan: JobNetwork, record: Record) -> None:
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
            driver.prepare(plan)
            job = Rtnl()
        with job:
            driver.build(plan, job, record)
        if isinstance(plan, LinkedNetwork) and (
            plan.bandwidth is not None or plan.weight is not None
        ):
            from larkns.kernel import tc

            self.shaper_leaf = tc.shape(
                self.rtnl,
                plan.host_link,
                plan.shaper_link,
                plan.shaper_index,
                plan.bandwidth,
                spare=self._spare_shaper() if plan.bandwidth is not None else None,
                share=self._member(plan),
            )

    def _member(self, plan: LinkedNetwork) -> uplink.Member | None:
        """The job's part in the uplink's share (None: not shared), the
        share made first if this process has not made or found it yet, or
        if it is gone."""
        if plan.weight is None or plan.slot is None:
            return None
        from larkns.kernel import uplink

        capacity = self.settings.uplink_bandwidth
        if capacity is None:
            raise SetupError(f"job {plan.name} has a weight, but LARKNS_UPLINK_BANDWIDTH is unset")
        shared = self._share
        if (
            shared is None
            or shared.capacity != capacity
            or self.rtnl.link_index(uplink.DOWN_LINK) != shared.down
        ):
            shared = self._share = uplink.ensure(self.rtnl, self.settings.uplink, capacity)
        return uplink.Member(shared, plan.slot, plan.weight, plan.bandwidth)

    # -- what a running job's callers ask ------------------------------------

    def adopt(self, plan: JobNetwork) -> None:
        """Serve a running job's network again after a restart: what lives in
        the process (router advertisements, DHCP renewals) rather than in
        the kernel."""
        record = self.journal.read(plan.name)
        if record is not None:
            self.driver(plan.mode).adopt(plan, record)

    def wait_ready(
        self, plan: JobNetwork, timeout: float, cancel: Callable[[], bool] = lambda: False
    ) -> float | None:
        """Wait until the job's network is usable (its SLAAC address); seconds
        waited, or None on timeout (or when `cancel()` says so)."""
        return self.driver(plan.mode).wait_ready(plan, timeout, cancel)

    def job_addresses(self, plan: JobNetwork) -> tuple[str | None, list[str]]:
        """(IPv4, [IPv6 global addresses]) the job has now."""
        return self.driver(plan.mode).addresses(plan)

    def check(self, name: str) -> list[str]:
        """What is missing or wrong in job `name`'s network (empty: all well)."""
        record = self.journal.read(name)
        if record is None:
            return [f"job {name}: no record"]
        if record.state == "teardown-failed":
            return [f"teardown left {p}" for p in record.problems]
        if record.problems:
            return [f"job {name}: {p}" for p in record.problems]
        if record.plan is None:
            return [f"job {name}: setup never finished planning (state {record.state})"]
        plan = record.plan
        problems = []
        if not netns.exists(plan.netns):
            problems.append(f"netns {plan.netns} is missing")
        if (
            isinstance(plan, LinkedNetwork)
            and plan.bandwidth is not None
            and self.rtnl.link_index(plan.shaper_link) is None
        ):
            problems.append(f"link {plan.shaper_link} (the job's upload cap) is missing")
        return problems + self.driver(plan.mode).check(plan)

    def stats(self, name: str) -> Traffic:
        record = self.journal.read(name)
        if record is None or record.plan is None:
            return Traffic()
        return self.driver(record.plan.mode).stats(record.plan)

    # -- after a flush of the ruleset, or of a job's qdiscs ---------------------

    def reshape(self, names: Collection[str], links: Collection[int]) -> list[str]:
        """Put back the shapers of jobs `names` (this process's) whose host
        link or IFB is among `links` (their root or clsact qdisc was
        deleted), and the uplink's share if its IFBs or the uplink are.
        What was put back, one line each."""
        from larkns.kernel import tc, uplink

        out: list[str] = []
        deleted = set(links)
        with self.lock:
            plans = []
            for name in names:
                record = self.journal.read(name)
                plan = record.plan if record is not None else None
                if (
                    record is not None
                    and record.state in LIVE_STATES
                    and isinstance(plan, LinkedNetwork)
                    and (plan.bandwidth is not None or plan.weight is not None)
                ):
                    plans.append(plan)
            share = self._share
            shared_hit = share is not None and bool(
                {share.down, share.up, share.uplink_index} & deleted
            )
            if share is not None and shared_hit:
                self._share = None
                if any(p.weight is not None for p in plans):
                    try:
                        share = self._share = uplink.ensure(
                            self.rtnl, self.settings.uplink, share.capacity
                        )
                        out.append("the uplink's share put back")
                    except (OSError, RtnlError) as e:
                        out.append(f"the uplink's share not put back: {e}")
                        share = None
            for plan in plans:
                member = None
                if plan.weight is not None and share is not None and plan.slot is not None:
                    member = uplink.Member(share, plan.slot, plan.weight, plan.bandwidth)
                mine = {self.rtnl.link_index(plan.host_link)}
                if plan.bandwidth is not None:
                    mine.add(self.rtnl.link_index(plan.shaper_link))
                try:
                    if mine & deleted:
                        tc.reshape(
                            self.rtnl, plan.host_link, plan.shaper_link, plan.bandwidth, member
                        )
                        out.append(f"job {plan.name}: its shapers put back")
                    elif shared_hit and member is not None:
                        # Its classes went with the IFB's root (if that is
                        # what went; else they are still there).
                        requests = uplink.class_requests(
                            member.shared, member.slot, member.weight, member.cap
                        )
                        self.rtnl.run(*requests, ignore=(errno.EEXIST,))
                except (OSError, RtnlError) as e:
                    out.append(f"job {plan.name}: shapers not put back: {e}")
        return out

    def sample(self, records: Collection[Record]) -> None:
        """Read the counters of the jobs of `records` (this process's), so
        that a flush of the ruleset loses at most what they counted since."""
        with self.lock:
            live = {
                r.name: r.plan for r in records if r.plan is not None and r.state in LIVE_STATES
            }
            for gone in self.last_counts.keys() - live.keys():
                del self.last_counts[gone]
            for name, plan in live.items():
                with contextlib.suppress(Exception):
                    counts = self.driver(plan.mode).counters(plan)
                    if counts:
                        self.last_counts[name] = (time.time(), counts)

    def restore(self, names: Collection[str]) -> list[str]:
        """Put back what a flush of the ruleset took from live jobs `names`
        (this process's: another's puts back its own): tables, counters
        (going on from their last reading), maps, guards, NAT, forwarded
        ports, policies.  What was put back, one line each."""
        from larkns import policy

        out: list[str] = []
        if not names:
            return out
        with self.lock, self.journal.lock(exclusive=True):
            for name in names:
                record = self.journal.read(name)
                plan = record.plan if record is not None else None
                if record is None or plan is None or record.state not in LIVE_STATES:
                    continue
                driver = self.driver(plan.mode)
                try:
                    if driver.intact(plan):
                        continue
                    for need in driver.requirements(policy.parse(plan.destination_policy, "")):
                        if not need.met():
                            need.meet()
                    taken, start = self.last_counts.get(plan.name, (record.created, {}))
                    driver.restore(plan, record, start)
                except Exception as e:
                    out.append(f"job {plan.name}: not put back: {e}")
                    continue
                gap = max(time.time() - taken, 0.0)
                record.uncounted += gap
                self.journal.write(record)
                out.append(f"job {plan.name}: put back ({gap:.1f} s of its traffic uncounted)")
        return out

    # -- teardown / gc -----------------------------------------------------

    def teardown(self, name: str) -> bool:
        """Remove everything of job `name`; False if there was no such job.
        TeardownError if something could not be removed (the record stays,
        saying what, and gc tries again)."""
        try:
            # Under the lock a watcher that puts back flushed jobs takes:
            # never a job half removed.
            with self.lock:
                return self._teardown(name)
        finally:
            self._after_teardown()

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
        # Without a plan (killed right after claiming), every type removes
        # what a job of its type by that name could have left: names derive
        # from the job's name.
        drivers = [self.driver(plan.mode)] if plan is not None else self.drivers()
        failures = Failures()
        for d in drivers:
            d.release(name, plan, record, failures)
        ns_name = plan.netns if plan is not None else self.settings.netns_prefix + name
        with failures.step(f"netns {ns_name}"):
            self._remove_netns(ns_name)
        for d in drivers:
            d.remove(name, plan, record, failures)
        # A capped job's IFB (its veth's qdiscs went with the veth), kept for
        # a later capped job by a process that serves many.  Without a
        # plan, whatever a job of this name could have left.
        if plan is None or (isinstance(plan, LinkedNetwork) and plan.bandwidth is not None):
            from larkns.kernel import tc

            shaper = SHAPER_LINK_PREFIX + name
            with failures.step(f"link {shaper}"):
                spares = self._spare_shapers() if plan is not None else None
                if spares is None or len(spares) >= MAX_SPARE_SHAPERS:
                    tc.unshape(self.rtnl, shaper)
                elif spare := tc.park(self.rtnl, shaper, SPARE_SHAPER_PREFIX):
                    spares.append(spare)
        # Its classes in the uplink's share; without a plan, those of its slots.
        if plan is None or (isinstance(plan, LinkedNetwork) and plan.weight is not None):
            from larkns.kernel import uplink

            with failures.step("its classes in the uplink's share"):
                if plan is not None or self._share_present():
                    for slot in slots:
                        uplink.leave(self.rtnl, slot)
        if failures:
            left = Record(name=name, owner=Process(0, 0)) if record is None else record
            left.state = "teardown-failed"
            left.problems = tuple(failures.lines)
            self.journal.write(left)
            raise TeardownError(name, failures.lines)
        for slot in slots:
            leases.release(self.journal, slot, name)
        self.journal.remove(name)
        return True

    def _remove_netns(self, ns_name: str) -> None:
        ino = netns.inode(ns_name)
        if ino is not None:
            # A job's processes would keep its namespace (and link) alive.
            netns.kill_all(ino)
        netns.delete(ns_name)

    def clean_if_idle(self) -> None:
        """Remove the tables, the spare IFBs and the state dir if no job is
        left (a daemon stopping)."""
        with self.journal.lock(exclusive=True):
            if not self.journal.names():
                self._remove_spare_shapers()
            self._remove_tables_and_state()

    def _spare_shapers(self) -> list[tc.Spare] | None:
        """The IFBs kept for the next capped jobs; None in a process that
        keeps none (one that removes everything when idle: `larkns run`)."""
        if self.clean_when_idle:
            return None
        if self._spares is None:
            # Those a previous larknsd kept, for this one to use.
            self._spares = [
                (link.ifindex, link.name)
                for link in self.rtnl.links()
                if link.name.startswith(SPARE_SHAPER_PREFIX) and link.kind == "ifb"
            ]
        return self._spares

    def _spare_shaper(self) -> tc.Spare | None:
        spares = self._spare_shapers()
        return spares.pop() if spares else None

    def _remove_spare_shapers(self) -> list[str]:
        self._spares = None
        removed = []
        for link in links.with_prefix(self.ipr, SPARE_SHAPER_PREFIX, "ifb"):
            if links.delete(self.ipr, link):
                removed.append(f"link {link} (a spare upload shaper)")
        return removed

    def _share_present(self) -> bool:
        """Whether the uplink's share is on this node, looked up by its
        links' names: the share's modules (tc, eBPF) are loaded only where
        there is one."""
        return any(self.rtnl.link_index(n) is not None for n in (SHARE_DOWN_LINK, SHARE_UP_LINK))

    def _remove_share(self) -> list[str]:
        """The uplink's share, when no job is left in it."""
        self._share = None
        if not self._share_present():
            return []
        from larkns.kernel import uplink

        return uplink.remove(self.rtnl, self.settings.uplink)

    def _after_teardown(self) -> None:
        """The last job out removes the tables and the state dir."""
        # Checked first without the lock: a teardown while other jobs run
        # must not wait for every setup in progress.
        if not self.clean_when_idle or self.journal.names():
            return
        with self.journal.lock(exclusive=True):
            self._remove_tables_and_state()

    def _remove_tables_and_state(self) -> None:
        if not self.journal.names():
            self._remove_share()
            for kind in modes.TABLES:
                with contextlib.suppress(Exception):
                    t = self.table(kind)
                    # Looked up first: deleting a table that is not there
                    # fails, and a failed transaction costs an RCU grace
                    # period (5-12 ms here).
                    if t.exists():
                        t.delete_table()
            self.journal.remove_dir_if_unused()

    def records(self) -> list[Record]:
        out = []
        for name in self.journal.names():
            r = self.journal.read(name)
            if r is not None:
                out.append(r)
        return out

    def gc(self) -> Swept:
        """Remove every orphan; returns what was removed, and what could not
        be, one line each.

        Runs under the exclusive state lock, which every setup holds shared
        from its lease to its last object: so nothing gc sees without a
        record can be a job being set up (or one reusing a finished job's
        name) right now.
        """
        with self.journal.lock(exclusive=True):
            swept = self._gc_locked()
            if self.clean_when_idle:
                self._remove_tables_and_state()
        return swept

    def _gc_locked(self) -> Swept:
        removed: list[str] = []
        left: list[str] = []
        for record in self.records():
            # A record whose teardown failed is retried whoever owns it:
            # its owner has given it up.
            if record.alive() and record.state != "teardown-failed":
                continue
            try:
                self._teardown(record.name)
            except TeardownError as e:
                left += [f"job {record.name}: {p}" for p in e.problems]
                continue
            if record.state == "teardown-failed":
                removed.append(f"job {record.name} (what its teardown had left)")
                continue
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
        for link in links.with_prefix(self.ipr, SHAPER_LINK_PREFIX, "ifb"):
            job = link[len(SHAPER_LINK_PREFIX) :]
            spare = link.startswith(SPARE_SHAPER_PREFIX)
            if not spare and job not in live and links.delete(self.ipr, link):
                removed.append(f"link {link}")
        if not live:
            removed += self._remove_spare_shapers()
            removed += self._remove_share()
        swept: set[type[LarknsTable]] = set()
        for d in self.drivers():
            if d.table is not None and d.table not in swept:
                swept.add(d.table)
                removed += d.sweep(live, left)
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
        return Swept(removed, left)
