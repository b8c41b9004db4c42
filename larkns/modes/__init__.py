"""One driver per network type (see base.py for what a driver does).

A new type is a module here, named as the type, with its plan class and
its driver (as DRIVER), and its name in TYPES; the engine and the other
types need no change.  A type's module is imported when a job of that type
is first met: `larkns run` of a nat job loads neither bridge mode nor its
DHCP client.
"""

from __future__ import annotations

import importlib
from typing import Any

from larkns.config import ConfigError
from larkns.kernel.bridge import BridgeRuleset
from larkns.kernel.nft import LarknsTable, Ruleset
from larkns.modes.base import Driver

TYPES = ("nat", "routed", "bridge", "none")
# The tables the types count their jobs in (a driver's `table`), known
# without importing every type: the last job out removes them all.
TABLES: tuple[type[LarknsTable], ...] = (Ruleset, BridgeRuleset)


def driver_class(mode: str) -> type[Driver[Any]]:
    """The driver of network type `mode`."""
    if mode not in TYPES:
        raise ConfigError(f"--mode: unknown network type {mode!r} (expected {', '.join(TYPES)})")
    kind: type[Driver[Any]] = importlib.import_module(f"larkns.modes.{mode}").DRIVER
    return kind
