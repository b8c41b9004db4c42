"""larkns-condor-config: the HTCondor configuration that puts every job of a
node in a network namespace of its own, with this installation's paths, and
the job-side programs it names.

    larkns-condor-config -o /etc/condor/config.d/50-larkns.conf
    condor_reconfig

HTCondor runs the wrapper and the PREPARE_JOB hook as the job's owner with
the job's environment.  So they are not Python console scripts (whose
interpreter would take PYTHONPATH, and whose dynamic loader LD_PRELOAD, from
that environment) but copies of larkns-entry, a static C program
(csrc/entry.c), installed here into ENTRY_DIR with larkns-job.conf beside
them: larknsd's socket, and the Python that runs the machine ad's cron job.
Only root may write there.

Site admins, the Vagrant boxes (vagrant/provision.sh) and the end-to-end
tests all configure their pools with it: what is tested is what is shipped.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
from pathlib import Path

from larkns.config import DEFAULT_SOCKET, KNOBS, UsageError

#: The job-side programs: copies of larkns-entry, each knowing its role by name.
ENTRIES = ("larkns-wrapper", "larkns-prepare-job", "larkns-machine-ad")
ENTRY_CONF = "larkns-job.conf"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_PERIOD = re.compile(r"[0-9]+[smh]?")

TEMPLATE = """\
# larkns: every job in a network namespace of its own.
# Made by larkns-condor-config; put it in the HTCondor config.d/ of each
# worker node (the schedd's transform belongs on the access point), then
# condor_reconfig.

# larknsd runs under systemd (hooks/larknsd.service) or under condor_master,
# which starts it as root (it stops by itself if the master goes):
{master}DAEMON_LIST = $(DAEMON_LIST) LARKNSD
{master}LARKNSD = {larknsd}

# The job is started by larknsd, in its own network, through this wrapper.
USER_JOB_WRAPPER = {wrapper}

# The network is built before the job starts; when it cannot be, the job is
# held with the reason (HookStatusCode 190).  STARTER_JOB_HOOK_KEYWORD (not
# _DEFAULT_) so that a job's +HookKeyword cannot skip it.
STARTER_JOB_HOOK_KEYWORD = LARKNS
LARKNS_HOOK_PREPARE_JOB = {prepare_hook}

# What the node offers, in the machine ad (LarkAvailable, LarkNetworkTypes,
# LarkHasIPv4, LarkHasIPv6): jobs can require it.
STARTD_CRON_JOBLIST = $(STARTD_CRON_JOBLIST) LARKNS
STARTD_CRON_LARKNS_EXECUTABLE = {machine_ad}
STARTD_CRON_LARKNS_PERIOD = {cron_period}

# larknsd publishes NetworkIncoming/NetworkOutgoing, LarkAssignedNetworkType
# and the job's addresses through the starter's chirp server: every job needs
# the I/O proxy (a schedd transform: put it on the access point).  A job
# cannot write these attributes itself: larkns's chirp relay refuses its
# Network* and Lark* updates.
JOB_TRANSFORM_NAMES = $(JOB_TRANSFORM_NAMES) LarkNS
JOB_TRANSFORM_LarkNS @=end
   SET WantIOProxy true
@end
"""


def render(
    bindir: Path,
    entry_dir: Path,
    larknsd: str | None = None,
    under_master: bool = False,
    cron_period: str = "5m",
    settings: list[str] | None = None,
) -> str:
    """The configuration text; `settings` are NAME=VALUE lines added at the end."""
    if not _PERIOD.fullmatch(cron_period):
        raise UsageError(
            f"--cron-period: expected seconds or e.g. 30s, 5m, 1h, got {cron_period!r}"
        )
    text = TEMPLATE.format(
        master="" if under_master else "# ",
        larknsd=larknsd or bindir / "larknsd",
        wrapper=entry_dir / "larkns-wrapper",
        prepare_hook=entry_dir / "larkns-prepare-job",
        machine_ad=entry_dir / "larkns-machine-ad",
        cron_period=cron_period,
    )
    extra = [_setting(s) for s in settings or []]
    if extra:
        text += "\n# This node's choices.\n" + "".join(f"{n} = {v}\n" for n, v in extra)
    return text


def _setting(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not _NAME.fullmatch(name):
        raise UsageError(f"--set: expected NAME=VALUE, got {item!r}")
    if "\n" in value:
        raise UsageError(f"--set {name}: a value is one line")
    upper = name.upper()
    if upper.startswith("LARKNS_") and upper not in {*KNOBS, "LARKNS_HOOK_PREPARE_JOB"}:
        raise UsageError(f"--set: {name} is no larkns knob (known: {', '.join(KNOBS)})")
    if upper in KNOBS:
        # Checked here as larknsd will check it: a bad value is found now,
        # not when the node starts its first job.
        from larkns.config import ConfigError, Settings

        try:
            Settings().with_overrides({upper: value})
        except ConfigError as e:
            raise UsageError(f"--set: {e}") from None
    return upper if upper in KNOBS else name, value


def socket_of(settings: list[str]) -> str:
    """larknsd's socket as the --set knobs give it."""
    found = DEFAULT_SOCKET
    for item in settings:
        name, value = _setting(item)
        if name == "LARKNS_SOCKET":
            found = value
    return found


