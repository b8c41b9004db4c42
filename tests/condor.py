"""A real one-node HTCondor pool for end-to-end tests.

The pool runs from the build in ../shared/htcondor (or an installed HTCondor)
inside the world's worker namespace, so its jobs' networks and NAT never touch
the real host.  It also gets a mount namespace of its own, in which /etc/passwd
and /etc/group are bind-mounted copies that add the test's users (the
pool's `lktcondor` and the submitting `lktuser`), and /etc/resolv.conf one
that names a loopback resolver (127.0.0.53): no host file is written.

Everything is under one temporary directory, removed by `close()` with every
process of the pool (found by its mount namespace, all started by us).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

from tests.world import ROOT, World

RESOLVER = "127.0.0.53"
CONDOR_UID = 64500
USER_UID = 64501
TARBALLS = sorted(glob.glob(str(ROOT.parent / "shared" / "htcondor" / "condor-*.tar.xz")))


def larkns_config(*args: str) -> str:
    """The pool's larkns configuration, made as a site makes it
    (larkns-condor-config, which vagrant/provision.sh runs too)."""
    import sys

    tool = Path(sys.executable).parent / "larkns-condor-config"
    done = subprocess.run([str(tool), *args], capture_output=True, text=True, check=True)
    return done.stdout


def release_source() -> str | None:
    """The tarball (preferred) or an installed HTCondor's prefix; None if neither."""
    if TARBALLS:
        return TARBALLS[-1]
    master = shutil.which("condor_master")
    if master is not None:
        return str(Path(master).resolve().parent.parent)
    return None


def require_htcondor() -> None:
    """Skip the calling test when no HTCondor is found, except under CI
    (CI set), where these tests are required."""
    import pytest

    if release_source() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no HTCondor was found (../shared/htcondor/condor-*.tar.xz)")
        pytest.skip(
            "no HTCondor: neither ../shared/htcondor/condor-*.tar.xz nor condor_master on PATH"
        )


