"""The ledger (a row per job that ended, samples while it runs) and
`larkns report` over it: against `larkns run` jobs with known transfers in a
simulated worker, and against synthetic ledgers."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from larkns import cli, ledger_report
from larkns.config import ConfigError
from larkns.ledger import SCHEMA_VERSION, JobEnd, Ledger, LedgerError
from tests.test_run import run_job
from tests.world import PEER, PORT, SITE4, SITE6, World

PY = sys.executable
DAY = 86400.0
CLASSES = "Site = 198.18.0.1/32, 2001:db8:0:1::1/128"


@pytest.fixture(scope="module")
def lworld() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    w = World("lktl")
    try:
        yield w
    finally:
        w.close()


@pytest.fixture()
def clean_lworld(lworld: World) -> Iterator[World]:
    yield lworld
    left = lworld.wait_no_leftovers()
    if left:
        lworld.larkns("gc")
        pytest.fail(f"leaked: {left}")


def _traffic(bi: int, bo: int, classes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    return {
        "bytes": {"incoming": bi, "outgoing": bo},
        "packets": {"incoming": bi // 100, "outgoing": bo // 100},
        "families": {"ipv4": {"bytes": {"incoming": bi, "outgoing": bo}}},
        "classes": {
            n: {"bytes": {"incoming": i, "outgoing": o}} for n, (i, o) in (classes or {}).items()
        },
        "dropped": {"packets": 1, "bytes": 60},
    }


def _job(i: int, ended: float, owner: str = "alice", **kw: Any) -> JobEnd:
    return JobEnd(
        name=f"j{i}",
        started=ended - 100,
        ended=ended,
        source="run",
        type="nat",
        traffic=kw.pop("traffic", _traffic(1000 * i, 3000 * i)),
        owner=owner,
        **kw,
    )


# -- the database ---------------------------------------------------------------


def test_the_ledger_is_roots_alone_versioned_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "ledger.sqlite"
    old = os.umask(0)  # larkns's modes, whatever the umask
    try:
        with Ledger(path) as db:
            db.add_job(_job(1, time.time()))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(LedgerError, match="newer than this larkns"):
        Ledger(path)


def test_a_site_may_let_a_group_read_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path, group=4).close()  # adm, on Debian
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o640, 4)


def test_the_ledger_refuses_a_symlink_planted_at_its_path(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "ledger.sqlite").symlink_to(target)
    with pytest.raises(LedgerError, match="not a regular file"):
        Ledger(tmp_path / "ledger.sqlite")


def test_a_job_written_twice_is_kept_once_with_its_classes(tmp_path: Path) -> None:
    now = time.time()
    job = _job(2, now, traffic=_traffic(10, 20, {"Site": (5, 6)}), global_job_id="s#1.0#1")
    with Ledger(tmp_path / "l.sqlite") as db:
        assert db.add_job(job) == db.add_job(job)
        (row,) = db.jobs()
    assert (row["bytes_in"], row["bytes_out"], row["dropped_packets"]) == (10, 20, 1)
    assert row["classes"] == {
        "Site": {"bytes_in": 5, "bytes_out": 6, "packets_in": 0, "packets_out": 0}
    }


def test_rows_older_than_the_retention_go_at_most_once_a_day(tmp_path: Path) -> None:
    now = time.time()
    with Ledger(tmp_path / "l.sqlite", days=90) as db:
        # The first write prunes (never done before): nothing is old yet.
        db.add_job(_job(1, now - 10))
        db.db.execute("DELETE FROM meta")  # as if the last prune were long ago
        db._next_prune_check = 0.0
        db.add_job(_job(2, now - 91 * DAY, traffic=_traffic(1, 1, {"Site": (1, 1)})))
        # That write pruned: the row it wrote was older than 90 days.
        assert [r["name"] for r in db.jobs()] == ["j1"]
        assert db.query("SELECT COUNT(*) FROM classes").fetchone()[0] == 0
        # Within a day, no second prune, even of a row that is too old.
        db.add_job(_job(3, now - 100 * DAY))
        assert sorted(r["name"] for r in db.jobs()) == ["j1", "j3"]
        assert db.prune(now) == 1


_WRITER = """
import sys, time
from larkns.ledger import JobEnd, Ledger
db = Ledger(sys.argv[1])
i = int(sys.argv[2])
t = {"bytes": {"incoming": 1, "outgoing": 2}, "classes": {"A": {"bytes": {"incoming": 1}}}}
while True:
    db.add_job(JobEnd(name=f"k{i}", started=float(i), ended=time.time(), source="run",
                      type="nat", traffic=t))
    db.add_sample(f"k{i}", float(i), time.time(), t)
    print(i, flush=True)  # only once the write has returned
    i += 1
