"""larkns command line: run, list, show, top, check, teardown, gc, doctor, verify, report."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn

from larkns import config
from larkns.config import ConfigError, Settings, UsageError

if TYPE_CHECKING:
    import argparse

# larkns's own failures exit 125, as `docker run` and `timeout` do, so they
# can be told from the command's exit status.
EXIT_LARKNS = 125


# `larkns run`'s options that take a value (`--privileged` takes none), for
# quick_run below; parser() declares them.
RUN_VALUE_OPTIONS = (
    "--mode",
    "--name",
    "--user",
    "--json-report",
    "--ipv4-pool",
    "--ipv6-prefix",
    "--policy",
    "--bandwidth",
    "--weight",
)


def parser() -> argparse.ArgumentParser:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(f"{self.prog}: {message}")

    p = _Parser(
        prog="larkns",
        description="A network namespace of its own for every job, accounted byte by byte.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    r = sub.add_parser(
        "run",
        help="run a command in a network of its own",
        usage="larkns run [options] -- CMD [ARG...]",
    )
    r.add_argument(
        "--mode",
        default=None,
        help="nat (default), routed (no NAT: addresses the site routes here), "
        "or none (loopback only)",
    )
    r.add_argument(
        "--name", default=None, help="job name (default: random); the host link is lk-NAME"
    )
    r.add_argument("--user", default=None, help="run the command as this user")
    r.add_argument(
        "--privileged",
        action="store_true",
        help="WARNING: give the command every capability of root, with which it can "
        "leave its network (enter the worker's namespaces, change or reset its own "
        "counters, load modules...); by default it keeps only what acts in its own "
        "network and files (ping, raw sockets, low ports, chown, su)",
    )
    r.add_argument(
        "--json-report", default=None, metavar="FILE", help="write the report as JSON to FILE"
    )
    r.add_argument(
        "--policy",
        default=None,
        help="where the command may send: open (default), internal-only or closed, then "
        "+SET/-SET terms naming LARKNS_DESTINATIONS sets (LARKNS_POLICY for this job)",
    )
    r.add_argument("--ipv4-pool", default=None, help="LARKNS_IPV4_POOL for this job")
    r.add_argument("--ipv6-prefix", default=None, help="LARKNS_IPV6_PREFIX for this job")
    r.add_argument(
        "--bandwidth",
        default=None,
        metavar="DOWN[/UP]",
        help="cap the job's download (and upload: UP, default DOWN), e.g. 100mbit/20mbit "
        "(at most LARKNS_BANDWIDTH_MAX; default LARKNS_BANDWIDTH)",
    )
    r.add_argument(
        "--weight",
        default=None,
        help="the job's weight, 1 to 100, in the uplink's share (with "
        "LARKNS_UPLINK_BANDWIDTH; default LARKNS_WEIGHT, else 1)",
    )
    r.add_argument("argv", nargs=argparse.REMAINDER, help="the command")

    sub.add_parser("list", help="jobs with a network")
    for verb, text in (
        ("show", "a job's network and counters"),
        ("check", "verify a job's network is whole"),
        ("teardown", "remove a job's network"),
    ):
        s = sub.add_parser(verb, help=text)
        s.add_argument("name")
    t = sub.add_parser("top", help="live jobs by their current rates, redrawn (q quits)")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.add_argument(
        "--interval", default="1", metavar="SECONDS", help="between two readings (default 1)"
    )
    sub.add_parser("gc", help="remove whatever jobs that are gone left behind")
    sub.add_parser("doctor", help="which kernel features larkns can use here")
    rp = sub.add_parser(
        "report",
        help="the ledger's jobs added up: by job, owner, group, class, type, day or hour",
        description="Jobs that ended on this node (its ledger), or in the whole pool "
        "(--from-history), added up.",
    )
    rp.add_argument("--since", metavar="WHEN", help="ISO 8601 date/time or age (7d, 24h)")
    rp.add_argument("--until", metavar="WHEN", help="ISO 8601 date/time or age (default: now)")
    rp.add_argument(
        "--by", default="owner", choices=("job", "owner", "group", "class", "type", "day", "hour")
    )
    rp.add_argument("--format", default="table", choices=("table", "csv", "json"))
    rp.add_argument("--top", type=int, metavar="N", help="only the N largest rows")
    rp.add_argument("--plot", metavar="FILE.png", help="also draw it (needs matplotlib)")
    rp.add_argument("--job", metavar="NAME", help="one job's rate over time, from its samples")
    rp.add_argument(
        "--from-history",
        action="store_true",
        help="the pool's jobs, from condor_history, instead of this node's ledger",
    )
    v = sub.add_parser(
        "verify",
        help="whether a job ad's counts are those this node's larknsd sealed "
        "(condor_history -l JOB | larkns verify)",
    )
    v.add_argument("ad", nargs="?", default="-", help="the ad in long form (default: stdin)")
    return p


def _require_root(verb: str) -> None:
    if os.geteuid() != 0:
        raise ConfigError(
            f"larkns {verb} must run as root (it manages network namespaces and nftables)"
        )


_FLAG_KNOBS = {
    "mode": "LARKNS_NETWORK_TYPE",
    "ipv4_pool": "LARKNS_IPV4_POOL",
    "ipv6_prefix": "LARKNS_IPV6_PREFIX",
    "policy": "LARKNS_POLICY",
}


def _settings(args: SimpleNamespace) -> Settings:
    settings = config.load()
    for attr, knob in _FLAG_KNOBS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        try:
            settings = settings.with_overrides({knob: value})
        except ConfigError as e:
            # Name the flag the user typed, not the knob behind it.
            raise ConfigError(str(e).replace(knob, "--" + attr.replace("_", "-"), 1)) from None
    return settings


def cmd_run(args: SimpleNamespace) -> int:
    from larkns.run import RunRequest, run

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("larkns run: no command given (larkns run [options] -- CMD [ARG...])")
    settings = _settings(args)
    bandwidth = None
    if args.bandwidth is not None:
        from larkns.shaping import job_cap, parse_cap

        bandwidth = parse_cap(args.bandwidth, "--bandwidth")
        job_cap(settings, bandwidth)  # refused now, before anything else
    if args.weight is not None:
        from larkns.shaping import parse_weight

        settings = dataclasses.replace(settings, weight=parse_weight(args.weight, "--weight"))
    _require_root("run")
    # os.urandom, as secrets.token_hex does: importing secrets (hmac, OpenSSL's
    # _hashlib) costs ~4 ms of every `larkns run`.
    name = "j" + os.urandom(4).hex() if args.name is None else config.check_name(args.name)
    return run(
        settings,
        RunRequest(
            argv=argv,
            mode=settings.mode,
            name=name,
            user=args.user,
            json_report=args.json_report,
            privileged=args.privileged,
            bandwidth=bandwidth,
        ),
    )


def cmd_list(args: SimpleNamespace) -> int:
    from larkns.engine import Engine

    _require_root("list")
    with Engine(_settings(args)) as engine:
        records = engine.records()
        if not records:
            return 0
        print(f"{'NAME':<13} {'MODE':<5} {'STATE':<9} {'OWNER':<8} {'IPV4':<16} IPV6")
        for r in records:
            p = r.plan
            owner = f"{r.owner.pid}" + ("" if r.owner.alive() else "!")
            print(
                f"{r.name:<13} {p.mode if p else '-':<5} {r.state:<9} {owner:<8} "
                f"{str(p.planned_ipv4 or '-') if p else '-':<16} "
                f"{str(p.planned_ipv6 or '-') if p else '-'}"
            )
    return 0


def cmd_show(args: SimpleNamespace) -> int:
    import json

    from larkns.engine import Engine

    config.check_name(args.name, "NAME")
    _require_root("show")
    with Engine(_settings(args)) as engine:
        record = engine.journal.read(args.name)
        if record is None:
            raise ConfigError(f"no job named {args.name!r} (see `larkns list`)")
        t = engine.stats(args.name)
        out = record.to_dict()
        out["owner_alive"] = record.owner.alive()
        out["problems"] = engine.check(args.name)
        out["counters"] = {
            "ipv4": {"in": vars(t.ipv4_in), "out": vars(t.ipv4_out)},
            "ipv6": {"in": vars(t.ipv6_in), "out": vars(t.ipv6_out)},
            "link_control": {"in": vars(t.control_in), "out": vars(t.control_out)},
        }
        print(json.dumps(out, indent=2))
    return 0


def cmd_top(args: SimpleNamespace) -> int:
    from larkns import top

    try:
        interval = float(args.interval)
    except ValueError:
        interval = 0.0
    if not 0.1 <= interval <= 3600:
        raise ConfigError(f"--interval: expected 0.1 to 3600 seconds, got {args.interval!r}")
    _require_root("top")
    return top.main(_settings(args), interval, args.once)


def cmd_check(args: SimpleNamespace) -> int:
    from larkns.engine import Engine

    config.check_name(args.name, "NAME")
    _require_root("check")
    with Engine(_settings(args)) as engine:
        problems = engine.check(args.name)
    for p in problems:
        print(f"larkns: {args.name}: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_teardown(args: SimpleNamespace) -> int:
    from larkns.engine import Engine, TeardownError

    config.check_name(args.name, "NAME")
    _require_root("teardown")
    with Engine(_settings(args)) as engine:
        try:
            if not engine.teardown(args.name):
                # Like a CNI DEL: removing what is not there succeeds.
                print(f"larkns: no job named {args.name!r}; nothing to remove", file=sys.stderr)
        except TeardownError as e:
            for p in e.problems:
                print(f"larkns: {args.name}: still there: {p}", file=sys.stderr)
            print(
                f"larkns: {args.name}: kept in the journal (`larkns gc` tries again)",
                file=sys.stderr,
            )
            return 1
    return 0


def cmd_gc(args: SimpleNamespace) -> int:
    from larkns.engine import Engine

    _require_root("gc")
    with Engine(_settings(args)) as engine:
        swept = engine.gc()
    for line in swept.removed:
        print(f"removed {line}")
    for line in swept.left:
        print(f"larkns: gc could not remove {line}", file=sys.stderr)
    return 1 if swept.left else 0


def cmd_doctor(args: SimpleNamespace) -> int:
    from larkns import doctor

    return doctor.main(_settings(args))


def cmd_verify(args: SimpleNamespace) -> int:
    """0: sealed and intact; 1: changed after larknsd published them; 2: no seal."""
    from larkns import seal

    _require_root("verify")
    text = sys.stdin.read() if args.ad == "-" else open(args.ad).read()  # noqa: SIM115
    ad: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            ad[name.strip()] = value
    try:
        secret = seal.key(_settings(args).lib_dir, create=False)
    except FileNotFoundError:
        raise ConfigError("this node has no seal key: its larknsd has sealed nothing") from None
    why = seal.verify(secret, ad)
    job = ad.get("GlobalJobId", "the job")
    if why is None:
        print(f"{job}: sealed by this node's larknsd; the counts are intact")
        return 0
    print(f"{job}: {why}")
    return 2 if why.startswith("no ") else 1


def cmd_report(args: SimpleNamespace) -> int:
    import time

    from larkns import ledger_report as lr
    from larkns.ledger import Ledger, LedgerError

    now = time.time()
    since = None if args.since is None else lr.parse_when(args.since, "--since", now)
    until = None if args.until is None else lr.parse_when(args.until, "--until", now)
    if since is not None and until is not None and since >= until:
        raise UsageError(f"--since: {args.since} is not before --until {args.until}")
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top: expected a number of rows from 1, got {args.top}")
    if args.job is not None and args.from_history:
        raise UsageError("--job: the samples are in this node's ledger, not in condor_history")
    try:
        if args.from_history:
            from larkns.condor import history

            db = Ledger(":memory:")
            db.add_jobs(history.jobs(since, until, args.by == "class", lr.Progress))
            source = "condor_history"
        else:
            path = _settings(args).ledger_path
            if path is None:
                raise ConfigError("LARKNS_LEDGER is off: this node keeps no ledger")
            db = Ledger(path, create=False)
            source = str(path)
    except LedgerError as e:
        raise ConfigError(str(e)) from None
    with db:
        if args.job is not None:
            return _report_job(args, db)
        summary = lr.summarize(db, args.by, since, until, args.top, source)
    if args.plot:
        from larkns import plots

        plots.summary(summary, args.plot)
    if args.format == "csv":
        sys.stdout.write(lr.to_csv(summary.rows))
    elif args.format == "json":
        print(lr.to_json(summary))
    else:
        print(lr.table(summary))
    return 0


def _report_job(args: SimpleNamespace, db: Any) -> int:
    import json

    from larkns import ledger_report as lr
    from larkns.report import human_bytes

    job = lr.find_job(db, args.job)
    points = lr.job_rates(db, job)
    if args.plot:
        from larkns import plots

        plots.job_rate(job, points, args.plot)
    if args.format == "csv":
        sys.stdout.write(lr.to_csv(points, lr.SAMPLE_COLUMNS))
    elif args.format == "json":
        print(json.dumps({"job": job, "samples": points}, indent=2))
    else:
        who = job["global_job_id"] or job["name"]
        print(f"job {who} ({job['owner'] or '-'}), {job['type']}")
        for p in points:
            print(
                f"{p['time']}  in {human_bytes(p['bytes_in']):>9}  out "
                f"{human_bytes(p['bytes_out']):>9}  {lr.mbits(p['rate_in_bps']):>14} in  "
                f"{lr.mbits(p['rate_out_bps']):>14} out"
            )
    return 0


VERBS = {
    "run": cmd_run,
    "list": cmd_list,
    "show": cmd_show,
    "top": cmd_top,
    "check": cmd_check,
    "teardown": cmd_teardown,
    "gc": cmd_gc,
    "doctor": cmd_doctor,
    "verify": cmd_verify,
    "report": cmd_report,
}


def quick_run(argv: list[str]) -> SimpleNamespace | None:
    """`[--debug] run [OPTION VALUE | OPTION=VALUE | --privileged]... [CMD...]`,
    parsed as parser() would, without argparse: importing it and building
    the parser cost ~5 ms of every `larkns run`.  None for anything else
    (help, an abbreviated or unknown option, a value that starts with "-", a
    missing value), which argparse then parses, or explains."""
    i = 1 if argv[:1] == ["--debug"] else 0
    if argv[i : i + 1] != ["run"]:
        return None
    args = SimpleNamespace(debug=i == 1, verb="run", privileged=False)
    for option in RUN_VALUE_OPTIONS:
        setattr(args, option[2:].replace("-", "_"), None)
    i += 1
    # As argparse.REMAINDER: the command is everything from "--" (kept) or
    # from the first word that is no option.
    while i < len(argv) and argv[i] != "--" and argv[i].startswith("-"):
        option, eq, value = argv[i].partition("=")
        if option == "--privileged" and not eq:
            args.privileged = True
        elif option in RUN_VALUE_OPTIONS:
            if not eq:
                if i + 1 == len(argv) or argv[i + 1].startswith("-"):
                    return None
                i += 1
                value = argv[i]
            setattr(args, option[2:].replace("-", "_"), value)
        else:
            return None
        i += 1
    args.argv = argv[i:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = (
        "--debug" in args_list[: args_list.index("--")]
        if "--" in args_list
        else "--debug" in args_list
    )
    try:
        args = quick_run(args_list) or parser().parse_args(args_list, SimpleNamespace())
        return VERBS[args.verb](args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"larkns: error: {_message(e)}", file=sys.stderr)
        return EXIT_LARKNS


def console() -> NoReturn:
    """The `larkns` program: main(), then the process ends at once.

    What larkns allocates while it starts (~16k objects: modules, classes,
    its plan) lives until it ends, so collecting garbage meanwhile is wasted
    work (~5 ms of a `larkns run -- true` on a 2-core VM), and so is tearing
    the interpreter down at the end (freeing all of it: 25-30 ms), when every
    kernel object, file and thread of larkns's is already removed, closed or
    stopped.  run.py turns the collector back on once the command runs, for
    a job may last days; the other verbs end within seconds.
    """
    gc.disable()
    code = main()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        # What the interpreter's own exit does when its output is lost.
        code = code or 120
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def _message(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, ConfigError | UsageError):
        return text.removeprefix("larkns: ")
    return text.splitlines()[0]


if __name__ == "__main__":
    console()
