"""What every network type with a link to the host does alike: its veth
pair, its counters' table, and checking and counting them."""

from __future__ import annotations

import errno
from typing import TypeVar

from larkns.kernel import links, netns
from larkns.kernel.nft import LarknsTable
from larkns.kernel.rtnl import RtnlError
from larkns.modes.base import Driver, SetupError, classes_of, traffic
from larkns.plan import LinkedNetwork
from larkns.traffic import Count, Traffic

L = TypeVar("L", bound=LinkedNetwork)


class LinkedDriver(Driver[L]):
    def rules(self) -> LarknsTable:
        raise NotImplementedError

    def create_veth(self, plan: L) -> int:
        """The job's veth pair; the host end's index."""
        engine = self.engine
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
            return links.create_veth(engine.rtnl, *args)
        except RtnlError as e:
            if e.errno != errno.EEXIST:
                raise
            if not links.is_veth(engine.ipr, plan.host_link):
                raise SetupError(
                    f"link {plan.host_link} exists and is not larkns's; rename it or the job"
                ) from None
            # A previous job of this name whose namespace the kernel is still
            # dismantling (that is asynchronous): remove its link now.
            links.delete(engine.ipr, plan.host_link)
            return links.create_veth(engine.rtnl, *args)

    def intact(self, plan: L) -> bool:
        rules = self.rules()
        classes = classes_of(plan, rules, self.settings)
        return rules.exists() and rules.has_job(plan.name, classes, self.counts_refused(plan))

    def restore_classes(self, plan: L) -> tuple[str, ...]:
        """The classes a job put back gets counters of: its own that the
        table (declared anew, with this process's) still has."""
        own = tuple(n for n, _ in self.settings.classes)
        return own if plan.classes is None else tuple(c for c in plan.classes if c in own)

    def check(self, plan: L) -> list[str]:
        problems = []
        ipr = self.engine.ipr
        idx = links.index(ipr, plan.host_link)
        if idx is None:
            problems.append(f"link {plan.host_link} is missing")
        elif not links.is_up(ipr, idx):
            problems.append(f"link {plan.host_link} is not up")
        rules = self.rules()
        if not rules.has_job(
            plan.name, classes_of(plan, rules, self.settings), self.counts_refused(plan)
        ):
            problems.append(f"nft counters of {plan.name} are missing")
        return problems

    def stats(self, plan: L) -> Traffic:
        # The classes the job was set up with: this process's may differ.
        # (For a record of an older larkns, this process's: stats are read
        # often, and should not list the table.)
        classes = plan.classes
        if classes is None:
            classes = tuple(n for n, _ in self.settings.classes)
        return traffic(self.counters(plan), classes)

    def counters(self, plan: L) -> dict[str, Count]:
        classes = plan.classes
        if classes is None:
            classes = tuple(n for n, _ in self.settings.classes)
        return self.rules().counters(plan.name, classes, self.counts_refused(plan))

    def counts_refused(self, plan: L) -> bool:
        """Whether the job has a counter of what its policy refused."""
        return False
