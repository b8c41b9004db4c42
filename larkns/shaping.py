"""A job's bandwidth cap: what a rate means, which cap a job gets, and how
its shaper is sized.

A cap is (down, up) in bits per second of link-layer bytes (Ethernet header
included, as HTB counts them): download is what reaches the job, upload what
it sends.  A job without a cap has no shaper at all.  The kernel side (HTB on
the host end of the job's veth, an IFB for the upload) is larkns/kernel/tc.py.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from larkns.config import ConfigError

if TYPE_CHECKING:
    from larkns.config import Settings

# (down, up), bits/s.
Cap = tuple[int, int]

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)")
# tc's HTB takes 64-bit rates; above this no NIC a worker has could send.
MAX_RATE = 10**12
# One kB a second: below it no job could do anything with its link.
MIN_RATE = 8_000

# The first second of a transfer may run ahead of the rate by one burst:
# 20 ms of the rate keeps that to 2% (CNI's bandwidth plugin, with its
# default burst, let a 10 Mbit/s cap run at ~2 Gbit/s for the first second:
# kubernetes #90838), and still fills a 1 Gbit/s cap (bench/shaping.py: TCP
# payload 0.94-0.95 of it, the first second 0.98).
BURST_S = 0.02
# Two full-size frames at least, so HTB never waits to send one (at rates
# below 1.2 Mbit/s that is more than 2% of a second).
MIN_BURST = 2 * 1514
# A FIFO leaf (kernels without fq_codel or sfq) holds at most 5 ms of the
# rate, and room for one 64 KiB GSO packet and two frames (a packet larger
# than the room left is dropped whole).  bench/shaping.py, a ping through a
# saturated 100 Mbit/s cap: +5.5 ms (cubic sender) and +3.8 ms (BBR) with
# 5 ms, +18.9 and +8.4 ms with 20 ms; TCP got 0.93-0.94 of the cap after
# its first second with either (payload is at most 0.956 of it).
FIFO_S = 0.005
MIN_FIFO = 65536 + 2 * 1514


def parse_rate(text: str, what: str) -> int:
    """`text` ("100mbit", "1gbit", "500kbit") in bits/s; ConfigError naming `what`."""
    found = _RATE_RE.fullmatch(text.strip().lower())
    unit = found and _UNITS.get(found.group(2))
    if not found or unit is None:
        hint = " (tc's kbps is kilobytes/s: write kbit)" if text.lower().endswith("bps") else ""
        raise ConfigError(
            f"{what}: expected a rate like 100mbit, 1gbit or 500kbit, got {text!r}{hint}"
        )
    rate = round(float(found.group(1)) * unit)
    if rate == 0:
        raise ConfigError(f"{what}: a rate of 0 would stop all traffic, got {text!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ConfigError(f"{what}: expected a rate from 8kbit to 1000gbit, got {text!r}")
    return rate


def parse_cap(text: str, what: str) -> Cap:
    """`DOWN[/UP]` (UP defaults to DOWN) as (down, up) bits/s."""
    down, sep, up = text.partition("/")
    if sep and not up.strip():
        raise ConfigError(f"{what}: expected DOWN[/UP] like 100mbit/20mbit, got {text!r}")
    d = parse_rate(down, what)
    return d, parse_rate(up, what) if sep else d


def format_rate(bps: int) -> str:
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps >= scale and bps % scale == 0:
            return f"{bps // scale}{unit}"
    return f"{bps}bit"


def format_cap(cap: Cap) -> str:
    return f"{format_rate(cap[0])}/{format_rate(cap[1])}"


def above(cap: Cap, most: Cap) -> str | None:
    """What of `cap` is above `most` ("down 2gbit > 1gbit"), or None."""
    over = [
        f"{way} {format_rate(c)} > {format_rate(m)}"
        for way, c, m in (("down", cap[0], most[0]), ("up", cap[1], most[1]))
        if c > m
    ]
    return ", ".join(over) or None


def job_cap(settings: Settings, asked: Cap | None, what: str = "--bandwidth") -> Cap | None:
    """The cap of a job that asked for `asked` (None: nothing): its own
    within LARKNS_BANDWIDTH_MAX, else LARKNS_BANDWIDTH, else the maximum (a
    site that sets one never runs a job above it); None: unshaped."""
    most = settings.bandwidth_max
    if asked is not None:
        if most is not None and (why := above(asked, most)):
            raise ConfigError(
                f"{what}: {format_cap(asked)} is above LARKNS_BANDWIDTH_MAX "
                f"({format_cap(most)}): {why}"
            )
        return asked
    return settings.bandwidth if settings.bandwidth is not None else most


def burst(rate: int) -> int:
    """HTB's burst (bytes) for `rate` bits/s."""
    return max(MIN_BURST, int(rate / 8 * BURST_S))


# A FIFO leaf of a job's class in the uplink's share holds more: 20 ms of
# the class's ceiling and two 64 KiB packets.  A class whose queue runs dry
# between two of its sender's packets lends its turn to the others, and
# with room for one packet only, weights 1:3 came out 0.37:0.63 (upload)
# instead of 0.25:0.75.
SHARED_FIFO_S = 0.02
MIN_SHARED_FIFO = 2 * 65536


def fifo_limit(rate: int, shared: bool = False) -> int:
    """A FIFO leaf's limit (bytes) for `rate` bits/s (`shared`: of a class
    in the uplink's share)."""
    if shared:
        return max(MIN_SHARED_FIFO, int(rate / 8 * SHARED_FIFO_S))
    return max(MIN_FIFO, int(rate / 8 * FIFO_S))


# A job's weight in the uplink's share (larkns/kernel/uplink.py): shares are
# relative, 1 the least (HTB could not honour less than one 64 KiB packet a
# turn), 100 the most (a turn of 6.4 MB is already 51 ms of a 1 Gbit/s link).
MIN_WEIGHT = 1.0
MAX_WEIGHT = 100.0


def parse_weight(value: object, what: str) -> float:
    """A weight: a number (or its text) from 1 to 100; ConfigError naming `what`."""
    number: float | None = None
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric or (isinstance(value, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*", value)):
        number = float(value)  # type: ignore[arg-type]
    if number is None or not MIN_WEIGHT <= number <= MAX_WEIGHT:
        raise ConfigError(
            f"{what}: expected a weight from 1 to 100 (shares are relative; 1 is the least), "
            f"got {value!r}"
        )
    return number
