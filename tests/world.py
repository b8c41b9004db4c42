"""A small simulated world for tests and benchmarks.

    site netns  (198.18.0.1/24, 2001:db8:0:1::1/64, runs the servers)
       |  veth
    worker netns  (198.18.0.2/24, 2001:db8:0:1::2/64; larkns runs here,
                   so forwarding and NAT never touch the real host)
       |  veth per job (made by larkns)
    job netns ...

Everything is named with a per-world prefix that starts with "lkt", and
`close()` removes it all; `leftovers()` lists whatever of it is still there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = str(Path(__file__).resolve().parent / "peer.py")
RATE = str(Path(__file__).resolve().parent / "rate.py")
SITE4 = "198.18.0.1"
WORKER4 = "198.18.0.2"
SITE6 = "2001:db8:0:1::1"
WORKER6 = "2001:db8:0:1::2"
PORT = 7777


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True)


def larkns_bin() -> str:
    found = Path(sys.executable).parent / "larkns"
    if found.exists():
        return str(found)
    which = shutil.which("larkns")
    if which is None:
        raise RuntimeError("larkns is not installed in this environment (pip install -e .)")
    return which


class World:
    def __init__(self, prefix: str = "lkt") -> None:
        self.id = secrets.token_hex(2)
        self.prefix = f"{prefix}{self.id}"
        self.site = f"{self.prefix}-site"
        self.worker = f"{self.prefix}-worker"
        self.state_dir = Path(f"/run/{self.prefix}-state")
        # What larkns keeps across reboots (the seal key, a host's ULA
        # prefix): the world's own, never the host's /var/lib/larkns.
        self.lib_dir = Path(f"/run/{self.prefix}-lib")
        self.netns_prefix = f"{self.prefix}-job-"
        self.ipv4_pool = "198.19.0.0/24"
        self.ipv6_prefix = "fd00:6c6b:7400::/48"
        self.server: subprocess.Popen[str] | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        sh("ip", "netns", "add", self.site)
        sh("ip", "netns", "add", self.worker)
        sh(
            "ip",
            "link",
            "add",
            "up0",
            "netns",
            self.worker,
            "type",
            "veth",
            "peer",
            "name",
            "down0",
            "netns",
            self.site,
        )
        for ns, link, a4, a6 in (
            (self.site, "down0", SITE4, SITE6),
            (self.worker, "up0", WORKER4, WORKER6),
        ):
            sh("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", ns=ns)
            sh("sysctl", "-qw", f"net.ipv6.conf.{link}.accept_dad=0", ns=ns)
            sh("ip", "addr", "add", f"{a4}/24", "dev", link, ns=ns)
            sh("ip", "addr", "add", f"{a6}/64", "dev", link, "nodad", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("ip", "link", "set", link, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", SITE4, ns=self.worker)
        sh("ip", "-6", "route", "add", "default", "via", SITE6, ns=self.worker)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.site, sys.executable, PEER, "serve", str(PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        if self.server.stdout.readline().strip() != "ready":
            raise RuntimeError("site server did not start")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            LARKNS_STATE_DIR=str(self.state_dir),
            LARKNS_LIB_DIR=str(self.lib_dir),
            LARKNS_NETNS_PREFIX=self.netns_prefix,
            LARKNS_IPV4_POOL=self.ipv4_pool,
            LARKNS_IPV6_PREFIX=self.ipv6_prefix,
        )
        return env

    def worker_cmd(self, *cmd: str) -> list[str]:
        """cmd run in the worker's network namespace, in the host's mount namespace.

        nsenter rather than `ip netns exec`: the latter makes a private mount
        namespace, where the job namespaces larkns mounts under /run/netns
        would not be seen from outside.
        """
        return ["nsenter", f"--net=/run/netns/{self.worker}", "--", *cmd]

    def larkns(
        self,
        *args: str,
        timeout: float = 60,
        cwd: str | None = None,
        knobs: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.worker_cmd(larkns_bin(), *args),
            env=self.env() | (knobs or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )

    def larkns_popen(
        self,
        *args: str,
        knobs: dict[str, str] | None = None,
        stdin: bool = False,
        cwd: str | None = None,
    ) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.worker_cmd(larkns_bin(), *args),
            cwd=cwd,
            env=self.env() | (knobs or {}),
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def serving(self, *args: str, knobs: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`larkns run ARGS` whose command prints "ready" (tests/peer.py serve)
        once it listens; returned then."""
        p = self.larkns_popen(*args, knobs=knobs)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            p.kill()
            raise AssertionError(f"the job's server did not start: {p.communicate()[1]}")
        return p

    @contextlib.contextmanager
    def on_site(self, *args: str) -> Iterator[None]:
        """`python ARGS` on the site, for the while: once it prints "ready"."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.site, sys.executable, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{' '.join(args)} did not start on the site")
            yield
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()

    def rate_sink(self, port: int) -> contextlib.AbstractContextManager[None]:
        """tests/rate.py's sink on the site, on `port`, for the while."""
        return self.on_site(RATE, "sink", str(port))

    def leftovers(self) -> list[str]:
        """Objects of larkns's jobs still present in this world."""
        left = [f"netns {n}" for n in _netns_names() if n.startswith(self.netns_prefix)]
        links = sh("ip", "-o", "link", "show", ns=self.worker, check=False).stdout
        left += [
            f"link {line.split(': ')[1].split('@')[0]}"
            for line in links.splitlines()
            if ": lk-" in line or ": lkb" in line or ": lkshare" in line
        ]
        # the uplink's share: larkns's filter (and clsact) on the uplink
        uplink = sh("tc", "qdisc", "show", "dev", "up0", ns=self.worker, check=False).stdout
        if "clsact" in uplink:
            left.append(f"qdisc clsact on up0: {uplink.strip()}")
        tables = sh("nft", "list", "tables", ns=self.worker, check=False).stdout
        left += [f"nft {t}" for t in tables.splitlines() if t.strip()]
        if self.state_dir.exists():
            # the last job out removes the whole state dir
            left += [
                f"state {p.relative_to(self.state_dir)}" for p in sorted(self.state_dir.rglob("*"))
            ]
            left.append(f"state dir {self.state_dir}")
        return left

    def wait_no_leftovers(self, timeout: float = 10.0) -> list[str]:
        # A deleted namespace takes its veth with it asynchronously: in the
        # kernel's netns cleanup work, which lags by seconds when many
        # namespaces go at once (a whole test run's worth).
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftovers()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            if self.server.stdout:
                self.server.stdout.close()
        for n in _netns_names():
            if n.startswith(self.netns_prefix):
                _kill_netns_pids(n)
                sh("ip", "netns", "del", n, check=False)
        for ns in (self.worker, self.site):
            _kill_netns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
        for d in (self.state_dir, self.lib_dir):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(d)


def _netns_names() -> list[str]:
    try:
        return os.listdir("/run/netns")
    except FileNotFoundError:
        return []


def _kill_netns_pids(ns: str) -> None:
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