def install_entries(entry_dir: Path, python: str, pythonpath: str | None, sock: str) -> None:
    """Copies of larkns-entry under the names HTCondor runs, and their
    larkns-job.conf, in a directory only root can write to."""
    source = Path(__file__).resolve().parent.parent / "larkns-entry"
    if not source.is_file():
        raise UsageError(f"{source} is missing: larkns was installed without its C programs")
    for path, what in ((python, "--python"), (pythonpath, "--pythonpath")):
        if path is not None and (not os.path.isabs(path) or any(c in path for c in "\n\0")):
            raise UsageError(f"{what}: expected an absolute path, got {path!r}")
    entry_dir.mkdir(parents=True, exist_ok=True)
    st = entry_dir.stat()
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Anyone else who may write there could put their own program under
        # the wrapper's name.
        raise UsageError(f"{entry_dir}: must be root's and writable by root only")
    conf = f"python={python}\nsocket={sock}\n" + (
        f"pythonpath={pythonpath}\n" if pythonpath else ""
    )
    _write(entry_dir / ENTRY_CONF, conf.encode(), 0o644)
    data = source.read_bytes()
    for name in ENTRIES:
        # Execute-only: a process that runs a file it may not read is not
        # dumpable from its first instruction (the kernel's rule), so none of
        # the job owner's processes can trace the wrapper.
        _write(entry_dir / name, data, 0o711)


def _write(path: Path, data: bytes, mode: int) -> None:
    """`path` replaced whole (a job starting meanwhile sees the old or the new)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="larkns-condor-config",
        description="install the job-side programs and print the HTCondor configuration "
        "that enables larkns on this node",
    )
    ap.add_argument(
        "--bindir",
        type=Path,
        default=Path(sys.argv[0]).resolve().parent,
        help="where larknsd is (default: beside this program)",
    )
    ap.add_argument(
        "--entry-dir",
        type=Path,
        help="where the wrapper, the PREPARE_JOB hook and the machine ad's cron job are "
        "installed (default: BINDIR/../libexec/larkns); only root may write there",
    )
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="the Python that runs them (default: this one)",
    )
    ap.add_argument(
        "--pythonpath", help="a directory holding the larkns package, if that Python lacks it"
    )
    ap.add_argument(
        "--no-install",
        action="store_true",
        help="only print the configuration; do not install the job-side programs",
    )
    ap.add_argument("--larknsd", help="the daemon, for --under-master (default: BINDIR/larknsd)")
    ap.add_argument(
        "--under-master", action="store_true", help="have condor_master run larknsd (DAEMON_LIST)"
    )
    ap.add_argument("--cron-period", default="5m", help="how often the machine ad is refreshed")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a knob of this node, e.g. LARKNS_CLASSES='Campus = 198.18.0.0/15'",
    )
    ap.add_argument("-o", "--output", type=Path, help="write to this file (default: stdout)")
    args = ap.parse_args(argv)
    entry_dir = args.entry_dir or args.bindir.parent / "libexec" / "larkns"
    try:
        for path in (args.larknsd, args.entry_dir):
            if path is not None and not os.path.isabs(path):
                raise UsageError(f"expected an absolute path, got {str(path)!r}")
        text = render(
            args.bindir, entry_dir, args.larknsd, args.under_master, args.cron_period, args.set
        )
        if not args.no_install:
            install_entries(entry_dir, args.python, args.pythonpath, socket_of(args.set))
    except UsageError as e:
        print(f"larkns-condor-config: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"larkns-condor-config: error: {e}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
        return 0
    _write(args.output, text.encode(), 0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
