"""A CLAT (464XLAT) in a job's namespace, for workers without IPv4: the
job's IPv4 is 192.0.0.1, translated to IPv6 from the job's /64 toward the
site's NAT64 prefix.  nat and routed jobs use it alike.

Two translators:
- bpf: two tc programs on the job's end of its link (csrc/clat.bpf.c), one
  pair for all of a process's jobs, no process per job, and the kernel's
  offloads kept (TCP segments stay 64 KiB through translation).  The job
  cannot remove them: it has no CAP_NET_ADMIN in its namespace.
- tayga: a process per job, in userspace, behind a tun device (two copies of
  every packet): 0.85-0.90 Gbit/s of TCP here, 0.08x the job's native IPv6.
  The fallback where the programs were not built (no clang) or the kernel
  will not load them; jool would need a kernel module.
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
from larkns.kernel.mac import parse as parse_mac
from larkns.kernel.rtnl import Rtnl
from larkns.modes.base import Failures, SetupError
from larkns.plan import LINK_LOCAL, eui64

if TYPE_CHECKING:
    from larkns.engine import Engine

# The job's IPv4 address (RFC 7335), the translator's own (tayga's; the
# kernel-side CLAT's gateway), and the interface id of the job's translated
# IPv6 address.
JOB4 = ipaddress.IPv4Interface("192.0.0.1/32")
SELF4 = ipaddress.IPv4Address("192.0.0.2")
# With the kernel-side CLAT, the job's link holds 192.0.0.1 in the /29 of
# RFC 7335, so that 192.0.0.2, the gateway, is on it.
JOB4_LINK = ipaddress.IPv4Interface("192.0.0.1/29")
# The job's link MTU (a veth's default, which larkns does not change), and
# the job's IPv4 route MTU under the kernel-side CLAT: 20 bytes less for the
# larger header, 8 for a fragment header, so that every packet the job's
# kernel makes fits once translated (1472, as Android's clatd uses).
LINK_MTU = 1500
ROUTE_MTU4 = LINK_MTU - 28
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
        self._bpf_jobs: dict[str, str] = {}  # kernel-side CLATs set up here: MACs

    def translator(self) -> str:
        """Which translator a new job's CLAT is: "bpf" or "tayga"
        (LARKNS_CLAT_TRANSLATOR; auto: bpf where it can be loaded)."""
        choice = self.engine.settings.clat_translator
        if choice == "tayga":
            return "tayga"
        # Only here: a job without a CLAT loads no tc code (larkns run).
        from larkns.kernel import clatbpf

        why = clatbpf.unavailable()
        if why is None:
            return "bpf"
        if choice == "bpf":
            raise SetupError(
                f"LARKNS_CLAT_TRANSLATOR=bpf: the kernel-side CLAT cannot be used: {why}"
            )
        return "tayga"

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
    def prepare(translator: str) -> None:
        """In the job's namespace, for tayga: it forwards between its CLAT
        and its link; a forwarding link takes RAs only with accept_ra=2.
        (The kernel-side CLAT needs no forwarding.)"""
        if translator == "tayga":
            sysctl.write("ipv6/conf/default/accept_ra", 2)
            sysctl.write("ipv6/conf/all/forwarding", 1)

    def start_bpf(
        self,
        name: str,
        nat64: ipaddress.IPv6Network,
        clat6: ipaddress.IPv6Address,
        job_mac: str,
        host_mac: str,
        job: Rtnl,
        job_idx: int,
        host_idx: int,
    ) -> None:
        """The kernel-side CLAT: the job's entry in the programs' map, its
        IPv4 address, gateway and route on its link, the programs on it."""
        from larkns.kernel import clatbpf

        try:
            bpf = clatbpf.shared()
        except clatbpf.ObjectError as e:
            raise SetupError(f"the kernel-side CLAT could not be loaded: {e}") from None
        self._route_to(clat6, job_mac, host_idx)
        bpf.add(job_mac, clat6, nat64, LINK_MTU)
        self._bpf_jobs[name] = job_mac
        job.run(
            rtnl.address(job_idx, JOB4_LINK),
            rtnl.neighbour(job_idx, SELF4, parse_mac(host_mac)),
            rtnl.route(ipaddress.IPv4Network("0.0.0.0/0"), job_idx, SELF4, mtu=ROUTE_MTU4),
            *bpf.filters(job_idx, "the job's link"),
        )

    def _route_to(self, clat6: ipaddress.IPv6Address, job_mac: str, host_idx: int) -> None:
        """The worker's route to the job's CLAT address: its link-local, on
        the host end of its link (both translators)."""
        self.engine.rtnl.run(
            rtnl.route(ipaddress.IPv6Network(clat6), host_idx, eui64(LINK_LOCAL, job_mac))
        )

    @staticmethod
    def untranslated(job: Rtnl, job_idx: int) -> int:
        """The packets the kernel-side CLAT of the job behind `job` (an
        rtnetlink socket in its namespace) dropped as untranslatable."""
        from larkns.kernel import tc

        return tc.clsact_drops(job, job_idx) or 0

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
        self._route_to(clat6, job_mac, host_idx)
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
        everything in it): reap it, if this process started it; forget the
        job's entry in the kernel-side CLAT's map, if this process made it.
        (A job set up by another process has its entry in that process's
        map, which goes with the last of its jobs' programs.)"""
        mac = self._bpf_jobs.pop(name, None)
        if mac is not None:
            from larkns.kernel import clatbpf

            with failures.step(f"kernel-side CLAT entry of {name}"):
                clatbpf.shared().remove(mac)
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
        # Kernel-side CLATs work on without this process: the programs and
        # map stay while a job's filter holds them.  The process's own fds
        # of them are the process's (clatbpf.shared), kept for its other
        # engines.
        self._bpf_jobs.clear()


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
