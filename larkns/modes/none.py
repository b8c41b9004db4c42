"""none: the job's namespace has only its loopback."""

from __future__ import annotations

from dataclasses import dataclass

from larkns.journal import Record
from larkns.kernel import rtnl
from larkns.kernel.rtnl import Rtnl
from larkns.modes.base import Driver
from larkns.plan import JobNetwork
from larkns.policy import Policy


@dataclass(frozen=True, kw_only=True)
class NoNetwork(JobNetwork):
    mode = "none"


class NoneDriver(Driver[NoNetwork]):
    mode = "none"

    def plan(self, name: str, policy: Policy) -> NoNetwork:
        # Nothing to restrict: the job has no way out of its namespace.
        return NoNetwork(name=name, netns=self.settings.netns_prefix + name)

    def build(self, plan: NoNetwork, job: Rtnl, record: Record) -> None:
        job.run(rtnl.link_up(1, "lo"))


DRIVER = NoneDriver