class Pool:
    """A one-node pool, configured and started; with start=False, configured
    only (start() then), so that larknsd can read its configuration first."""

    def __init__(self, world: World, extra_config: str = "", start: bool = True) -> None:
        source = release_source()
        if source is None:
            raise RuntimeError(
                "no HTCondor found (no ../shared/htcondor/condor-*.tar.xz, no condor_master)"
            )
        self.world = world
        # Readable by the pool's users, who must traverse it.
        self.dir = Path(tempfile.mkdtemp(prefix="lktpool-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.master: subprocess.Popen[bytes] | None = None
        self.mnt_ino: int | None = None
        try:
            self.release = self._release(source)
            self._users()
            self.config = self._config(extra_config)
            if start:
                self._start()
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- building ----------------------------------------------------------

    def _release(self, source: str) -> Path:
        if not source.endswith(".tar.xz"):
            return Path(source)
        subprocess.run(["tar", "-xJf", source, "-C", str(self.dir)], check=True)
        (top,) = [p for p in self.dir.iterdir() if p.name.startswith("condor-")]
        return top

    def _users(self) -> None:
        etc = self.dir / "etc"
        etc.mkdir()
        self.home = self.dir / "home"
        self.home.mkdir()
        os.chown(self.home, USER_UID, USER_UID)
        passwd = Path("/etc/passwd").read_text().rstrip("\n") + (
            f"\nlktcondor:x:{CONDOR_UID}:{CONDOR_UID}:lkt pool:/nonexistent:/usr/sbin/nologin"
            f"\nlktuser:x:{USER_UID}:{USER_UID}:lkt submitter:{self.home}:/bin/sh\n"
        )
        group = Path("/etc/group").read_text().rstrip("\n") + (
            f"\nlktcondor:x:{CONDOR_UID}:\nlktuser:x:{USER_UID}:\n"
        )
        (etc / "passwd").write_text(passwd)
        (etc / "group").write_text(group)
        # The node's resolver is a local one, as with systemd-resolved.
        (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
        for f in ("passwd", "group", "resolv.conf"):
            (etc / f).chmod(0o644)

    def _config(self, extra: str) -> Path:
        local = self.dir / "local"
        for sub in ("", "log", "spool", "execute", "lock", "run"):
            d = local / sub
            d.mkdir(exist_ok=True)
            os.chown(d, CONDOR_UID, CONDOR_UID)
            d.chmod(0o755)
        config = self.dir / "condor_config"
        config.write_text(
            textwrap.dedent(f"""\
            RELEASE_DIR = {self.release}
            LOCAL_DIR = {local}
            LOG = $(LOCAL_DIR)/log
            SPOOL = $(LOCAL_DIR)/spool
            EXECUTE = $(LOCAL_DIR)/execute
            LOCK = $(LOCAL_DIR)/lock
            RUN = $(LOCAL_DIR)/run
            use ROLE : CentralManager
            use ROLE : Submit
            use ROLE : Execute
            use SECURITY : Recommended_v9_0
            CONDOR_HOST = 127.0.0.1
            NETWORK_INTERFACE = 127.0.0.1
            CONDOR_IDS = {CONDOR_UID}.{CONDOR_UID}
            ENABLE_KERNEL_TUNING = false
            SEC_DEFAULT_AUTHENTICATION_METHODS = FS, IDTOKENS
            ALLOW_READ = *
            ALLOW_WRITE = *
            ALLOW_ADMINISTRATOR = *
            START = TRUE
            SUSPEND = FALSE
            PREEMPT = FALSE
            KILL = FALSE
            UPDATE_INTERVAL = 2
            SCHEDD_INTERVAL = 2
            NEGOTIATOR_INTERVAL = 2
            NEGOTIATOR_CYCLE_DELAY = 2
            STARTER_UPDATE_INTERVAL = 2
            SHADOW_QUEUE_UPDATE_INTERVAL = 2
            NUM_CPUS = 2
            # No JVM probe: it would leave /tmp/hsperfdata_lktcondor behind.
            JAVA =
            """)
            + self._installed_layout()
            + extra
        )
        return config

    def _installed_layout(self) -> str:
        """Where an installed HTCondor (packages: RELEASE_DIR /usr) keeps its
        libexec and lib, which its own condor_config would have said; a
        tarball's are where the defaults look."""
        lines = []
        for knob, places in (
            ("LIBEXEC", ("libexec/condor", "lib/condor/libexec")),
            ("LIB", ("lib64/condor", "lib/condor")),
        ):
            if (self.release / knob.lower()).is_dir():
                continue
            found = next((p for p in places if (self.release / p).is_dir()), None)
            if found is not None:
                lines.append(f"{knob} = {self.release / found}\n")
        return "".join(lines)

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.release}/bin:{self.release}/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CONDOR_CONFIG": str(self.config),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
        }

    def _start(self) -> None:
        # The master's mount namespace: the users' passwd/group, all else the
        # host's (slave propagation: namespaces larkns mounts later show up).
        script = (
            f"mount --bind {self.dir}/etc/passwd /etc/passwd && "
            f"mount --bind {self.dir}/etc/group /etc/group && "
            f"mount --bind {self.dir}/etc/resolv.conf /etc/resolv.conf && "
            f"exec {self.release}/sbin/condor_master -f"
        )
        cmd = self.world.worker_cmd(
            "unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script
        )
        self.master = subprocess.Popen(
            cmd, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while True:
            if self.master.poll() is not None:
                raise RuntimeError(f"condor_master exited with {self.master.returncode}")
            with contextlib.suppress(OSError):
                ino = os.stat(f"/proc/{self.master.pid}/ns/mnt").st_ino
                if ino != os.stat("/proc/self/ns/mnt").st_ino:
                    self.mnt_ino = ino
                    if (
                        self.run("condor_q", "-totals", check=False).returncode == 0
                        and self._has_startd()
                    ):
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("the pool did not come up within 30 s")
            time.sleep(0.2)

    def _has_startd(self) -> bool:
        out = self.run("condor_status", "-af", "Name", check=False).stdout
        return bool(out.strip())

    # -- using -------------------------------------------------------------

    def run(
        self, *cmd: str, user: bool = False, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A command in the pool's namespaces, as root or as the submitting user."""
        assert self.master is not None
        # --wd: entering a mount namespace otherwise leaves us in its "/"
        prefix = ["nsenter", "-t", str(self.master.pid), "-m", "-n", f"--wd={self.home}", "--"]
        if user:
            prefix += ["setpriv", f"--reuid={USER_UID}", f"--regid={USER_UID}", "--init-groups"]
        return subprocess.run(
            [*prefix, *cmd],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            cwd=self.home,
        )

    def submit(self, description: str) -> int:
        """Submit as the unprivileged user; returns the cluster id."""
        sub = self.home / f"job{time.monotonic_ns()}.sub"
        sub.write_text(textwrap.dedent(description))
        os.chown(sub, USER_UID, USER_UID)
        done = self.run("condor_submit", "-terse", str(sub), user=True, check=False)
        if done.returncode != 0:
            # What the submit said, and what the schedd last wrote: a pool
            # that stops taking jobs says why only there.
            log = self.dir / "local" / "log" / "SchedLog"
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            raise AssertionError(
                f"condor_submit exited {done.returncode}: {done.stderr.strip()}\n" + "\n".join(tail)
            )
        return int(done.stdout.strip().split(".")[0])

    def wait_done(self, cluster: int, timeout: float = 120) -> dict[str, str]:
        """The job's history ad once it has left the queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ad = self.history(cluster)
            if ad:
                return ad
            time.sleep(0.5)
        raise AssertionError(f"job {cluster} did not finish within {timeout} s")

    def history(self, cluster: int) -> dict[str, str]:
        out = self.run("condor_history", "-l", str(cluster), check=False).stdout
        return _parse_ad(out)

    def queue_ad(self, cluster: int) -> dict[str, str]:
        return _parse_ad(self.run("condor_q", "-l", str(cluster), check=False).stdout)

    # -- stopping ----------------------------------------------------------

    def pids(self) -> list[int]:
        """Processes of the pool: those in its mount namespace."""
        if self.mnt_ino is None:
            return [self.master.pid] if self.master and self.master.poll() is None else []
        want = f"mnt:[{self.mnt_ino}]"
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/mnt") == want:
                        out.append(int(entry))
        return out

    def close(self) -> None:
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGQUIT)  # condor_master: fast shutdown
            try:
                self.master.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.master.kill()
                self.master.wait()
        # Daemons or jobs the master left behind (all started by this pool).
        deadline = time.monotonic() + 10
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)


def _parse_ad(text: str) -> dict[str, str]:
    ad: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            ad[key.strip()] = value.strip().strip('"')
    return ad
