"""Vagrant for real: vagrant/ brings up a Debian 12 box here, provisions it
(HTCondor from ../shared/htcondor's build, or the file LARKNS_HTCONDOR
names; larkns; larknsd) and runs vagrant/e2e-check.sh against the box's own
HTCondor.

    python -m tests.vm.vagrant [--install-deps] [--rebuild-box] [--box-only]

The box is the VM tier's Debian 12 image (tests/vm/runner.py builds and
caches it) made a Vagrant box for libvirt (tests/vm/box/): sshd, sudo, rsync
and the QEMU guest agent added, a `vagrant` user with a key of its own,
booted from the image's own kernel; cached beside the image, made again when
the image or its recipe changes.  --box-only makes it and says where it is:
any vagrant-libvirt can use it (`vagrant box add --name NAME FILE`).

The run: a throwaway unprivileged user (lkgvagrant) in a network namespace
of its own (lkgvag-PID, nothing in it but its loopback) runs Debian's
vagrant with vagrant-libvirt against its own libvirt (qemu:///session,
QEMU's emulation, QEMU's user-mode networking: tests/vm/box/
session.Vagrantfile), in a copy of this checkout: `vagrant up debian12`,
whose output streams here as `vagrant SECONDS| ...` lines, then `vagrant
destroy -f`, one guest at a time on the machine (the VM tier's lock).
The guest reaches apt and PyPI through an HTTP proxy this runner serves on
the namespace's loopback (tests/vm/egress.py); nothing of the host's
network changes.  Then the user's processes (libvirtd, virtlogd,
QEMU), its home (the box, libvirt's volumes, the copy) and the namespace
go, on failure, timeout and SIGTERM too; what a SIGKILLed run left, the next
run ends first.

Exit status: 0 when `vagrant up` provisioned the box and the check passed;
1 otherwise; SKIP (77) with one "Vagrant test skipped:" line when this
machine cannot run it (not root, no QEMU or vagrant-libvirt, no space).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.vm import runner as vm
from tests.vm.egress import Proxy

BOX_FILES = Path(__file__).resolve().parent / "box"
BOX_NAME = "larkns/debian12-local"
MACHINE = "debian12"
# What a .box holds: Vagrant's metadata, the box's Vagrantfile, its disk, the
# kernel and initramfs it boots, the key Vagrant logs in with.
BOX_MEMBERS = ("metadata.json", "Vagrantfile", "box.img", "vmlinuz", "initrd.img", "vagrant_key")
USER = "lkgvagrant"
NETNS_PREFIX = "lkgvag-"
SSH_PORT = 2222
# The registries' proxy (tests/vm/egress.py) on the namespace's loopback, as
# the guest sees it: QEMU's user-mode gateway.
PROXY_PORT = 3128
GUEST_PROXY = f"http://10.0.2.2:{PROXY_PORT}"
# What the host needs beside the VM tier's tools, and its Debian packages.
HOST_TOOLS = {
    "vagrant": "vagrant",
    "virsh": "libvirt-clients",
    "libvirtd": "libvirt-daemon",
    "qemu-img": "qemu-utils",
    "rsync": "rsync",
    "ssh": "openssh-client",
    "setpriv": "util-linux",
    "unshare": "util-linux",
}
PLUGIN_PACKAGE = "vagrant-libvirt"
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
PROVISIONER = re.compile(rf"==> {MACHINE}: Running provisioner: (\S+)")
# Terminal controls in vagrant's progress lines.
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def say(msg: str) -> None:
    print(f"vagrant: {msg}", flush=True)


# -- what this machine has -------------------------------------------------


def which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def has_plugin() -> bool:
    """vagrant-libvirt, as Debian installs it (vagrant finds it there too)."""
    if which("dpkg-query") is None:
        return False
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", PLUGIN_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.endswith("installed")


def install_deps() -> None:
    """The VM tier's tools (QEMU, mmdebstrap), vagrant, vagrant-libvirt and
    a libvirt daemon (no system service: the package without recommends
    starts none)."""
    vm.install_tools()
    missing = {p for t, p in HOST_TOOLS.items() if which(t) is None}
    if not has_plugin():
        missing.add(PLUGIN_PACKAGE)
    if not missing or shutil.which("apt-get") is None:
        return
    say(f"installing {' '.join(sorted(missing))}")
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *sorted(missing)],
        env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
        check=False,
    )


def preflight(need_image: bool, need_box: bool) -> None:
    if os.geteuid() != 0:
        raise vm.Skip("needs root (the box's image, a user and a network namespace)")
    missing = [t for t in HOST_TOOLS if which(t) is None]
    if need_image:
        missing += vm.missing_tools()
    elif which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64")
    if not has_plugin():
        missing.append(PLUGIN_PACKAGE)
    if missing:
        raise vm.Skip(f"no {', '.join(missing)} (--install-deps installs them with apt)")
    # The image (~1.5 GB used) and the box (~1.2 GB) in the cache; vagrant's
    # copy of the box, libvirt's and the machine's writes in the user's home.
    for where, need in (
        (vm.cache_dir(), 6.0 * need_image + 2.0 * need_box),
        (Path("/home"), 6.0),
    ):
        have = vm.free_gib(where)
        if have < need:
            raise vm.Skip(f"{have:.1f} GiB free in {where}, needs {need:.0f}")


# -- the box ---------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    dir: Path

    @property
    def file(self) -> Path:
        return self.dir / "debian12.box"

    @property
    def ready(self) -> bool:
        return (self.dir / "ready").exists()


def box_key() -> str:
    """The image it is made of and how: any change makes a new box."""
    h = hashlib.sha256(vm.image_key().encode() + b"\0")
    for f in ("customize.sh", "Vagrantfile"):
        h.update((BOX_FILES / f).read_bytes())
    return h.hexdigest()[:16]


def box() -> Box:
    return Box(vm.cache_dir() / "boxes" / box_key())


def build_box(img: vm.Image, b: Box) -> None:
    """A copy of the image, customised (customize.sh, in a mount namespace
    of its own), as a qcow2 in a .box with the image's kernel, initramfs,
    the box's Vagrantfile and the key customize.sh let in.  Built aside and
    renamed into place."""
    tmp = b.dir.with_name(b.dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        raw = tmp / "root.img"
        # The VM tier may be replacing its image: copy under its lock.
        with vm.locked(vm.cache_dir() / "images" / ".lock", "image build"):
            if not img.ready:
                raise vm.Failed(f"no image at {img.dir}")
            subprocess.run(["cp", "--sparse=always", str(img.disk), str(raw)], check=True)
            for f in ("vmlinuz", "initrd.img"):
                shutil.copy(img.dir / f, tmp / f)
        key = tmp / "vagrant_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", BOX_NAME, "-f", str(key)],
            check=True,
        )
        subprocess.run(
            ["nice", "-n", "19", "unshare", "--mount", "--propagation", "private",
             "bash", str(BOX_FILES / "customize.sh"), str(raw), f"{key}.pub"],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["nice", "-n", "19", "qemu-img", "convert", "-O", "qcow2",
             str(raw), str(tmp / "box.img")],
            check=True,
        )  # fmt: skip
        raw.unlink()
        size_gib = int(vm.IMAGE_SIZE.removesuffix("G"))
        (tmp / "metadata.json").write_text(
            json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": size_gib})
        )
        shutil.copy(BOX_FILES / "Vagrantfile", tmp / "Vagrantfile")
        with tarfile.open(tmp / "debian12.box", "w") as tar:
            for m in BOX_MEMBERS:
                tar.add(tmp / m, arcname=m)
        for m in (*BOX_MEMBERS, "vagrant_key.pub"):
            (tmp / m).unlink()
        (tmp / "ready").write_text(box_key() + "\n")
        shutil.rmtree(b.dir, ignore_errors=True)
        tmp.rename(b.dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Boxes of other images or recipes are stale.
    for other in b.dir.parent.iterdir():
        if other.is_dir() and other != b.dir:
            shutil.rmtree(other, ignore_errors=True)


def ensure_box(rebuild: bool) -> tuple[Box, float | None, float | None]:
    """The box, built (and the image before it) when missing; how long each
    build took (None: cached)."""
    img = vm.image()
    image_s: float | None = None
    if not img.ready:
        with vm.locked(vm.cache_dir() / "images" / ".lock", "image build"):
            if not vm.image().ready:
                say(f"building the VM tier's image {img.dir.name}")
                t = time.monotonic()
                vm.build_image(img)
                image_s = time.monotonic() - t
    b = box()
    box_s: float | None = None
    if rebuild or not b.ready:
        with vm.locked(vm.cache_dir() / "boxes" / ".lock", "box build"):
            if rebuild or not box().ready:
                say(f"making the box {b.dir.name} from the image {img.dir.name}")
                t = time.monotonic()
                build_box(img, b)
                box_s = time.monotonic() - t
    return b, image_s, box_s


# -- the user, its namespace, its libvirt ----------------------------------


def kill_all(pids: list[int]) -> None:
    """SIGTERM, a moment, SIGKILL: processes this run started, by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(50):
            if not any(Path(f"/proc/{p}").exists() for p in pids):
                return
            time.sleep(0.1)


