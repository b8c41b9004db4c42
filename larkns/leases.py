"""Pool indexes ("slots") leased to jobs, one file each under STATE/slots.

A slot gives a job its IPv4 /31 and its IPv6 /64 (see plan.build).  Creating
the file (link(2), which fails if it exists) is the lease: two processes can
never get the same slot, with no lock and no daemon.  The file holds the job's
name so gc can tell a lease whose job is gone.
"""

from __future__ import annotations

import os

from larkns.journal import Journal


class PoolExhausted(Exception):
    pass


def leased(journal: Journal) -> dict[int, str]:
    """slot -> job name, for every lease."""
    out: dict[int, str] = {}
    try:
        entries = os.listdir(journal.slots)
    except FileNotFoundError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            out[int(e)] = (journal.slots / e).read_text()
        except FileNotFoundError:
            continue
    return out


def lease(journal: Journal, name: str, count: int) -> int:
    """The lowest free slot below `count`, now leased to `name`."""
    taken = leased(journal)
    # The lease file appears whole (link of a written temp file), so nobody
    # ever reads a half-written name.
    tmp = journal.slots / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(name)
    try:
        for slot in range(count):
            if slot in taken:
                continue
            try:
                os.link(tmp, journal.slots / str(slot))
            except FileExistsError:
                continue  # another job took it since listdir
            return slot
    finally:
        tmp.unlink(missing_ok=True)
    raise PoolExhausted(f"all {count} address slots are in use")


def release(journal: Journal, slot: int, name: str) -> None:
    """Give slot back, if it is still `name`'s."""
    path = journal.slots / str(slot)
    try:
        if path.read_text() != name:
            return
    except FileNotFoundError:
        return
    path.unlink(missing_ok=True)
