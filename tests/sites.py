"""Site networks beyond the plain world, for tests and benchmarks.

- bridged_site: the worker's uplink is a port of a bridge that holds the
  worker's addresses (as on a site whose jobs join its network), and the site
  runs a router (radvd) and a DHCP server (dnsmasq, which writes only its
  own lease file, under a temporary directory).
- v6only_site: the worker has no IPv4; the site runs a NAT64 (tayga).

Every process started here is stopped by pid on the way out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.world import SITE4, SITE6, WORKER4, WORKER6, World, sh

BRIDGE = "lktbr0"
BRIDGE_POOL = "198.18.0.128/26"
DHCP_RANGE = ("198.18.0.192", "198.18.0.223")
NAT64 = "2001:db8:64::/96"
PLAT_POOL = "198.18.100.0/24"  # the IPv4 addresses the site's NAT64 sends from
RADVD = """
interface down0 {
    AdvSendAdvert on;
    MinRtrAdvInterval 3;
    MaxRtrAdvInterval 10;
    prefix 2001:db8:0:1::/64 { AdvOnLink on; AdvAutonomous on; };
};
"""


def missing(*tools: str) -> str | None:
    """Why these tools cannot be used, or None."""
    gone = [t for t in tools if shutil.which(t) is None]
    return f"{' and '.join(gone)} not installed (setup.sh installs them)" if gone else None


def _ns_exec(ns: str, *cmd: str) -> subprocess.Popen[bytes]:
    # `ip netns exec` execs the command itself: the Popen's pid is the tool's.
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _wait_link(ns: str, name: str) -> None:
    deadline = time.monotonic() + 5
    while name not in sh("ip", "-o", "link", ns=ns).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not appear in {ns}")
        time.sleep(0.02)


class Dhcp:
    """The site's DHCP server (dnsmasq), which a test may restart."""

    def __init__(self, w: World, tmp: Path, t1: int) -> None:
        self.w = w
        self.tmp = tmp
        self.t1 = t1
        self.leases = tmp / "leases"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, first: str = DHCP_RANGE[0], last: str = DHCP_RANGE[1]) -> None:
        self.stop()
        self.proc = _ns_exec(
            self.w.site, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
            "--user=root", "--interface=down0", "--bind-interfaces", "--no-ping",
            # Refuses (NAK) a lease it does not know, as a site's server does.
            "--dhcp-authoritative",
            f"--dhcp-range={first},{last},255.255.255.0,120s",
            f"--dhcp-leasefile={self.leases}", f"--pid-file={self.tmp / 'dnsmasq.pid'}",
            f"--dhcp-option=option:router,{SITE4}",
            # Renewals every t1 s, so a test sees them (the lease is 2 min,
            # dnsmasq's shortest).
            f"--dhcp-option=option:T1,{self.t1}", f"--dhcp-option=option:T2,{self.t1 + 1}",
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def bridged_site(w: World, t1: int = 2) -> Iterator[Dhcp]:
    """Make `w` a bridged site; yields its DHCP server."""
    tmp = Path(tempfile.mkdtemp(prefix="lktsite-"))
    dhcp = Dhcp(w, tmp, t1)
    radvd: subprocess.Popen[bytes] | None = None
    try:
        ns = w.worker
        sh("ip", "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay",
           "0", ns=ns)  # fmt: skip
        # Set by hand: a bridge otherwise takes the lowest of its ports' MACs.
        sh("ip", "link", "set", BRIDGE, "address", "02:6c:6b:ff:00:01", ns=ns)
        sh("sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.accept_dad=0", ns=ns)
        sh("ip", "addr", "flush", "dev", "up0", ns=ns)
        sh("ip", "link", "set", "up0", "master", BRIDGE, ns=ns)
        sh("ip", "addr", "add", f"{WORKER4}/24", "dev", BRIDGE, ns=ns)
        sh("ip", "addr", "add", f"{WORKER6}/64", "dev", BRIDGE, "nodad", ns=ns)
        sh("ip", "link", "set", BRIDGE, "up", ns=ns)
        sh("ip", "route", "replace", "default", "via", SITE4, "dev", BRIDGE, ns=ns)
        sh("ip", "-6", "route", "replace", "default", "via", SITE6, "dev", BRIDGE, ns=ns)
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=w.site)
        dhcp.start()
        conf = tmp / "radvd.conf"
        conf.write_text(RADVD)
        radvd = _ns_exec(w.site, "radvd", "-n", "-C", str(conf), "-p", str(tmp / "radvd.pid"))
        yield dhcp
    finally:
        dhcp.stop()
        if radvd is not None:
            radvd.kill()
            radvd.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def v6only_site(w: World) -> Iterator[None]:
    """Make `w`'s worker IPv6-only, with a NAT64 in the site."""
    tmp = Path(tempfile.mkdtemp(prefix="lktsite-"))
    plat: subprocess.Popen[bytes] | None = None
    try:
        sh("ip", "addr", "del", f"{WORKER4}/24", "dev", "up0", ns=w.worker)
        conf = tmp / "plat.conf"
        conf.write_text(
            "tun-device lktnat64\n"
            "ipv4-addr 198.18.100.1\n"
            f"prefix {NAT64}\n"
            f"dynamic-pool {PLAT_POOL}\n"
            f"data-dir {tmp}\n"
        )
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=w.site)
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=w.site)
        plat = _ns_exec(w.site, "tayga", "--nodetach", "-c", str(conf))
        _wait_link(w.site, "lktnat64")
        sh("ip", "link", "set", "lktnat64", "up", ns=w.site)
        sh("ip", "route", "add", PLAT_POOL, "dev", "lktnat64", ns=w.site)
        sh("ip", "-6", "route", "add", NAT64, "dev", "lktnat64", ns=w.site)
        yield
    finally:
        if plat is not None:
            plat.kill()
            plat.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def required(why: str | None) -> None:
    """Skip the calling test for `why`, except under CI, where it fails."""
    import pytest

    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {why}")
    pytest.skip(why)
