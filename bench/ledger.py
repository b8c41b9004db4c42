"""What the ledger costs a job's end, and how fast `larkns report` adds it up.

- A job's end under `larkns run`: open the ledger, write the job's row (and
  its classes) in one transaction, close: as run.py does, in a process of its
  own per job.  Against two baselines: an empty write transaction on an open
  connection (SQLite's floor), and the job's JSON report written to a file.
  larknsd keeps its connection open: the row alone.
- Importing sqlite3 and the ledger, which `larkns run` does only after its
  command has ended (fresh interpreters).
- `larkns report --by owner` over 1,000,000 synthetic jobs (500 owners, 90
  days) in a temporary database: the query in-process and the whole command.

    .venv/bin/python bench/ledger.py [--jobs 300] [--rows 1000000]

Targets: the ledger write p50 <= 1 ms; the report over 1,000,000 rows <= 2 s.
Nothing here touches the network; everything is under a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larkns import ledger_report, report
from larkns.ledger import JOB_COLUMNS, JobEnd, Ledger
from tests.world import larkns_bin


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def ms(xs: list[float]) -> str:
    return f"p50 {pct(xs, 50) * 1e3:.3f} ms, p99 {pct(xs, 99) * 1e3:.3f} ms"


def _report(i: int) -> dict[str, object]:
    fam = {
        "bytes": {"incoming": 10**6, "outgoing": 10**5},
        "packets": {"incoming": 900, "outgoing": 80},
    }
    return {
        "name": f"b{i}",
        **fam,
        "families": {"ipv4": fam, "ipv6": fam},
        "classes": {"Campus": fam, "Cloud": fam},
        "dropped": {"packets": 0, "bytes": 0},
        "refused": {"packets": 0, "bytes": 0},
        "addresses": {"ipv4": "198.19.0.2", "ipv6": ["fd00::2"]},
        "duration_s": 12.5,
    }


def _job(i: int, rep: dict[str, object]) -> JobEnd:
    now = time.time()
    return JobEnd(
        name=f"b{i}",
        started=now - 12.5,
        ended=now,
        source="run",
        type="nat",
        traffic=rep,
        owner="alice",
        ipv4="198.19.0.2",
        ipv6=("fd00::2",),
        exit_code=0,
    )


def job_end(d: Path, jobs: int) -> None:
    path = d / "ledger.sqlite"
    Ledger(path).close()  # made once, as by the node's first job
    per_process, kept_open, empty, json_write = [], [], [], []
    fd = os.open(d / "report.json", os.O_WRONLY | os.O_CREAT, 0o600)
    db = Ledger(path)
    for i in range(jobs):
        rep = _report(i)
        t = time.perf_counter()
        with Ledger(path) as once:
            once.add_job(_job(i, rep))
        per_process.append(time.perf_counter() - t)
        t = time.perf_counter()
        db.add_job(_job(jobs + i, rep))
        kept_open.append(time.perf_counter() - t)
        t = time.perf_counter()
        db.db.execute("BEGIN IMMEDIATE")
        db.db.execute("COMMIT")
        empty.append(time.perf_counter() - t)
        t = time.perf_counter()
        report.write_json(rep, fd)
        json_write.append(time.perf_counter() - t)
    db.close()
    os.close(fd)
    base = pct(empty, 50)
    print(f"ledger write, open+write+close (larkns run): {ms(per_process)}")
    print(f"ledger write, connection kept open (larknsd): {ms(kept_open)}")
    print(f"empty write transaction (floor):             {ms(empty)}")
    print(f"the job's JSON report written:               {ms(json_write)}")
    print(
        f"ratios p50: larkns run {pct(per_process, 50) / base:.1f}x, larknsd "
        f"{pct(kept_open, 50) / base:.1f}x the empty transaction; larkns run "
        f"{pct(per_process, 50) / pct(json_write, 50):.1f}x the JSON report"
    )
    code = (
        # What `larkns run` has loaded by then (larkns.run), then the ledger;
        # without the collector, as the larkns program runs (cli.console).
        "import gc, time, larkns.run; gc.disable(); t = time.perf_counter(); "
        "import larkns.ledger; print(time.perf_counter() - t)"
    )
    imports = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
        for _ in range(10)
    ]
    took = statistics.median(imports) * 1e3
    print(f"import sqlite3 + larkns.ledger (after the command): p50 {took:.2f} ms")


def big_report(d: Path, rows: int) -> None:
    path = d / "big.sqlite"
    Ledger(path).close()
    rng = random.Random(1)
    now = time.time()
    t = time.perf_counter()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN")
    marks = ", ".join("?" * len(JOB_COLUMNS))
    raw.executemany(
        f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({marks})",
        (_job_row(i, now - rng.uniform(0, 90 * 86400), rng) for i in range(rows)),
    )
    raw.execute("COMMIT")
    raw.close()
    print(f"{rows:,} synthetic jobs written in {time.perf_counter() - t:.1f} s")
    with Ledger(path, create=False) as db:
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            s = ledger_report.summarize(db, "owner")
            runs.append(time.perf_counter() - t)
        assert s.total["jobs"] == rows
        took = statistics.median(runs)
        print(f"report --by owner, the query: median {took:.3f} s ({len(s.rows)} owners)")
        t = time.perf_counter()
        ledger_report.summarize(db, "owner", since=now - 7 * 86400)
        print(f"report --by owner --since 7d, the query: {time.perf_counter() - t:.3f} s")
    env = dict(os.environ, LARKNS_LEDGER=str(path))
    whole = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(
            [larkns_bin(), "report", "--by", "owner"], env=env, check=True, capture_output=True
        )
        whole.append(time.perf_counter() - t)
    print(
        f"`larkns report --by owner` over {rows:,} rows, the whole command: median "
        f"{statistics.median(whole):.3f} s ({statistics.median(whole) / 2:.2f}x the 2 s target)"
    )


def _job_row(i: int, ended: float, rng: random.Random) -> tuple[object, ...]:
    bi, bo = rng.randrange(10**9), rng.randrange(10**8)
    rep = {
        "bytes": {"incoming": bi, "outgoing": bo},
        "packets": {"incoming": bi // 1400, "outgoing": bo // 1400},
    }
    return JobEnd(
        name=f"s{i}",
        started=ended - rng.uniform(60, 36000),
        ended=ended,
        source="condor",
        type="nat",
        traffic=rep,
        global_job_id=f"schedd#{i}.0#1",
        job_id=f"{i}.0",
        owner=f"user{rng.randrange(500)}",
        acct_group=f"group{rng.randrange(20)}",
    ).row()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lktl-bench-") as d:
        job_end(Path(d), args.jobs)
        big_report(Path(d), args.rows)


if __name__ == "__main__":
    main()
