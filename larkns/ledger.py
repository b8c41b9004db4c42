"""The ledger: one row per job that ended on this node, and samples of running
jobs' counters, in a SQLite database under LARKNS_LIB_DIR (LARKNS_LEDGER).

Crash safety: WAL, one transaction per write.  A writer killed at any instant
(SIGKILL of larknsd or `larkns run`) leaves a whole database holding every
transaction that committed: the commit is in the WAL file (in the kernel's
page cache) before commit returns, and SQLite replays the WAL at the next
open.  `synchronous=NORMAL` skips the fsync of each commit (fsyncs at
checkpoints only): what the kernel holds survives any process's crash, so
only a crash of the whole machine can lose the last commits, never corrupt
the file; an fsync per job's end would cost milliseconds on a loaded disk
for a guarantee against power loss (tests/test_ledger.py kills a writer with
SIGKILL mid-write, bench/ledger.py measures a write).

Times are Unix seconds (UTC); bytes and packets as the job's JSON report has
them (incoming/outgoing from the job's point of view, L3).

This module imports sqlite3 (~2-3 ms): `larkns run` imports it only after its
command has ended.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from larkns.journal import Record

# PRAGMA user_version: the schema this module writes.  A newer one is refused
# (its columns may mean something else); an older one would be migrated here.
SCHEMA_VERSION = 1

# Counters of a job, flat, as columns of `jobs` (and of a report's rows).
COUNTERS = (
    "bytes_in",
    "bytes_out",
    "packets_in",
    "packets_out",
    "ipv4_bytes_in",
    "ipv4_bytes_out",
    "ipv4_packets_in",
    "ipv4_packets_out",
    "ipv6_bytes_in",
    "ipv6_bytes_out",
    "ipv6_packets_in",
    "ipv6_packets_out",
    "dropped_packets",
    "dropped_bytes",
    "refused_packets",
    "refused_bytes",
)

JOB_COLUMNS = (
    "name",
    "started",
    "ended",
    "source",
    "global_job_id",
    "job_id",
    "owner",
    "acct_group",
    "type",
    "ipv4",
    "ipv6",
    *COUNTERS,
    "cap_down_bps",
    "cap_up_bps",
    "exit_code",
    "signal",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    source TEXT NOT NULL,
    global_job_id TEXT,
    job_id TEXT,
    owner TEXT,
    acct_group TEXT,
    type TEXT NOT NULL,
    ipv4 TEXT,
    ipv6 TEXT,
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COUNTERS)},
    cap_down_bps INTEGER,
    cap_up_bps INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    UNIQUE (name, started)
);
-- Every report selects by end time.  --by owner reads this index alone, in
-- owner order: over 1,000,000 jobs 0.27 s, where an index of (owner, ended)
-- alone took 3.0 s (a table lookup per row) and a scan of the table 0.8 s
-- (bench/ledger.py).
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (ended);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (
    owner, ended, started, bytes_in, bytes_out, packets_in, packets_out,
    dropped_packets, refused_packets
);
CREATE TABLE IF NOT EXISTS classes (
    job INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    class TEXT NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    packets_in INTEGER NOT NULL,
    packets_out INTEGER NOT NULL,
    PRIMARY KEY (job, class)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    name TEXT NOT NULL,
    started REAL NOT NULL,
    t REAL NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    packets_in INTEGER NOT NULL,
    packets_out INTEGER NOT NULL,
    PRIMARY KEY (name, started, t)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_t ON samples (t);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""

DAY = 86400.0


class LedgerError(Exception):
    """The ledger cannot be opened or written (one line, naming the file)."""


@dataclass(frozen=True)
class JobEnd:
    """What the ledger keeps of one job that ended."""

    name: str
    started: float  # Unix seconds
    ended: float
    source: str  # "run" (larkns run), "condor" (larknsd), "history" (condor_history)
    type: str  # network type
    # The counters, shaped as the job's JSON report has them (report.build,
    # or larknsd's protocol): bytes/packets, families, classes, dropped, refused.
    traffic: Mapping[str, Any]
    global_job_id: str | None = None
    job_id: str | None = None  # "ClusterId.ProcId"
    owner: str | None = None
    acct_group: str | None = None
    ipv4: str | None = None
    ipv6: tuple[str, ...] = ()
    cap: tuple[int, int] | None = None  # (down, up) bits/s
    exit_code: int | None = None
    signal: int | None = None

    def row(self) -> tuple[Any, ...]:
        t = self.traffic
        fams = t.get("families") or {}
        dropped = t.get("dropped") or {}
        refused = t.get("refused") or {}
        counters = [*_pair(t), *_pair(fams.get("ipv4")), *_pair(fams.get("ipv6"))]
        counters += [
            dropped.get("packets", 0),
            dropped.get("bytes", 0),
            refused.get("packets", 0),
            refused.get("bytes", 0),
        ]
        return (
            self.name,
            self.started,
            self.ended,
            self.source,
            self.global_job_id,
            self.job_id,
            self.owner,
            self.acct_group,
            self.type,
            self.ipv4,
            ",".join(self.ipv6) or None,
            *counters,
            None if self.cap is None else self.cap[0],
            None if self.cap is None else self.cap[1],
            self.exit_code,
            self.signal,
        )

    def class_rows(self) -> Iterator[tuple[str, int, int, int, int]]:
        for name, c in (self.traffic.get("classes") or {}).items():
            yield (name, *_pair(c))


def _pair(f: Mapping[str, Any] | None) -> tuple[int, int, int, int]:
    """bytes in, out, packets in, out of a report's {"bytes": {...}, "packets": {...}}."""
    if not f:
        return (0, 0, 0, 0)
    b = f.get("bytes") or {}
    p = f.get("packets") or {}
    return (
        int(b.get("incoming", 0)),
        int(b.get("outgoing", 0)),
        int(p.get("incoming", 0)),
        int(p.get("outgoing", 0)),
    )


