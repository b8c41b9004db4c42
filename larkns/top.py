"""`larkns top`: the live jobs with their rates in and out, busiest first,
redrawn every interval (like iftop, per job).

It reads the jobs' counters itself, as `larkns show` does (root), so it needs
no larknsd and shows `larkns run` jobs too.  On a terminal it redraws in
place and quits on q (or Ctrl-C); in a pipe it prints plain frames one after
another, and `--once` prints one frame (two readings an interval apart).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from larkns.config import Settings
    from larkns.engine import Engine

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


@dataclass(frozen=True)
class Reading:
    """A job's totals, in bytes (the job's point of view), at `when`."""

    name: str
    user: str
    mode: str
    incoming: int
    outgoing: int
    when: float


@dataclass(frozen=True)
class Row:
    reading: Reading
    rate_in: float  # bits/s
    rate_out: float


def read(engine: Engine) -> dict[str, Reading]:
    """Every live job's totals now."""
    from larkns.engine import LIVE_STATES

    out = {}
    for record in engine.records():
        plan = record.plan
        if plan is None or record.state not in LIVE_STATES:
            continue
        try:
            t = engine.driver(plan.mode).stats(plan)
        except Exception:
            continue  # gone meanwhile, or being put back after a flush
        out[record.name] = Reading(
            record.name,
            record.job_user(),
            plan.mode,
            t.incoming.bytes,
            t.outgoing.bytes,
            time.monotonic(),
        )
    return out


def rows(before: dict[str, Reading], now: dict[str, Reading]) -> list[Row]:
    """The jobs of `now` with their rates since `before`, busiest first (a
    job new since then: its rate since 0)."""
    out = []
    for name, r in now.items():
        b = before.get(name)
        seconds = r.when - b.when if b is not None else 0.0
        if b is None or seconds <= 0:
            out.append(Row(r, 0.0, 0.0))
            continue
        # max(): counters never go back, but a job of the same name may be
        # a new one.
        out.append(
            Row(
                r,
                8 * max(r.incoming - b.incoming, 0) / seconds,
                8 * max(r.outgoing - b.outgoing, 0) / seconds,
            )
        )
    out.sort(key=lambda row: (-(row.rate_in + row.rate_out), row.reading.name))
    return out


def rate(bits: float) -> str:
    """bits/s as iftop writes them: 0b/s, 512b/s, 1.2kb/s, 94.1Mb/s."""
    for unit, scale in (("Tb", 1e12), ("Gb", 1e9), ("Mb", 1e6), ("kb", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.1f}{unit}/s"
    return f"{bits:.0f}b/s"


def size(count: int) -> str:
    """Bytes: 0B, 812B, 1.2kB, 3.4GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count}B"


def frame(table: list[Row], height: int | None = None) -> str:
    lines = [
        f"{'NAME':<13} {'OWNER':<10} {'TYPE':<6} {'IN':>10} {'OUT':>10} "
        f"{'TOTAL IN':>9} {'TOTAL OUT':>9}"
    ]
    for row in table:
        r = row.reading
        lines.append(
            f"{r.name:<13} {r.user or '-':<10.10} {r.mode:<6} {rate(row.rate_in):>10} "
            f"{rate(row.rate_out):>10} {size(r.incoming):>9} {size(r.outgoing):>9}"
        )
    if height is not None and len(lines) > height:
        lines = [*lines[: height - 1], f"... and {len(lines) - height + 1} more jobs"]
    return "\n".join(lines) + "\n"


def main(settings: Settings, interval: float, once: bool, out: TextIO = sys.stdout) -> int:
    from larkns.engine import Engine

    terminal = out.isatty() and not once
    with Engine(settings) as engine, _keys(terminal) as keys:
        before = read(engine)
        while True:
            if keys is None:
                time.sleep(interval)
            elif _quit(keys, interval):
                return 0
            now = read(engine)
            table = rows(before, now)
            before = now
            if terminal:
                height = shutil.get_terminal_size().lines - 1
                out.write(CLEAR + frame(table, height))
            else:
                out.write(frame(table) + ("" if once else "\n"))
            out.flush()
            if once:
                return 0
    return 0  # Ctrl-C


@contextlib.contextmanager
def _keys(terminal: bool) -> Iterator[int | None]:
    """stdin in cbreak mode (a key arrives without Enter, unechoed) while
    drawing on a terminal; its descriptor then, else None.  Ctrl-C ends it
    quietly."""
    fd = sys.stdin.fileno() if terminal and sys.stdin.isatty() else None
    saved = None
    if fd is not None:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    try:
        yield fd
    except KeyboardInterrupt:
        pass
    finally:
        if fd is not None and saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit(fd: int, interval: float) -> bool:
    """Wait `interval` seconds for a key: whether it was q."""
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready and os.read(fd, 1) in (b"q", b"Q"):
            return True
    return False
