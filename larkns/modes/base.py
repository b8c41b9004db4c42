"""What every network type's driver does, and what the engine asks of it.

A driver knows one network type: its settings, its plan, the kernel objects
it builds for a job, how a job of that type is taken over after a restart,
checked, counted and removed.  The engine (larkns/engine.py) keeps what is
common to all of them: the job's name claimed in the journal, its slot, its
namespace, the locks, the rollback of a failed setup, and gc.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, NamedTuple, TypeVar

from larkns.config import ConfigError, Settings
from larkns.journal import Record
from larkns.kernel.nft import LarknsTable
from larkns.kernel.rtnl import Rtnl, RtnlError
from larkns.plan import JobNetwork
from larkns.policy import Policy
from larkns.traffic import Count, Traffic

if TYPE_CHECKING:
    from larkns.engine import Engine

P = TypeVar("P", bound=JobNetwork)

# What "already gone" is, from whichever call removes an object.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})


class SetupError(ConfigError):
    """A job's network could not be built; nothing of it is left.  Its
    message is a one-line reason, shown (and refused) as a ConfigError's."""


class Requirement(NamedTuple):
    """Something shared that jobs need (a table's classes, a policy's chain):
    whether it is there, and how to make it so."""

    met: Callable[[], bool]
    meet: Callable[[], None]


class Failures:
    """What a teardown could not remove, one line each.  An object that is
    already gone is no failure: teardown is idempotent."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Remove `what` in the block; what fails is noted, and teardown
        goes on with the next object."""
        try:
            yield
        except (FileNotFoundError, ProcessLookupError, ChildProcessError):
            pass
        except (OSError, RtnlError) as e:
            if e.errno not in _GONE_ERRNOS:
                self.lines.append(f"{what}: {e}")
        except Exception as e:
            self.lines.append(f"{what}: {e}")

    def __bool__(self) -> bool:
        return bool(self.lines)


class Driver(Generic[P]):
    """One network type.  The defaults are those of a type with no link."""

    mode: ClassVar[str]
    # The nft table its jobs are counted in: drivers that share one are
    # swept by gc once.
    table: ClassVar[type[LarknsTable] | None] = None
    # Whether larkns sends the router advertisements its jobs take SLAAC from.
    advertises: ClassVar[bool] = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings

    @staticmethod
    def validate(settings: Settings) -> None:
        """Refuse settings of this type that cannot work together (at
        larknsd's or `larkns run`'s start, not at the first job's)."""

    def rules(self) -> LarknsTable | None:
        """The engine's handle on the table the type's jobs are counted in."""
        return None if self.table is None else self.engine.table(self.table)

    def plan(self, name: str, policy: Policy) -> P:
        """Job `name`'s plan, with a slot leased if the type needs one, and
        its destination policy."""
        raise NotImplementedError

    def requirements(self, policy: Policy) -> list[Requirement]:
        """What the table must have before a job of this type with `policy`
        is added: each met, or met under the journal's exclusive lock."""
        rules = self.rules()
        return [] if rules is None else [Requirement(rules.serves_classes, rules.update_classes)]

    def prepare(self, plan: P) -> None:
        """In the job's new namespace, before any link is in it."""

    def build(self, plan: P, job: Rtnl, record: Record) -> None:
        """Everything of the job's network but its namespace.  `job` is a
        netlink socket in the job's namespace; what the record must carry
        (a lease) is set on `record`, which the engine then writes."""
        raise NotImplementedError

    def adopt(self, plan: P, record: Record) -> None:
        """Serve a running job's network again after a restart: what lives
        in the process rather than in the kernel."""

    def wait_ready(self, plan: P, timeout: float, cancel: Callable[[], bool]) -> float | None:
        """Wait until the job's network is usable; seconds waited, or None
        on timeout (or when `cancel()` says so)."""
        return 0.0

    def addresses(self, plan: P) -> tuple[str | None, list[str]]:
        """(IPv4, [IPv6 global addresses]) the job has now."""
        return (None, [])

    def check(self, plan: P) -> list[str]:
        """What is missing or wrong of the job's network outside its namespace."""
        return []

    def stats(self, plan: P) -> Traffic:
        return Traffic()

    def counters(self, plan: P) -> dict[str, Count]:
        """The job's counters by key (out4, cin-NAME, ...), as read now."""
        return {}

    def intact(self, plan: P) -> bool:
        """Whether the job's objects in its table are all there."""
        return True

    def restore(self, plan: P, record: Record, start: dict[str, Count]) -> None:
        """Put back the job's objects in its table (a flush of the ruleset
        took them), its counters going on from `start`."""

    def release(self, name: str, plan: P | None, record: Record | None, failures: Failures) -> None:
        """Teardown, before the job's namespace goes.  `plan` is None for a
        job killed before its plan was written: remove what a job of this
        type named `name` could have left."""

    def remove(self, name: str, plan: P | None, record: Record | None, failures: Failures) -> None:
        """Teardown, after the job's namespace is gone."""

    def sweep(self, live: set[str], left: list[str]) -> list[str]:
        """gc: remove what jobs not in `live` left in the type's table;
        what was removed, one line each (what could not be: on `left`)."""
        return []

    def close(self) -> None:
        """Let go of what this process holds for the type's jobs."""


def classes_of(plan: JobNetwork, rules: LarknsTable, settings: Settings) -> Sequence[str]:
    """The traffic classes job `plan` has counters for: as its record says,
    since the process that set it up may have had other LARKNS_CLASSES; for
    a record that does not say, every class the table has (a listing: slow,
    but only for records of older larkns)."""
    if plan.classes is not None:
        return plan.classes
    return all_classes(rules, settings)


def all_classes(rules: LarknsTable, settings: Settings) -> Sequence[str]:
    """Every class the table has counters for; when it cannot be listed,
    at least those this process's LARKNS_CLASSES name (teardown goes on
    whatever fails)."""
    try:
        return rules.table_classes()
    except Exception:
        return tuple(n for n, _ in settings.classes)


def traffic(c: dict[str, Count], classes: Sequence[str]) -> Traffic:
    """A job's Traffic from its counters by key (out4, in6, cin-NAME, ...)."""
    return Traffic(
        ipv4_in=c["in4"],
        ipv4_out=c["out4"],
        ipv6_in=c["in6"],
        ipv6_out=c["out6"],
        control_in=c["ctl-in"],
        control_out=c["ctl-out"],
        dropped=c["drop"],
        classes={n: (c[f"cin-{n}"], c[f"cout-{n}"]) for n in classes},
        refused=c.get("refused", Count()),
    )