def create_file(path: Path, group: int | None = None) -> None:
    """Make the (empty) database file root's alone (0600), or readable by
    `group` (0640): as root, never through a symlink another user planted,
    never widening an existing file's mode.  Its directory is made 0700.
    SQLite gives its -wal and -shm files the same owner and mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = 0o600 if group is None else 0o640
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise LedgerError(f"{path}: not a regular file; refusing to use it") from None
        return
    try:
        # The umask may have taken bits; set exactly these.
        os.fchmod(fd, mode)
        if group is not None:
            os.fchown(fd, -1, group)
    finally:
        os.close(fd)


class Ledger:
    """One connection to the ledger; safe to share between threads (larknsd
    serves each job in a thread of its own)."""

    def __init__(
        self,
        path: Path | str,
        days: float = 90.0,
        group: int | None = None,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.days = days
        self._lock = threading.Lock()
        memory = str(path) == ":memory:"
        try:
            if not memory:
                if create:
                    create_file(self.path, group)
                elif not self.path.exists():
                    raise LedgerError(f"{self.path}: no ledger here (no job has ended yet?)")
            # Autocommit mode: transactions are the explicit BEGIN/COMMIT
            # below, one per write.
            self.db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except sqlite3.Error as e:
            raise LedgerError(f"{self.path}: cannot open the ledger: {e}") from None
        except OSError as e:
            raise LedgerError(f"{self.path}: cannot open the ledger: {e.strerror}") from None
        try:
            self._setup()
        except sqlite3.Error as e:
            self.db.close()
            raise LedgerError(f"{self.path}: {e}") from None
        self._next_prune_check = 0.0

    def _setup(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema {version} is newer than this larkns's "
                f"({SCHEMA_VERSION}); use the larkns that wrote it"
            )
        # See the module's docstring for why NORMAL is enough with WAL.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        if version < SCHEMA_VERSION:
            # One transaction: a writer killed while it makes the schema
            # leaves none (executescript would commit on its own).
            with self._transaction() as db:
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: take the write lock at once, so two writers (larknsd,
        # `larkns run`) wait for each other (busy timeout) instead of one
        # failing at its first write.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------

    def add_job(self, job: JobEnd) -> int:
        """Keep one job that ended (one transaction); its row id.  The same
        job written twice (name and start) is kept once: a larknsd restarted
        after writing but before forgetting the job writes it again."""
        marks = ", ".join("?" * len(JOB_COLUMNS))
        with self._lock:
            try:
                with self._transaction() as db:
                    cur = db.execute(
                        f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({marks}) "
                        "ON CONFLICT (name, started) DO NOTHING",
                        job.row(),
                    )
                    if cur.rowcount == 0:
                        found = db.execute(
                            "SELECT id FROM jobs WHERE name = ? AND started = ?",
                            (job.name, job.started),
                        ).fetchone()
                        return int(found[0])
                    rowid = int(cur.lastrowid or 0)
                    db.executemany(
                        "INSERT INTO classes VALUES (?, ?, ?, ?, ?, ?)",
                        ((rowid, *c) for c in job.class_rows()),
                    )
            except sqlite3.Error as e:
                raise LedgerError(f"{self.path}: cannot write job {job.name}: {e}") from None
        self.prune_if_due()
        return rowid

    def add_jobs(self, jobs: Iterable[JobEnd]) -> int:
        """Many jobs in one transaction (a report from condor_history, a
        benchmark's synthetic ledger); how many."""
        n = 0
        with self._lock, self._transaction() as db:
            for job in jobs:
                cur = db.execute(
                    f"INSERT OR IGNORE INTO jobs ({', '.join(JOB_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(JOB_COLUMNS))})",
                    job.row(),
                )
                if cur.rowcount:
                    rowid = cur.lastrowid
                    db.executemany(
                        "INSERT INTO classes VALUES (?, ?, ?, ?, ?, ?)",
                        ((rowid, *c) for c in job.class_rows()),
                    )
                    n += 1
        return n

    def add_sample(self, name: str, started: float, t: float, traffic: Mapping[str, Any]) -> None:
        """A running job's counters at time t (one transaction)."""
        with self._lock:
            try:
                with self._transaction() as db:
                    db.execute(
                        "INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (name, started, t, *_pair(traffic)),
                    )
            except sqlite3.Error as e:
                raise LedgerError(f"{self.path}: cannot write a sample of {name}: {e}") from None
        self.prune_if_due()

    def prune_if_due(self, now: float | None = None) -> int:
        """Remove what is older than the retention, at most once a day: a
        look at one row of `meta` (kept in memory for a day by a process
        that lives, as larknsd does).  How many jobs went."""
        now = time.time() if now is None else now
        if now < self._next_prune_check:
            return 0
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'pruned'").fetchone()
            last = float(row[0]) if row else 0.0
            if now - last < DAY:
                self._next_prune_check = last + DAY
                return 0
            return self._prune(now)

    def prune(self, now: float | None = None) -> int:
        with self._lock:
            return self._prune(time.time() if now is None else now)

    def _prune(self, now: float) -> int:
        cutoff = now - self.days * DAY
        try:
            with self._transaction() as db:
                # Classes go with their jobs (ON DELETE CASCADE).
                gone = db.execute("DELETE FROM jobs WHERE ended < ?", (cutoff,)).rowcount
                db.execute("DELETE FROM samples WHERE t < ?", (cutoff,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('pruned', ?)", (now,))
        except sqlite3.Error as e:
            raise LedgerError(f"{self.path}: cannot remove old rows: {e}") from None
        self._next_prune_check = now + DAY
        return int(gone)

    # -- reading -----------------------------------------------------------

    def jobs(self, where: str = "1", args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Rows of `jobs` as dicts, with their classes ({name: {...}})."""
        with self._lock:
            cur = self.db.execute(f"SELECT id, * FROM jobs WHERE {where} ORDER BY id", tuple(args))
            names = [d[0] for d in cur.description]
            out = [dict(zip(names[1:], r[1:], strict=True)) for r in cur.fetchall()]
            for row in out:
                row["classes"] = {
                    c: dict(
                        zip(("bytes_in", "bytes_out", "packets_in", "packets_out"), v, strict=True)
                    )
                    for c, *v in self.db.execute(
                        "SELECT class, bytes_in, bytes_out, packets_in, packets_out "
                        "FROM classes WHERE job = ? ORDER BY class",
                        (row["id"],),
                    )
                }
        return out

    def samples(self, name: str, started: float) -> list[tuple[float, int, int]]:
        """(t, bytes in, bytes out) of one job, in time order."""
        with self._lock:
            return [
                (float(t), int(i), int(o))
                for t, i, o in self.db.execute(
                    "SELECT t, bytes_in, bytes_out FROM samples "
                    "WHERE name = ? AND started = ? ORDER BY t",
                    (name, started),
                )
            ]

    def query(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        """A read for the reports (report.py builds the SQL)."""
        with self._lock:
            return self.db.execute(sql, tuple(args))


def open_for(settings: Any, create: bool = True) -> Ledger | None:
    """The node's ledger as the settings say (None: LARKNS_LEDGER = off)."""
    path = settings.ledger_path
    if path is None:
        return None
    return Ledger(path, settings.ledger_days, settings.ledger_gid, create=create)


# What of a job's ad the ledger keeps (the ad as its starter gave it to the
# prepare hook: Record.account).
AD_ACCOUNT = ("Owner", "AcctGroup", "ClusterId", "ProcId")


def ad_account(ad: Any) -> dict[str, str]:
    out = {}
    for attr in AD_ACCOUNT:
        v = ad.get(attr)
        if isinstance(v, str | int) and not isinstance(v, bool):
            out[attr] = str(v)
    return out


def boot_time() -> float:
    """When the machine booted (Unix seconds), from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise LedgerError("/proc/stat has no btime")


def started(record: Record) -> float:
    """When the job's process started (Unix seconds): its start time in
    clock ticks after boot, which the record keeps and a restarted larknsd
    reads alike; the record's making if it has no process yet."""
    if record.job is None:
        return record.created
    return round(boot_time() + record.job.start / os.sysconf("SC_CLK_TCK"), 2)


def condor_job(
    record: Record, traffic: Mapping[str, Any], outcome: Mapping[str, int], ended: float
) -> JobEnd:
    """An HTCondor job that larknsd served, as the ledger keeps it."""
    plan = record.plan
    a = record.account
    ipv4 = plan.planned_ipv4 if plan is not None else None
    ipv6 = plan.planned_ipv6 if plan is not None else None
    cap = getattr(plan, "bandwidth", None)
    return JobEnd(
        name=record.name,
        started=started(record),
        ended=ended,
        source="condor",
        type=plan.mode if plan is not None else "-",
        traffic=traffic,
        global_job_id=record.job_id,
        job_id=f"{a['ClusterId']}.{a['ProcId']}" if "ClusterId" in a and "ProcId" in a else None,
        owner=a.get("Owner"),
        acct_group=a.get("AcctGroup"),
        ipv4=None if ipv4 is None else str(ipv4),
        ipv6=() if ipv6 is None else (str(ipv6),),
        cap=cap,
        exit_code=outcome.get("code"),
        signal=outcome.get("signal"),
    )