"""


def test_a_writer_killed_at_any_moment_loses_no_job_whose_write_returned(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    written: list[int] = []
    rng = random.Random(12)
    for round_ in range(25):
        w = subprocess.Popen(
            [PY, "-c", _WRITER, str(path), str(round_ * 1_000_000)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert w.stdout is not None
        out = w.stdout

        def read(out: Any = out) -> None:
            for line in out:
                written.append(int(line))

        reader = threading.Thread(target=read)
        reader.start()
        # From while it starts (the schema being made) to well into its writes.
        time.sleep(rng.uniform(0.0, 0.4))
        w.kill()
        w.wait()
        reader.join()
        out.close()
    assert len(written) > 100, "the writer hardly wrote: the test tests nothing"
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = {int(n[1:]) for (n,) in raw.execute("SELECT name FROM jobs")}
    assert set(written) <= kept
    # A job's classes come with it or not at all (one transaction).
    orphans = raw.execute("SELECT COUNT(*) FROM classes WHERE job NOT IN (SELECT id FROM jobs)")
    assert orphans.fetchone()[0] == 0


# -- larkns run jobs ------------------------------------------------------------


def _ledger_rows(world: World) -> list[dict[str, Any]]:
    with Ledger(world.lib_dir / "ledger.sqlite", create=False) as db:
        return db.jobs()


def test_a_larkns_run_jobs_row_equals_its_json_report(clean_lworld: World, tmp_path: Path) -> None:
    n4, size4, reply4, n6, size6, reply6 = 12, 900, 300, 5, 600, 1100
    proc, rep = run_job(
        clean_lworld,
        tmp_path,
        "sh",
        "-c",
        f"{PY} {PEER} udp {SITE4} {PORT} {n4} {size4} {reply4} && "
        f"{PY} {PEER} udp {SITE6} {PORT} {n6} {size6} {reply6}; exit 3",
        name="lktlrow",
        LARKNS_CLASSES=CLASSES,
    )
    assert proc.returncode == 3, proc.stderr
    (row,) = [r for r in _ledger_rows(clean_lworld) if r["name"] == "lktlrow"]
    fam = rep["families"]
    assert (row["bytes_in"], row["bytes_out"]) == (
        n4 * (28 + reply4) + n6 * (48 + reply6),
        n4 * (28 + size4) + n6 * (48 + size6),
    )
    assert row["bytes_in"] == rep["bytes"]["incoming"]  # type: ignore[index]
    assert row["packets_out"] == rep["packets"]["outgoing"]  # type: ignore[index]
    for f in ("ipv4", "ipv6"):
        assert row[f"{f}_bytes_in"] == fam[f]["bytes"]["incoming"]  # type: ignore[index]
        assert row[f"{f}_bytes_out"] == fam[f]["bytes"]["outgoing"]  # type: ignore[index]
        assert row[f"{f}_packets_in"] == fam[f]["packets"]["incoming"]  # type: ignore[index]
    site = rep["classes"]["Site"]  # type: ignore[index]
    assert row["classes"]["Site"]["bytes_out"] == site["bytes"]["outgoing"]
    assert row["classes"]["Site"]["bytes_in"] == site["bytes"]["incoming"]
    assert row["dropped_packets"] == rep["dropped"]["packets"]  # type: ignore[index]
    assert row["refused_packets"] == rep["refused"]["packets"]  # type: ignore[index]
    assert (row["exit_code"], row["signal"], row["type"], row["owner"]) == (3, None, "nat", "root")
    assert row["ipv4"] == rep["addresses"]["ipv4"]  # type: ignore[index]
    assert row["ipv6"].split(",") == rep["addresses"]["ipv6"]  # type: ignore[index]
    assert abs(row["ended"] - row["started"] - rep["duration_s"]) < 1e-3
    assert abs(row["ended"] - time.time()) < 30


def test_a_running_job_leaves_samples_and_its_rate_is_drawn(
    clean_lworld: World, tmp_path: Path
) -> None:
    n, size = 40, 1000
    proc, rep = run_job(
        clean_lworld,
        tmp_path,
        "sh",
        "-c",
        f"{PY} {PEER} udp {SITE4} {PORT} {n} {size} 100 && sleep 1.2",
        name="lktlsamp",
        LARKNS_UPDATE_INTERVAL="0.3",
    )
    assert proc.returncode == 0, proc.stderr
    plot = tmp_path / "rate.png"
    out = clean_lworld.larkns(
        "report", "--job", "lktlsamp", "--format", "json", "--plot", str(plot)
    )
    assert out.returncode == 0, out.stderr
    samples = json.loads(out.stdout)["samples"]
    # The start, 2-4 samples, the end; counts only grow, and end as the report's.
    assert len(samples) >= 4
    outs = [s["bytes_out"] for s in samples]
    assert outs == sorted(outs) and outs[-1] == rep["bytes"]["outgoing"] == n * (28 + size)  # type: ignore[index]
    _assert_png(plot)


def test_larkns_run_loads_no_sqlite_before_its_command_starts(clean_lworld: World) -> None:
    code = (
        "import sys\n"
        "from larkns import cli, run\n"
        "spawn = run._spawn_and_wait\n"
        "def seen(*a, **k):\n"
        "    print('sqlite3' in sys.modules, 'larkns.ledger' in sys.modules)\n"
        "    return spawn(*a, **k)\n"
        "run._spawn_and_wait = seen\n"
        "assert cli.main(['run', '--', 'true']) == 0\n"
        "print('sqlite3' in sys.modules)\n"
    )
    out = subprocess.run(
        clean_lworld.worker_cmd(PY, "-c", code),
        env=clean_lworld.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


def test_report_totals_equal_the_sum_of_the_jobs(clean_lworld: World, tmp_path: Path) -> None:
    for i, n in enumerate((3, 7)):
        proc, _ = run_job(
            clean_lworld,
            tmp_path,
            PY,
            PEER,
            "udp",
            SITE4,
            str(PORT),
            str(n),
            "500",
            "200",
            name=f"lktlsum{i}",
            LARKNS_CLASSES=CLASSES,
        )
        assert proc.returncode == 0, proc.stderr
    rows = _ledger_rows(clean_lworld)
    for by in ("owner", "type", "job", "day", "class"):
        out = clean_lworld.larkns("report", "--by", by, "--format", "json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        for col in ("bytes_in", "bytes_out", "jobs"):
            assert sum(r[col] for r in data["rows"]) == data["total"][col], (by, col)
        if by != "class":
            assert data["total"]["bytes_out"] == sum(r["bytes_out"] for r in rows)
            assert data["total"]["jobs"] == len(rows)
    table = clean_lworld.larkns("report", "--by", "job").stdout
    assert "lktlsum1" in table and table.splitlines()[-2].startswith("total")


# -- report formats -------------------------------------------------------------


@pytest.fixture()
def synthetic(tmp_path: Path) -> Iterator[Path]:
    """A ledger of 60 jobs of three owners over the last 5 hours."""
    path = tmp_path / "ledger.sqlite"
    now = time.time()
    with Ledger(path) as db:
        for i in range(60):
            db.add_job(
                _job(
                    i,
                    now - i * 300,
                    owner=("alice", "bob", "carol")[i % 3],
                    acct_group=("cms", "atlas")[i % 2],
                    traffic=_traffic(10**6 * i, 10**5 * i, {"Site": (10 * i, i)}),
                )
            )
    yield path


def _report(path: Path, *args: str) -> str:
    out = io.StringIO()
    env = {"LARKNS_LEDGER": str(path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        stdout = sys.stdout
        sys.stdout = out
        try:
            code = cli.main(["report", *args])
        finally:
            sys.stdout = stdout
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0
    return out.getvalue()


def test_the_table_is_aligned_in_human_units_with_a_total_line(synthetic: Path) -> None:
    text = _report(synthetic, "--by", "owner")
    lines = text.splitlines()
    head, body, rule, total = lines[0], lines[1:4], lines[4], lines[5]
    assert head.split()[:2] == ["OWNER", "JOBS"]
    assert {b.split()[0] for b in body} == {"alice", "bob", "carol"}
    assert total.startswith("total") and " 60 " in total
    # The rule under the rows marks each column; numbers are right-aligned
    # to its end, the first column left-aligned to its start.
    spans = [(m.start(), m.end()) for m in re.finditer("-+", rule)]
    assert len(spans) == 8
    for line in (head, *body, total):
        assert len(line) == len(rule)
        assert line[0] != " "
        assert all(line[end - 1] != " " for _, end in spans[1:])
    assert "MB" in total and "Mbit/s" in total
    assert set(rule) <= {"-", " "}


def test_csv_and_json_round_trip_with_stable_columns(synthetic: Path) -> None:
    data = json.loads(_report(synthetic, "--by", "group", "--format", "json"))
    assert data["columns"] == list(ledger_report.COLUMNS)
    rows = list(csv.DictReader(io.StringIO(_report(synthetic, "--by", "group", "--format", "csv"))))
    assert [tuple(r) for r in rows] == [ledger_report.COLUMNS] * 2
    for c, j in zip(rows, data["rows"], strict=True):
        assert {k: str(v) for k, v in j.items()} == c
    assert {r["key"] for r in data["rows"]} == {"cms", "atlas"}
    assert (
        sum(r["bytes_in"] for r in data["rows"])
        == data["total"]["bytes_in"]
        == 10**6 * sum(range(60))
    )
    assert data["rows"][0]["last_end"].endswith("Z")  # ISO 8601, UTC


def test_top_and_since_select_and_the_total_covers_what_was_selected(synthetic: Path) -> None:
    data = json.loads(
        _report(synthetic, "--by", "job", "--top", "5", "--since", "1h", "--format", "json")
    )
    # Jobs ended every 5 minutes: 12 within the hour, the 5 largest shown.
    assert data["groups"] == 12 and len(data["rows"]) == 5
    assert data["total"]["jobs"] == 12
    assert [r["key"] for r in data["rows"]] == ["j11", "j10", "j9", "j8", "j7"]


@pytest.mark.parametrize("by", ["owner", "hour"])
def test_plots_are_png_files_with_something_in_them(
    synthetic: Path, tmp_path: Path, by: str
) -> None:
    plot = tmp_path / f"{by}.png"
    _report(synthetic, "--by", by, "--plot", str(plot))
    _assert_png(plot)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # axes, titles, bars: not a blank image


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--since", "yesterday"], "--since: expected an ISO 8601"),
        (["--until", "2024-13-01"], "--until: expected an ISO 8601"),
        (["--since", "1d", "--until", "2d"], "--since: 1d is not before --until"),
        (["--by", "user"], "--by"),
        (["--top", "0"], "--top"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(
    synthetic: Path, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ["LARKNS_LEDGER"] = str(synthetic)
    try:
        assert cli.main(["report", *args]) == cli.EXIT_LARKNS
    finally:
        del os.environ["LARKNS_LEDGER"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_when_takes_iso_dates_times_and_ages() -> None:
    now = 1_700_000_000.0
    assert ledger_report.parse_when("7d", "--since", now) == now - 7 * DAY
    assert ledger_report.parse_when("24h", "--since", now) == now - DAY
    assert ledger_report.parse_when("2024-05-01T00:00Z", "--since", now) == 1714521600.0
    assert ledger_report.parse_when("2024-05-01T02:00+02:00", "--since") == 1714521600.0
    with pytest.raises(ConfigError):
        ledger_report.parse_when("-7d", "--since", now)


def test_a_progress_bar_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    pipe, tty = io.StringIO(), Tty()
    for stream in (pipe, tty):
        bar = ledger_report.Progress("condor_history", 100, stream)
        for i in range(1, 101):
            bar.update(i)
        bar.close()
    assert pipe.getvalue() == ""
    assert "100/100 (100%)" in tty.getvalue() and "\r" in tty.getvalue()