def user_pids(uid: int) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if p.stat().st_uid == uid:
                    pids.append(int(p.name))
    return pids


def netns_pids(name: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def remove_user() -> None:
    """The user and its home, with every process it runs (none but ours)."""
    try:
        uid = pwd.getpwnam(USER).pw_uid
    except KeyError:
        return
    kill_all(user_pids(uid))
    subprocess.run(["userdel", "--remove", USER], stderr=subprocess.DEVNULL, check=False)


def remove_netns(name: str) -> None:
    kill_all(netns_pids(name))
    subprocess.run(["ip", "netns", "delete", name], stderr=subprocess.DEVNULL, check=False)


def clean_stale() -> None:
    """What a run killed outright (SIGKILL) left: its user, and namespaces
    whose runner is gone."""
    remove_user()
    for ns in Path("/run/netns").glob(NETNS_PREFIX + "*"):
        pid = ns.name.removeprefix(NETNS_PREFIX)
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            remove_netns(ns.name)


@dataclass
class Session:
    """An unprivileged user of this run's, and a network namespace with only
    a loopback, in which its vagrant and libvirt run."""

    netns: str = field(default_factory=lambda: f"{NETNS_PREFIX}{os.getpid()}")
    # Short: libvirt's sockets for the guest agent are under it (at most 108
    # bytes a path), and the cache's path is long.
    home: Path = Path("/home") / USER
    uid: int = -1
    gid: int = -1
    env: dict[str, str] = field(default_factory=dict)

    def open(self) -> None:
        clean_stale()
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["useradd", "--create-home", "--home-dir", str(self.home),
             "--shell", "/bin/bash", "--comment", "larkns vagrant test", USER],
            check=True,
        )  # fmt: skip
        pw = pwd.getpwnam(USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        for d in ("tmp", ".vagrant.d"):
            self.mkdir(self.home / d)
        self.env = {
            "HOME": str(self.home),
            "USER": USER,
            "LOGNAME": USER,
            "PATH": USER_PATH,
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.home / "tmp"),
            "VAGRANT_HOME": str(self.home / ".vagrant.d"),
            "VAGRANT_DEFAULT_PROVIDER": "libvirt",
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
            "LIBVIRT_DEFAULT_URI": "qemu:///session",
        }

    def close(self) -> None:
        remove_netns(self.netns)
        remove_user()
        shutil.rmtree(self.home, ignore_errors=True)

    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, self.gid)

    def command(self, *cmd: str, env: dict[str, str] | None = None) -> list[str]:
        """cmd as the user, in the namespace, at the lowest priority."""
        envs = [f"{k}={v}" for k, v in (self.env | (env or {})).items()]
        return [
            "ip", "netns", "exec", self.netns,
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
            "env", "-i", *envs, "nice", "-n", "19", *cmd,
        ]  # fmt: skip


