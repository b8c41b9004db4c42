"""A CLAT (464XLAT) in a job's namespace, for workers without IPv4: the
job's IPv4 is 192.0.0.1, which tayga translates to IPv6 from the job's /64
toward the site's NAT64 prefix.  nat and routed jobs use it alike.

tayga because jool needs a kernel module (absent here, and not on every
production kernel); tayga runs anywhere, at the cost of one small process
per job.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import ipaddress
import os
import pwd
import select
import socket
import sys
import time
from typing import TYPE_CHECKING

from larkns import core
from larkns.kernel import netns, rtnl, sysctl
from larkns.kernel.rtnl import Rtnl
from larkns.modes.base import Failures, SetupError
from larkns.plan import LINK_LOCAL, eui64

if TYPE_CHECKING:
    from larkns.engine import Engine

# The job's IPv4 address (RFC 7335), the translator's own, and the interface
# id of the job's translated IPv6 address.
JOB4 = ipaddress.IPv4Interface("192.0.0.1/32")
SELF4 = ipaddress.IPv4Address("192.0.0.2")
IID = 0x464
TUN = "clat"
# All tayga needs before it drops to its user: its tun device, then
# setgid, setuid and chroot.
CAPS = frozenset({core.CAP_NET_ADMIN, core.CAP_SETGID, core.CAP_SETUID, core.CAP_SYS_CHROOT})
# The CLATs' own user, made by setup.sh: a job's packets reach no file or
# process of any other user through a subverted tayga.
USER = "larkns-tayga"
# How long a worker's "has no IPv4 default route" is believed.
UPLINK_RECHECK = 5.0


def address(prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """The IPv6 address a job's IPv4 traffic leaves from (in its /64)."""
    return prefix.network_address + IID


class Clat:
    """The CLATs of one larkns process's jobs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tayga: dict[str, int] = {}  # CLATs this process started: pidfds
        self._v4_uplink: tuple[float, bool] | None = None

    def needed(self) -> bool:
        """Whether jobs get IPv4 through a CLAT: LARKNS_CLAT on, or auto on a
        worker without an IPv4 default route (looked at every few seconds)."""
        settings = self.engine.settings
        if settings.clat != "auto":
            return settings.clat == "on"
        now = time.monotonic()
        if self._v4_uplink is None or now - self._v4_uplink[0] > UPLINK_RECHECK:
            has = bool(self.engine.ipr.get_default_routes(family=socket.AF_INET))
            self._v4_uplink = (now, has)
        return not self._v4_uplink[1]

    @staticmethod
    def prepare() -> None:
        """In the job's namespace: it forwards between its CLAT and its link;
        a forwarding link takes RAs only with accept_ra=2."""
        sysctl.write("ipv6/conf/default/accept_ra", 2)
        sysctl.write("ipv6/conf/all/forwarding", 1)

    def start(
        self,
        name: str,
        ns_name: str,
        nat64: ipaddress.IPv6Network,
        clat6: ipaddress.IPv6Address,
        job_mac: str,
        job: Rtnl,
        host_idx: int,
    ) -> None:
        """tayga in the job's namespace, its routes on both sides."""
        import shutil  # only here: with bz2, lzma and zlib, ~2 ms of every start

        tayga = shutil.which("tayga", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if tayga is None:
            raise SetupError(
                "this worker has no IPv4: jobs need a CLAT, and tayga is not installed"
            )
        engine = self.engine
        engine.rtnl.run(
            rtnl.route(ipaddress.IPv6Network(clat6), host_idx, eui64(LINK_LOCAL, job_mac))
        )
        conf = engine.journal.clat_config(name)
        # tayga parses every packet the job sends: once its tun device is
        # open it runs as a user of its own, without capabilities, chrooted
        # to an empty directory it cannot write (its data-dir).
        root = engine.journal.clat_root(name)
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o555)
        user, group = clat_user()
        conf.write_text(
            f"tun-device {TUN}\n"
            f"ipv4-addr {SELF4}\n"
            f"prefix {nat64}\n"
            f"map {JOB4.ip} {clat6}\n"
            f"data-dir {root}\n"
        )
        ns_fd = os.open(netns.path(ns_name), os.O_RDONLY | os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            spec = core.SpawnSpec(
                path=tayga,
                argv=[
                    *("tayga", "--nodetach", "-c", str(conf)),
                    *("--user", user, "--group", group, "--chroot"),
                ],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                ns_fds=[ns_fd],
                groups=(),
                stdio=(null, null, null),
                new_session=True,
                caps=CAPS,
            )
            _pid, pidfd = core.spawn(spec)
        finally:
            os.close(ns_fd)
            os.close(null)
        self._tayga[name] = pidfd
        deadline = time.monotonic() + 3
        # poll, not select: select cannot watch an fd above 1023, and larknsd
        # may have thousands open.
        ended = select.poll()
        ended.register(pidfd, select.POLLIN)
        while (tun := job.link_index(TUN)) is None:
            if time.monotonic() > deadline or ended.poll(2):
                raise SetupError("the job's CLAT (tayga) did not start")
        job.run(
            rtnl.link_up(tun, "CLAT"),
            rtnl.address(tun, JOB4),
            rtnl.route(ipaddress.IPv4Network("0.0.0.0/0"), tun),
            rtnl.route(ipaddress.IPv6Network(clat6), tun),
        )

    def reap(self, name: str, failures: Failures) -> None:
        """After the job's namespace is gone (tayga was killed with
        everything in it): reap it, if this process started it."""
        pidfd = self._tayga.pop(name, None)
        if pidfd is not None:
            with failures.step(f"CLAT of {name}"):
                try:
                    os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
                finally:
                    os.close(pidfd)

    def close(self) -> None:
        # CLATs outlive this process with their jobs; a later one tears them
        # down with the job's namespace.
        for pidfd in self._tayga.values():
            os.close(pidfd)
        self._tayga.clear()


@functools.cache
def clat_user() -> tuple[str, str]:
    """The user and group tayga runs as: USER's, else nobody's (said
    once per process: a node that was not set up by setup.sh)."""
    for name in (USER, "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        try:
            group = grp.getgrgid(pw.pw_gid).gr_name
        except KeyError:
            continue
        if name != USER:
            print(
                f"larkns: no user {USER} (setup.sh makes it): CLATs run as {name}:{group}",
                file=sys.stderr,
            )
        return name, group
    raise SetupError(f"no user {USER} and no user nobody to run the job's CLAT as")
