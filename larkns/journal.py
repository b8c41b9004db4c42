"""Per-job records under the state dir (/run/larkns), written before each object exists.

Layout:
  STATE/jobs/NAME.json   one record per job: its owner and its plan
  STATE/slots/N          one file per leased pool index, holding the job name
  STATE/lock             flock: shared while a job adds its rules, exclusive
                         while the last job out removes larkns's nft table

The state dir is on tmpfs, like the network namespaces it describes: both are
gone after a reboot.  A record is created (by link(2), so a name is claimed once)
before anything else of the job exists, and removed only after everything
else is gone: so whatever a kill -9 leaves, a record points at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from larkns.plan import JobNetwork, PlanError

if TYPE_CHECKING:
    from larkns.kernel.dhcp import Lease

# 1: what a job carried besides its plan was an untyped "extra" dict.
# 2: typed fields (job_id, dhcp, sources, relays, chirp, relayed, problems).
VERSION = 2


class NameInUse(Exception):
    pass


@dataclass(frozen=True)
class Process:
    """A pid made unambiguous by its start time (pids are reused)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Process:
        start = start_time(pid)
        if start is None:
            raise ProcessLookupError(pid)
        return cls(pid, start)

    def alive(self) -> bool:
        return start_time(self.pid) == self.start


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (for records that keep only a pid)."""
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parens: fields resume after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Relays:
    """What a job's relays (larknsd's) connect to: enough for a restarted
    larknsd to make them again."""

    chirp: int | None  # the starter's chirp port on the worker's loopback
    nameservers: tuple[str, ...]  # loopback resolvers relayed into the job


@dataclass(frozen=True)
class ChirpAccess:
    """How larknsd speaks chirp to the job's starter (root's alone: the
    journal is 0700)."""

    port: int
    cookie: str
    job_id: str


@dataclass
class Record:
    name: str
    owner: Process
    state: str = "claimed"
    plan: JobNetwork | None = None
    job: Process | None = None
    # The process the job is for, when the owner serves many (larknsd: the
    # job's wrapper); the job is orphaned when either is gone.
    client: Process | None = None
    # The job's parent, which outlives a daemon restart and writes down how
    # the job ended (core.spawn_kept).
    keeper: Process | None = None
    created: float = field(default_factory=time.time)
    # The HTCondor job's GlobalJobId (from the job ad the network was
    # prepared from).
    job_id: str | None = None
    # Whose job it is: the Owner of the ad it was prepared from, else the
    # user it runs as (larknsd's metrics name it).  A later field of
    # version 2: a record without it reads as None.
    user: str | None = None
    # bridge mode with DHCP: the job's lease, renewed by whichever larkns
    # process serves the job now.
    dhcp: Lease | None = None
    # IPv6 addresses the job took besides those its plan foresees (a host
    # whose namespaces form stable-privacy addresses): the guard lets them
    # through, and teardown removes them from it.
    sources: tuple[ipaddress.IPv6Address, ...] = ()
    relays: Relays | None = None
    chirp: ChirpAccess | None = None
    # Bytes the relays carried so far (in, out): a restarted larknsd counts
    # on from there.
    relayed: tuple[int, int] | None = None
    # What a teardown could not remove (state "teardown-failed"): gc tries again.
    problems: tuple[str, ...] = ()
    # Seconds of the job's traffic that may be missing from its counts: from
    # the last reading of its counters before a flush of the ruleset took
    # them, to when they were put back.
    uncounted: float = 0.0
    # Who the job is for, for the ledger: Owner, AcctGroup, ClusterId,
    # ProcId from the job's ad as its starter gave it (the prepare hook),
    # else the Owner as the uid of its wrapper names it.
    account: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        """Whether the job still has its owner (and its client, if it has
        one).  A job whose client is gone but whose keeper is not is still
        ending: the keeper kills it and writes down how it ended, and the
        owner removes it then (gc must not, or the keeper's note would
        outlive the job's record)."""
        if not self.owner.alive():
            return False
        if self.client is None or self.client.alive():
            return True
        return self.keeper is not None and self.keeper.alive()

    def job_user(self) -> str:
        """Whose job it is: as noted at its start, else (a record of an
        older larknsd, or of `larkns run`) the user its process runs as;
        "" if neither is known."""
        if self.user:
            return self.user
        if self.job is None:
            return ""
        try:
            uid = os.stat(f"/proc/{self.job.pid}").st_uid
        except OSError:
            return ""
        return user_name(uid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "name": self.name,
            "owner": _process(self.owner),
            "state": self.state,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "job": _process(self.job),
            "client": _process(self.client),
            "keeper": _process(self.keeper),
            "created": self.created,
            "job_id": self.job_id,
            "user": self.user,
            "dhcp": None if self.dhcp is None else self.dhcp.to_dict(),
            "sources": [str(a) for a in self.sources],
            "relays": None
            if self.relays is None
            else {"chirp": self.relays.chirp, "nameservers": list(self.relays.nameservers)},
            "chirp": None if self.chirp is None else vars(self.chirp),
            "relayed": None if self.relayed is None else list(self.relayed),
            "problems": list(self.problems),
            "uncounted": self.uncounted,
            "account": self.account,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        """A record of this version, or of version 1 (whose "extra" held
        what version 2 has typed fields for); PlanError for any other."""
        version = d.get("version", 1)
        if version == 1:
            d = {**d, **d.get("extra", {})}
        elif version != VERSION:
            raise PlanError(f"record version {version!r}: not one this larkns reads (1, 2)")
        plan = d.get("plan")
        lease = d.get("dhcp")
        relays = d.get("relays")
        chirp = d.get("chirp")
        relayed = d.get("relayed")
        return cls(
            name=d["name"],
            owner=Process(d["owner"]["pid"], d["owner"]["start"]),
            state=d.get("state", "claimed"),
            plan=None if plan is None else JobNetwork.from_dict(plan),
            job=_from_process(d.get("job")),
            client=_from_process(d.get("client")),
            keeper=_from_process(d.get("keeper")),
            created=d.get("created", 0.0),
            job_id=d["job_id"] if isinstance(d.get("job_id"), str) else None,
            user=d["user"] if isinstance(d.get("user"), str) else None,
            dhcp=None if not lease else _lease(lease),
            sources=tuple(ipaddress.IPv6Address(a) for a in d.get("sources") or ()),
            relays=None
            if not relays
            else Relays(relays.get("chirp"), tuple(relays.get("nameservers") or ())),
            chirp=None
            if not chirp
            else ChirpAccess(
                int(chirp["port"]), str(chirp["cookie"]), str(chirp.get("job_id", ""))
            ),
            relayed=None if not relayed else (int(relayed[0]), int(relayed[1])),
            problems=tuple(str(p) for p in d.get("problems") or ()),
            uncounted=float(d.get("uncounted") or 0.0),
            account={str(k): str(v) for k, v in (d.get("account") or {}).items()},
        )


def user_name(uid: int) -> str:
    """The name of user `uid`, or the number if it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _lease(d: dict[str, Any]) -> Lease:
    from larkns.kernel.dhcp import Lease  # bridge mode's: not loaded for other jobs

    return Lease.from_dict(d)


def _process(p: Process | None) -> dict[str, int] | None:
    return None if p is None else {"pid": p.pid, "start": p.start}


def _from_process(d: dict[str, int] | None) -> Process | None:
    return None if d is None else Process(d["pid"], d["start"])


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.jobs = state_dir / "jobs"
        self.slots = state_dir / "slots"

    def ensure_dirs(self) -> None:
        for d in (self.dir, self.jobs, self.slots):
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o700, parents=True)

    def path(self, name: str) -> Path:
        return self.jobs / f"{name}.json"

    def claim(self, record: Record) -> None:
        """Create the job's record; a name that has one already is in use."""
        self.ensure_dirs()
        tmp = self._temp(record)
        try:
            os.link(tmp, self.path(record.name))
        except FileExistsError:
            raise NameInUse(record.name) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _temp(self, record: Record) -> Path:
        tmp = self.jobs / f".{record.name}.{os.getpid()}.tmp"
        tmp.write_bytes(json.dumps(record.to_dict()).encode())
        return tmp

    def write(self, record: Record) -> None:
        """Replace the record atomically: a reader sees the old one or the new one."""
        os.replace(self._temp(record), self.path(record.name))

    def read(self, name: str) -> Record | None:
        try:
            data = self.path(name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Record.from_dict(json.loads(data))
        except PlanError as e:
            # A record this version cannot take over (a newer larkns wrote
            # it, then was downgraded): gc removes the job by its name.
            return Record(name=name, owner=Process(0, 0), state="unreadable", problems=(str(e),))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            # Records appear whole (link/rename), so this is damage from
            # outside; treat it as a claim whose owner is gone.
            return Record(name=name, owner=Process(0, 0), state="corrupt")

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.jobs)
        except FileNotFoundError:
            return []
        return sorted(
            e[: -len(".json")] for e in entries if e.endswith(".json") and not e.startswith(".")
        )

    def remove(self, name: str) -> None:
        for leftover in (
            self.exit_path(name),
            self.jobs / f".{name}.exit.tmp",
            self.clat_config(name),
        ):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.clat_root(name).rmdir()
        self.path(name).unlink(missing_ok=True)

    def clat_config(self, name: str) -> Path:
        """The configuration of a job's CLAT (tayga)."""
        return self.jobs / f"{name}.tayga.conf"

    def clat_root(self, name: str) -> Path:
        """The empty directory a job's CLAT (tayga) is chrooted to."""
        return self.jobs / f"{name}.tayga.root"

    def exit_path(self, name: str) -> Path:
        """Where a job's keeper writes how the job ended."""
        return self.jobs / f"{name}.exit"

    def exit_status(self, name: str) -> dict[str, int] | None:
        """How job `name` ended, as its keeper wrote it: {"code": N} or
        {"signal": N}; None if it has not (yet)."""
        try:
            word, value = self.exit_path(name).read_text().split()
            if word in ("code", "signal"):
                return {word: int(value)}
        except (FileNotFoundError, ValueError):
            pass
        return None

    def stale_exit_files(self) -> list[Path]:
        """Keepers' notes of jobs that have no record any more."""
        live = set(self.names())
        return [
            self.jobs / e
            for e in _listdir(self.jobs)
            if e.endswith(".exit") and not e.startswith(".") and e[: -len(".exit")] not in live
        ]

    def stale_temp_files(self) -> list[Path]:
        """Temp files (".NAME.PID.tmp") whose writer died before renaming them."""
        out = []
        for d in (self.jobs, self.slots):
            try:
                entries = os.listdir(d)
            except FileNotFoundError:
                continue
            for e in entries:
                parts = e.split(".")
                writer = parts[-2] if len(parts) > 2 else ""
                dead = writer.isdigit() and not pid_alive(int(writer))
                if e.endswith(".tmp") and dead:
                    out.append(d / e)
        return out

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Shared while jobs are set up, exclusive for the last job out, which
        removes the state dir (lock file included) when nothing is left."""
        while True:
            self.ensure_dirs()
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                same = os.stat(self.dir / "lock").st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # We waited on a lock file the last job out has since removed.
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)

    def remove_dir_if_unused(self) -> bool:
        """Remove the state dir if no job has a record or a lease; call under
        the exclusive lock.  True if it is gone."""
        if self.names() or any(e.isdigit() for e in _listdir(self.slots)):
            return False
        (self.slots / "next").unlink(missing_ok=True)
        for note in self.stale_exit_files():
            note.unlink(missing_ok=True)
        for d in (self.jobs, self.slots):
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()
        (self.dir / "lock").unlink(missing_ok=True)
        # A job that started meanwhile made the dir anew: then it stays.
        with contextlib.suppress(FileNotFoundError, OSError):
            self.dir.rmdir()
        return True


def _listdir(d: Path) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []
