"""larkns-condor-config: the HTCondor configuration that puts every job of a
node in a network namespace of its own, with this installation's paths.

    larkns-condor-config > /etc/condor/config.d/50-larkns.conf
    condor_reconfig

Site admins, the Vagrant boxes (vagrant/provision.sh) and the end-to-end
tests all configure their pools with it: what is tested is what is shipped.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from larkns.config import KNOBS

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

# The wrapper publishes NetworkIncoming/NetworkOutgoing, LarkNetworkType and
# the job's addresses through chirp: every job needs the I/O proxy (schedd).
JOB_TRANSFORM_NAMES = $(JOB_TRANSFORM_NAMES) LarkNS
JOB_TRANSFORM_LarkNS @=end
   SET WantIOProxy true
@end
"""


class UsageError(Exception):
    pass


def render(
    bindir: Path,
    larknsd: str | None = None,
    wrapper: str | None = None,
    prepare_hook: str | None = None,
    machine_ad: str | None = None,
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
        wrapper=wrapper or bindir / "larkns-wrapper",
        prepare_hook=prepare_hook or bindir / "larkns-prepare-job",
        machine_ad=machine_ad or bindir / "larkns-machine-ad",
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
    if name.upper().startswith("LARKNS_") and name.upper() not in {
        *KNOBS,
        "LARKNS_HOOK_PREPARE_JOB",
        "LARKNS_SOCKET",
    }:
        raise UsageError(f"--set: {name} is no larkns knob (known: {', '.join(KNOBS)})")
    return name, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="larkns-condor-config",
        description="print the HTCondor configuration that enables larkns on this node",
    )
    ap.add_argument(
        "--bindir",
        type=Path,
        default=Path(sys.argv[0]).resolve().parent,
        help="where larkns's programs are (default: beside this one)",
    )
    ap.add_argument("--larknsd", help="the daemon, for --under-master (default: BINDIR/larknsd)")
    ap.add_argument("--wrapper", help="the USER_JOB_WRAPPER (default: BINDIR/larkns-wrapper)")
    ap.add_argument(
        "--prepare-hook", help="the PREPARE_JOB hook (default: BINDIR/larkns-prepare-job)"
    )
    ap.add_argument("--machine-ad", help="the startd cron job (default: BINDIR/larkns-machine-ad)")
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
    try:
        for path in (args.larknsd, args.wrapper, args.prepare_hook, args.machine_ad):
            if path is not None and not os.path.isabs(path):
                raise UsageError(f"expected an absolute path, got {path!r}")
        text = render(
            args.bindir,
            args.larknsd,
            args.wrapper,
            args.prepare_hook,
            args.machine_ad,
            args.under_master,
            args.cron_period,
            args.set,
        )
    except UsageError as e:
        print(f"larkns-condor-config: error: {e}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
        return 0
    tmp = args.output.with_name(f".{args.output.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
