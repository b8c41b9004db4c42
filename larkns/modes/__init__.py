"""One driver per network type (see base.py for what a driver does).

A new type is a module here with its plan class and its driver, and a line
in DRIVERS; the engine and the other types need no change.
"""

from __future__ import annotations

from larkns.modes.base import Driver, Failures, SetupError
from larkns.modes.bridge import BridgeDriver
from larkns.modes.nat import NatDriver
from larkns.modes.none import NoneDriver
from larkns.modes.routed import RoutedDriver

DRIVERS: dict[str, type[Driver]] = {  # type: ignore[type-arg]
    d.mode: d for d in (NatDriver, RoutedDriver, BridgeDriver, NoneDriver)
}

__all__ = ["DRIVERS", "Driver", "Failures", "SetupError"]
