"""`larkns report --plot FILE.png`: matplotlib, imported only here and only
when asked for (it is an optional extra: `pip install larkns[plot]`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from larkns.config import ConfigError
from larkns.ledger_report import Summary, iso

# Bars past this many are unreadable: the largest are drawn, the rest said.
MAX_BARS = 30


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot: needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _unit(largest: float) -> tuple[float, str]:
    for scale, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, name
    return 1.0, "bytes"


def _span(s: Summary) -> str:
    return f"{iso(s.since) or 'start'} to {iso(s.until) or 'now'}"


def summary(s: Summary, path: str) -> None:
    """The grouping as bars (in and out side by side); by day or hour a
    stacked series of in and out over time."""
    plt = _pyplot()
    fig = _series(plt, s) if s.by in ("day", "hour") else _bars(plt, s)
    _save(fig, path)
    plt.close(fig)


def _bars(plt: Any, s: Summary) -> Any:
    rows = s.rows[:MAX_BARS]
    keys = ["-" if r["key"] is None else str(r["key"]) for r in rows]
    largest = max([max(r["bytes_in"], r["bytes_out"]) for r in rows] or [0])
    scale, unit = _unit(largest)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["bytes_in"] / scale for r in rows], 0.4, label="in (download)")
    ax.bar([i + 0.2 for i in x], [r["bytes_out"] / scale for r in rows], 0.4, label="out (upload)")
    ax.set_xticks(list(x), keys, rotation=30 if len(rows) > 4 else 0, ha="right")
    ax.set_ylabel(f"traffic ({unit})")
    ax.set_xlabel(s.by)
    more = f", the top {len(rows)} of {s.groups}" if s.groups > len(rows) else ""
    ax.set_title(f"Job network traffic by {s.by}{more}\n{_span(s)}")
    ax.legend()
    fig.tight_layout()
    return fig


def _series(plt: Any, s: Summary) -> Any:
    fmt = "%Y-%m-%d" if s.by == "day" else "%Y-%m-%dT%H:00Z"
    times = [datetime.strptime(str(r["key"]), fmt).replace(tzinfo=UTC) for r in s.rows]
    largest = max([r["bytes_in"] + r["bytes_out"] for r in s.rows] or [0])
    scale, unit = _unit(largest)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if times:
        ax.stackplot(
            times,
            [r["bytes_in"] / scale for r in s.rows],
            [r["bytes_out"] / scale for r in s.rows],
            labels=["in (download)", "out (upload)"],
            step="post",
        )
    ax.set_ylabel(f"traffic ({unit} per {s.by})")
    ax.set_xlabel(f"{s.by} the jobs ended (UTC)")
    ax.set_title(f"Job network traffic per {s.by}\n{_span(s)}")
    ax.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def job_rate(job: dict[str, Any], points: list[dict[str, Any]], path: str) -> None:
    """One job's rate over time, from its samples."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    start = points[0]["t"]
    # Each rate holds from the point before to this one: drawn as steps.
    minutes = [(p["t"] - start) / 60 for p in points]
    ax.step(minutes, [p["rate_in_bps"] / 1e6 for p in points], where="pre", label="in (download)")
    ax.step(minutes, [p["rate_out_bps"] / 1e6 for p in points], where="pre", label="out (upload)")
    ax.set_xlabel("minutes since the job started")
    ax.set_ylabel("rate (Mbit/s)")
    who = job.get("global_job_id") or job["name"]
    ax.set_title(f"Network rate of job {who} ({job.get('owner') or '-'}), from {iso(start)}")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig: Any, path: str) -> None:
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise ConfigError(f"--plot: cannot write {path}: {e.strerror}") from None