def copy_checkout(s: Session) -> Path:
    """The checkout as a fresh clone has it (plus what is not committed yet),
    the user's own: vagrant writes vagrant/.vagrant in it."""
    dest = s.home / "larkns"
    s.mkdir(dest)
    files = vm.checkout_files()
    if files is None:
        raise vm.Failed(f"{vm.ROOT} is not a git checkout")
    pack = subprocess.Popen(
        ["tar", "-C", str(vm.ROOT), "--null", "--verbatim-files-from", "-T", "-", "-cf", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert pack.stdin is not None and pack.stdout is not None
    unpack = subprocess.Popen(["tar", "-C", str(dest), "-xf", "-"], stdin=pack.stdout)
    pack.stdout.close()
    pack.stdin.write(files)
    pack.stdin.close()
    if pack.wait() != 0 or unpack.wait() != 0:
        raise vm.Failed("copying the checkout failed")
    subprocess.run(["chown", "-R", f"{s.uid}:{s.gid}", str(dest)], check=True)
    return dest


# -- the run ---------------------------------------------------------------


@dataclass
class Timings:
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, name: str) -> None:
        self.marks.append((name, time.monotonic()))

    def phases(self) -> dict[str, float]:
        """Seconds from each mark to the next."""
        return {a: tb - ta for (a, ta), (_, tb) in zip(self.marks, self.marks[1:], strict=False)}


def stream(cmd: list[str], cwd: Path, deadline: float, t: Timings) -> int:
    """Run cmd, print its output as it comes (seconds since it started), mark
    where each provisioner starts; kill it (our child, by its process
    group) at the deadline."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    pending = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                say("time is up: stopping vagrant")
                return 124
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 5.0))
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                # A progress meter redraws its line: keep what it ends with.
                line = ANSI.sub("", raw.decode(errors="replace").rstrip("\r").split("\r")[-1])
                if line.startswith("Progress:"):
                    continue
                m = PROVISIONER.search(line)
                if m:
                    t.mark(f"provisioner {m.group(1)}")
                print(f"vagrant {time.monotonic() - start:4.0f}| {line}", flush=True)
        return proc.wait()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bring_up(s: Session, b: Box, checkout: Path, deadline: float, t: Timings) -> int:
    """vagrant box add, then vagrant up: the machine, its provisioning, the check."""
    vagrant_home = s.home / ".vagrant.d"
    shutil.copy(BOX_FILES / "session.Vagrantfile", vagrant_home / "Vagrantfile")
    os.chown(vagrant_home / "Vagrantfile", s.uid, s.gid)
    t.mark("box add")
    add = s.command("vagrant", "box", "add", "--no-color", "--name", BOX_NAME, str(b.file))
    rc = stream(add, s.home, deadline, t)
    if rc != 0:
        say(f"vagrant box add failed ({rc})")
        return rc
    env = {
        "LARKNS_BOX_DEBIAN12": BOX_NAME,
        "LARKNS_VAGRANT_SSH_PORT": str(SSH_PORT),
        "LARKNS_VAGRANT_PROXY": GUEST_PROXY,
        "LARKNS_VAGRANT_CA": "/etc/ssl/certs/ca-certificates.crt",
    }
    # HTCondor as LARKNS_HTCONDOR says (vagrant/Vagrantfile), else the build
    # in ../shared/htcondor, else get.htcondor.org.
    ht = vm.htcondor_dir()
    htcondor = os.environ.get("LARKNS_HTCONDOR") or (
        str(sorted(ht.glob("condor-*.tar.xz"))[-1]) if ht is not None else ""
    )
    if htcondor:
        env["LARKNS_HTCONDOR"] = htcondor
        say(f"HTCondor from {htcondor}")
    else:
        say("no ../shared/htcondor: HTCondor from get.htcondor.org")
    t.mark("up")
    cmd = s.command("vagrant", "up", "--no-color", "--provider", "libvirt", MACHINE, env=env)
    rc = stream(cmd, checkout / "vagrant", deadline, t)
    t.mark("destroy")
    if rc != 0:
        say(f"vagrant up failed ({rc})")
    return rc


def destroy(s: Session, checkout: Path, t: Timings) -> int:
    """vagrant destroy, with a deadline of its own (it runs after a failure
    or a timeout too)."""
    cmd = s.command("vagrant", "destroy", "--no-color", "-f", MACHINE)
    rc = stream(cmd, checkout / "vagrant", time.monotonic() + 600, t)
    left = subprocess.run(
        s.command("virsh", "-c", "qemu:///session", "list", "--all", "--name"),
        capture_output=True,
        text=True,
    ).stdout.split()
    t.mark("end")
    if left:
        say(f"libvirt still has {left}: the session's processes are ended below")
    return rc


def report(image_s: float | None, box_s: float | None, t: Timings) -> None:
    def fmt(s: float | None) -> str:
        return "cached" if s is None else f"built in {s:.0f} s"

    phases = t.phases()
    names = [n for n, _ in t.marks]
    provisioners = [n for n in names if n.startswith("provisioner ")]
    parts = [f"image {fmt(image_s)}", f"box {fmt(box_s)}"]
    for label, first, last in (
        ("box add", "box add", "box add"),
        ("up", "up", "up"),
        ("provision", provisioners[0] if provisioners else "", "provisioner larkns"),
        ("check", "provisioner check", "provisioner check"),
        ("destroy", "destroy", "destroy"),
    ):
        if first in names and last in names:
            span = names[names.index(first) : names.index(last) + 1]
            parts.append(f"{label} {sum(phases.get(n, 0.0) for n in span):.0f} s")
    if t.marks:
        parts.append(f"total {t.marks[-1][1] - t.marks[0][1]:.0f} s")
    say("timings: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.vm.vagrant",
        description="Bring the Debian 12 box up with vagrant/ (libvirt session, emulation).",
    )
    p.add_argument("--install-deps", action="store_true", help="apt-get install what it needs")
    p.add_argument("--rebuild-box", action="store_true", help="make the box even if cached")
    p.add_argument("--box-only", action="store_true", help="make the box, bring nothing up")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for vagrant up")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.install_deps:
            install_deps()
        preflight(need_image=not vm.image().ready, need_box=args.rebuild_box or not box().ready)
    except vm.Skip as e:
        print(f"Vagrant test skipped: {e}", flush=True)
        return vm.SKIP

    t = Timings()
    image_s: float | None = None
    box_s: float | None = None
    rc = 1
    try:
        b, image_s, box_s = ensure_box(args.rebuild_box)
        if args.box_only:
            say(f"box ready: {b.file} (vagrant box add --name {BOX_NAME} {b.file})")
            return 0
        # One run at a time: the user and its home are this runner's; and one
        # guest at a time on the machine, the VM tier's included.
        with (
            vm.locked(vm.cache_dir() / "vagrant.lock", "Vagrant run"),
            vm.locked(vm.cache_dir() / "boot.lock", "guest"),
        ):
            s = Session()
            proxy: Proxy | None = None
            try:
                s.open()
                proxy = Proxy(s.netns, PROXY_PORT)
                proxy.start()
                checkout = copy_checkout(s)
                rc = bring_up(s, b, checkout, time.monotonic() + args.timeout, t)
                destroyed = destroy(s, checkout, t)
                if rc == 0 and destroyed != 0:
                    say(f"vagrant destroy failed ({destroyed})")
                    rc = destroyed
            finally:
                if proxy is not None:
                    proxy.close()
                    say(f"the guest's proxy: {proxy.summary()}")
                s.close()
    except vm.Failed as e:
        say(str(e))
        rc = 1
    finally:
        if t.marks and t.marks[-1][0] != "end":
            t.mark("end")
        report(image_s, box_s, t)
    say("passed" if rc == 0 else f"failed ({rc})")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
