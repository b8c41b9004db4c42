"""Pool indexes ("slots") leased to jobs, one file each under STATE/slots.

A slot gives a job its IPv4 /31 and its IPv6 /64 (see plan.build).  Creating
the file (link(2), which fails if it exists) is the lease: two processes can
never get the same slot, with no lock and no daemon.  The file holds the job's
name and the leasing process's pid: the job's record is claimed right after
the lease, so gc can tell a lease whose job is gone from one about to have
its record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from larkns.journal import Journal

# Slots tried one by one before the lease looks at which are taken.
_PROBES = 8


class PoolExhausted(Exception):
    pass


@dataclass(frozen=True)
class Lease:
    name: str  # the job's
    pid: int  # the process that leased it, which claims the job's record next

    def encode(self) -> str:
        return f"{self.name} {self.pid}"

    @classmethod
    def decode(cls, text: str) -> Lease:
        name, _, pid = text.partition(" ")
        return cls(name, int(pid) if pid.isdigit() else 0)


def leased(journal: Journal) -> dict[int, Lease]:
    """slot -> lease, for every lease."""
    out: dict[int, Lease] = {}
    try:
        entries = os.listdir(journal.slots)
    except FileNotFoundError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            out[int(e)] = Lease.decode((journal.slots / e).read_text())
        except FileNotFoundError:
            continue
    return out


def taken(journal: Journal) -> set[int]:
    try:
        return {int(e) for e in os.listdir(journal.slots) if e.isdigit()}
    except FileNotFoundError:
        return set()


def lease(journal: Journal, name: str, count: int) -> int:
    """A free slot below `count`, now leased to `name`.

    Slots are handed out round robin from the one after the last lease, as
    DHCP servers do: the kernel removes a finished job's link asynchronously,
    and an address handed out again at once could still sit on it.
    """
    journal.ensure_dirs()
    start = _cursor(journal) % count
    # The lease file appears whole (link of a written temp file), so nobody
    # ever reads a half-written name.
    tmp = journal.slots / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(Lease(name, os.getpid()).encode())
    try:
        # Round robin makes the slots after the cursor nearly always free:
        # try a few without listing the directory, which holds a file per
        # live job (4,000 on a large node: ~2 ms a setup to list and parse).
        used: set[int] = set()
        for i in range(count):
            if i == _PROBES:
                used = taken(journal)
            slot = (start + i) % count
            if slot in used:
                continue
            try:
                os.link(tmp, journal.slots / str(slot))
            except FileExistsError:
                continue  # another job took it since listdir
            _set_cursor(journal, slot + 1)
            return slot
    finally:
        tmp.unlink(missing_ok=True)
    raise PoolExhausted(f"all {count} address slots are in use")


def _cursor(journal: Journal) -> int:
    try:
        return int((journal.slots / "next").read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def _set_cursor(journal: Journal, value: int) -> None:
    # Written in place (making a file costs ~0.2 ms on tmpfs).  A lost update
    # or a torn read between two processes only makes a slot be skipped or
    # tried twice; link() still keeps leases unique.
    fd = os.open(journal.slots / "next", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, f"{value:<12}".encode(), 0)
    finally:
        os.close(fd)


def release(journal: Journal, slot: int, name: str) -> None:
    """Give slot back, if it is still `name`'s."""
    path = journal.slots / str(slot)
    try:
        if Lease.decode(path.read_text()).name != name:
            return
    except FileNotFoundError:
        return
    path.unlink(missing_ok=True)
