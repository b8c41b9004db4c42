"""The VM tier: the chosen tests on Debian 12's own kernel, in a QEMU guest.

    python -m tests.vm [--accel auto|kvm|tcg] [--junit FILE] [-- PYTEST ARGS...]

Builds (once, cached under LARKNS_VM_CACHE, keyed by its package list and
the scripts that make it) a Debian 12 image with the distribution's kernel
and modules, boots it under QEMU (KVM where the host has a hardware KVM,
emulation otherwise), shares this checkout in read-only, and there runs
tests/vm/guest.sh: ./setup.sh as the README says, `larkns doctor`, then
pytest on the guest's kernel.  The guest's output streams here as it comes
(`vm|` lines); its pytest report and JUnit XML come back to the host.

The guest's only network is QEMU's user-mode NAT (-nic user): nothing of the
host's network changes.  QEMU is the one long-lived process this starts, and
it ends with the run, whatever happens.

Exit status: pytest's in the guest; 1 when the guest gave none (it did not
boot, setup failed, time ran out); SKIP (77) with one "VM tier skipped:"
line when this machine cannot boot the guest at all (no QEMU, no space).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SKIP = 77

SUITE = "bookworm"
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
# The guest's packages beside minbase: a booting systemd with the stock
# kernel, what setup.sh installs (so that its apt-get has nothing left to
# do), and the runtime libraries of ../shared/htcondor's build (BUILD.md).
PACKAGES = (
    # boot and base
    *("systemd-sysv", "udev", "kmod", "dbus", "linux-image-amd64", "initramfs-tools"),
    *("procps", "ca-certificates", "xz-utils", "iproute2", "iputils-ping", "nftables"),
    "util-linux",
    # setup.sh's
    *("python3", "python3-venv", "python3-dev", "python3-nftables", "gcc", "libc6-dev"),
    *("libffi-dev", "radvd", "dnsmasq-base", "tayga", "netbase", "clang", "libbpf-dev"),
    # HTCondor's runtime libraries
    *("libcurl4", "libgssapi-krb5-2", "libkrb5-3", "libldap-2.5-0", "libpcre2-8-0", "libssl3"),
    *("libstdc++6", "libgomp1", "libuuid1", "libsqlite3-0", "libsystemd0"),
)
IMAGE_SIZE = "6G"
# What the guest runs by default: every test of a branch larkns takes by
# detection that this kernel takes otherwise than the development machine's,
# the spine, and jobs of a one-node pool; not what only repeats the main
# suite (parsing, exit codes and signals, refusals, the share's rates: its
# leaves are the same FIFO on every kernel).  The 106 tests of before took 11
# min in the guest, these 45 under 4 (README, "The VM tier").
GUEST_TESTS = (
    # the other branch, asserted: the qdiscs found, fq_codel under a job's
    # cap and a FIFO in the share's classes, cgroup v2 alone
    "tests/vm/test_distribution_kernel.py",
    # the spine: a job's network built, checked, torn down, gc, and run
    # (reached, addressed by RA, counted, listed, killed and collected)
    "tests/test_engine.py",
    *(
        f"tests/test_run.py::test_{t}"
        for t in (
            "job_reaches_the_site_over_both_families_and_the_site_sees_the_worker",
            "the_jobs_ipv6_address_and_route_come_from_larkns_router_advertisement",
            "counters_equal_the_bytes_the_job_sent_and_received",
            "traffic_is_counted_per_admin_defined_class",
            "mode_none_has_loopback_only_and_no_route_out",
            "while_a_job_runs_its_objects_exist_and_are_listed",
            "sigkill_while_the_command_runs_then_gc_leaves_nothing",
            "two_jobs_starting_at_once_on_an_idle_node_count_once",
        )
    ),
    # caps with this kernel's leaf (fq_codel): found, at the rate, put back
    # when deleted, kept on a reused IFB
    *(
        f"tests/test_shaping.py::test_{t}"
        for t in (
            "the_leaf_is_the_best_qdisc_the_kernel_has",
            "a_capped_jobs_download_and_upload_each_run_near_the_cap",
            "a_qdisc_deleted_on_the_host_side_is_put_back_at_once",
            "a_daemon_keeps_a_finished_jobs_ifb_for_its_next_capped_job",
        )
    ),
    # the share's eBPF classifiers through this kernel's verifier, and put back
    "tests/test_uplink.py::test_the_kernel_verifier_takes_both_classifiers",
    "tests/test_uplink.py::test_the_share_deleted_on_the_host_side_is_put_back_at_once",
    # the CLAT (picked by what the kernel offers), a spawn into a cgroup v2
    "tests/test_clat.py",
    "tests/test_core.py::test_spawn_into_cgroup",
    # a job of a one-node HTCondor pool, and in the cgroup HTCondor made for
    # it (cgroup v2 alone: skipped on the host's hybrid layout)
    *(
        f"tests/test_condor.py::test_{t}"
        for t in (
            "a_job_has_its_own_network_and_reaches_the_site_over_both_families",
            "the_job_starts_in_the_cgroup_htcondor_made_for_it_which_counts_it",
            "a_job_over_its_memory_request_is_held_by_the_limit_of_htcondors_cgroup",
        )
    ),
)
# QEMU's user-mode NIC; the image's networkd answers this MAC alone.
GUEST_MAC = "52:54:00:12:34:56"
MARK = re.compile(r"^LARKNS-VM (\S+)")


def cache_dir() -> Path:
    return Path(os.environ.get("LARKNS_VM_CACHE", "/var/tmp/larkns-vm"))


def say(msg: str) -> None:
    print(f"vm: {msg}", flush=True)


class Skip(Exception):
    """This machine cannot boot the guest: not a failure of larkns's."""


class Failed(Exception):
    """The tier failed before its tests gave a verdict."""


# -- what this machine has -------------------------------------------------

HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
}


def missing_tools() -> list[str]:
    return [t for t in HOST_TOOLS if shutil.which(t) is None]


def install_tools() -> None:
    """Install the host's tools with apt (CI's fresh machine has none).
    What cannot be installed shows as missing in preflight (a skip)."""
    missing = missing_tools()
    if not missing or shutil.which("apt-get") is None:
        return
    pkgs = sorted({HOST_TOOLS[t] for t in missing} | {"qemu-utils"})
    say(f"installing {' '.join(pkgs)}")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> int:
        return subprocess.run(
            ["apt-get", *args], env=env, stdout=subprocess.DEVNULL, check=False
        ).returncode

    install = ("install", "-y", "-q", "--no-install-recommends", *pkgs)
    if apt(*install) != 0:
        # A machine whose package lists were never fetched (CI's setup.sh,
        # which runs first, fetches them).
        apt("update", "-q")
        apt(*install)


def free_gib(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**30


def preflight(need_image: bool) -> None:
    if os.geteuid() != 0:
        raise Skip("needs root (mmdebstrap's chroot, the guest's 9p shares)")
    missing = missing_tools()
    if missing:
        raise Skip(f"no {', '.join(missing)} (apt-get install qemu-system-x86 mmdebstrap)")
    # The image (sparse, ~1.5 GB used) and the guest's writes (qemu -snapshot
    # keeps them in a temporary file beside it).
    need = 6.0 if need_image else 3.0
    have = free_gib(cache_dir())
    if have < need:
        raise Skip(f"{have:.1f} GiB free in {cache_dir()}, needs {need:.0f}")


def accel(choice: str) -> list[str]:
    """QEMU's accelerator: KVM only on a hardware KVM (kvm_intel or
    kvm_amd).  Another /dev/kvm (PVM, which runs only PVM guest kernels)
    hangs a stock kernel for ever; emulation always boots."""
    if choice == "auto":
        hw = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
        choice = "kvm" if hw and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    if choice == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


# -- the image -------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "debian12.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def ready(self) -> bool:
        return (self.dir / "ready").exists()


def image_key() -> str:
    """What the image is made of: its suite, mirrors, packages, size and the
    hooks that customise it.  Any change makes a new image."""
    h = hashlib.sha256()
    for part in (SUITE, *MIRRORS, *sorted(PACKAGES), IMAGE_SIZE):
        h.update(part.encode() + b"\0")
    for hook in ("essential.sh", "customize.sh"):
        h.update((HERE / "image" / hook).read_bytes())
    return h.hexdigest()[:16]


def image() -> Image:
    return Image(cache_dir() / "images" / image_key())


@contextlib.contextmanager
def locked(path: Path, what: str | None = None) -> Iterator[None]:
    """One holder at a time of lock file `path`, which guards `what` (another
    run, a CI run beside this one, may hold it): waits, saying so and for
    how long."""
    path.parent.mkdir(parents=True, exist_ok=True)
    held_by = f"another run's {what}" if what else f"another run (it holds {path})"
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for {held_by}")
            t = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            say(f"waited {time.monotonic() - t:.0f} s for {held_by}")
        yield


# mmdebstrap took 43-56 s here; a mirror that stalls should not hold CI.
BUILD_TIMEOUT = 900


def mounted_under(path: Path) -> list[str]:
    """Mount points at or under `path`."""
    top = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == top or p.startswith(top + "/")]


def remove_tree(path: Path) -> None:
    """rm -rf `path`, unless something is mounted under it: an mmdebstrap
    killed before its cleanup leaves its chroot's /proc, /sys and /dev
    mounted, and removing through them would reach the host's."""
    left = mounted_under(path)
    if left:
        say(f"{path} left as it is: {len(left)} mounts under it ({left[0]}, ...)")
        return
    shutil.rmtree(path, ignore_errors=True)


def mmdebstrap(rootfs: Path, log: Path) -> None:
    """Debian 12 with PACKAGES into `rootfs` (its output into `log`)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                "nice", "-n", "19", "mmdebstrap", "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                # The guest's setup.sh runs apt-get update: lists that are
                # there already make it short.
                "--skip=cleanup/apt/lists",
                f'--essential-hook={HERE / "image" / "essential.sh"} "$1"',
                f'--customize-hook={HERE / "image" / "customize.sh"} "$1"',
                SUITE, str(rootfs), *MIRRORS,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Failed(f"mmdebstrap took more than {BUILD_TIMEOUT} s (see {log})") from None
        finally:
            if proc.poll() is None:
                # SIGTERM first: mmdebstrap then unmounts what it mounted.
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise Failed("mmdebstrap failed:\n  " + "\n  ".join(tail))


def build_image(img: Image) -> None:
    """mmdebstrap (as root, chroot mode) into a directory, then an ext4
    image of it (mkfs.ext4 -d) beside the kernel and initramfs it holds.
    Built aside and renamed into place: a half-built image is never used."""
    tmp = img.dir.with_name(img.dir.name + ".tmp")
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    rootfs = tmp / "rootfs"
    try:
        t = time.monotonic()
        mmdebstrap(rootfs, tmp / "mmdebstrap.log")
        say(f"mmdebstrap: {time.monotonic() - t:.0f} s")
        kernels = sorted(glob.glob(str(rootfs / "boot" / "vmlinuz-*")))
        initrds = sorted(glob.glob(str(rootfs / "boot" / "initrd.img-*")))
        if not kernels or not initrds:
            raise Failed("the image has no kernel or no initramfs in /boot")
        shutil.copy(kernels[-1], tmp / "vmlinuz")
        shutil.copy(initrds[-1], tmp / "initrd.img")
        (tmp / "kernel").write_text(Path(kernels[-1]).name.removeprefix("vmlinuz-") + "\n")
        t = time.monotonic()
        disk = tmp / "debian12.img"
        subprocess.run(["truncate", "-s", IMAGE_SIZE, str(disk)], check=True)
        mkfs = ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootfs), str(disk)]
        subprocess.run(["nice", "-n", "19", *mkfs], check=True)
        say(f"mkfs.ext4 -d: {time.monotonic() - t:.0f} s")
        remove_tree(rootfs)
        (tmp / "ready").write_text(image_key() + "\n")
        shutil.rmtree(img.dir, ignore_errors=True)
        tmp.rename(img.dir)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    # Images of other package lists are stale: keep the disk to one.
    for other in img.dir.parent.iterdir():
        if other.is_dir() and other != img.dir and not other.name.endswith(".tmp"):
            shutil.rmtree(other, ignore_errors=True)


# -- one run ---------------------------------------------------------------


@dataclass
class Timings:
    start: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def between(self, a: str, b: str) -> float | None:
        if a in self.marks and b in self.marks:
            return self.marks[b] - self.marks[a]
        return None


def checkout_files() -> bytes | None:
    """The checkout's files as a fresh clone would have them plus what is
    not ignored (NUL-separated), or None when it is no git checkout."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        return None
    # Only what exists (a file deleted but not yet committed is still listed).
    names = [n for n in done.stdout.split(b"\0") if n and (ROOT / os.fsdecode(n)).exists()]
    return b"\0".join(names) + b"\0"


def htcondor_dir() -> Path | None:
    """../shared/htcondor, where the tests look for the HTCondor build."""
    d = (ROOT.parent / "shared" / "htcondor").resolve()
    return d if glob.glob(str(d / "condor-*.tar.xz")) else None


def new_run() -> Path:
    """This run's directory (the guest's share, its logs after): one per
    run, since CI runs of other checkouts may use the same cache at once.
    The 5 newest runs' are kept, and any of the last day."""
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = sorted(runs.iterdir(), key=lambda d: d.stat().st_mtime, reverse=True)[5:]
    for d in old:
        with contextlib.suppress(OSError):
            if time.time() - d.stat().st_mtime > 86400:
                shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))


def prepare_run(run: Path, pytest_args: list[str]) -> None:
    shutil.copy(HERE / "guest.sh", run / "guest.sh")
    (run / "pytest-args").write_text("".join(a + "\n" for a in pytest_args))
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", run / "ca.crt")
    files = checkout_files()
    if files is not None:
        (run / "files").write_bytes(files)
    # Under CI the HTCondor tests are required (tests/condor.py), in the guest too.
    (run / "env").write_text("".join(f"{k}=1\n" for k in ("CI",) if os.environ.get(k)))
    (run / "guest.log").touch()


def qemu_command(img: Image, run: Path, accel_args: list[str]) -> list[str]:
    def share(tag: str, path: Path, readonly: bool) -> list[str]:
        ro = ",readonly=on" if readonly else ""
        return [
            "-fsdev", f"local,id={tag},path={path},security_model=none{ro}",
            "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]  # fmt: skip

    cmd = [
        "nice", "-n", "19", "qemu-system-x86_64", *accel_args,
        "-m", os.environ.get("LARKNS_VM_MEMORY", "3072"), "-smp", "2",
        "-nographic", "-no-reboot", "-snapshot",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd),
        "-append", "root=/dev/vda rw console=ttyS0,115200 quiet panic=-1",
        "-drive", f"file={img.disk},format=raw,if=virtio",
        "-nic", f"user,model=virtio-net-pci,mac={GUEST_MAC}",
        *share("run", run, readonly=False),
        *share("project", ROOT, readonly=True),
    ]  # fmt: skip
    ht = htcondor_dir()
    if ht is not None:
        cmd += share("htcondor", ht, readonly=True)
    return cmd


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it when this runner dies, even
    of SIGKILL (prctl PR_SET_PDEATHSIG, kept across exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def boot(img: Image, run: Path, accel_args: list[str], timeout: float, t: Timings) -> None:
    """Boot the guest, stream its guest.log here, and wait for it to power
    off; kill it (our own child, by pid) at the deadline or on any error."""
    env = os.environ | {"TMPDIR": str(cache_dir() / "tmp")}  # -snapshot's overlay
    (cache_dir() / "tmp").mkdir(parents=True, exist_ok=True)
    serial = (run / "serial.log").open("wb")
    t.mark("boot")
    proc = subprocess.Popen(
        qemu_command(img, run, accel_args),
        stdin=subprocess.DEVNULL,
        stdout=serial,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + timeout
    try:
        with (run / "guest.log").open("rb") as log:
            pending = b""
            while True:
                chunk = log.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        line = raw.decode(errors="replace")
                        m = MARK.match(line)
                        if m:
                            t.mark(m.group(1))
                        # seconds since QEMU started: where the guest's time goes
                        print(f"vm {time.monotonic() - t.marks['boot']:4.0f}| {line}", flush=True)
                elif proc.poll() is not None:
                    break
                elif time.monotonic() > deadline:
                    raise Failed(f"the guest did not finish within {timeout:.0f} s")
                else:
                    time.sleep(0.5)
        if proc.returncode != 0:
            say(f"qemu exited with {proc.returncode}; serial console:")
            tail = (run / "serial.log").read_bytes().decode(errors="replace").splitlines()
            print("\n".join(tail[-20:]), flush=True)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        serial.close()
        t.mark("off")


def report(t: Timings, img: Image, build_s: float | None) -> None:
    def fmt(s: float | None) -> str:
        return "-" if s is None else f"{s:.0f} s"

    kernel = (img.dir / "kernel").read_text().strip() if img.ready else "?"
    say(f"guest kernel {kernel}")
    say(
        "timings: image "
        + (f"built in {build_s:.0f} s" if build_s is not None else "cached")
        + f", boot {fmt(t.between('boot', 'booted'))}"
        + f", copy + setup.sh {fmt(t.between('booted', 'installed'))}"
        + f", doctor {fmt(t.between('installed', 'doctor'))}"
        + f", tests {fmt(t.between('doctor', 'tests-done'))}"
        + f", power off {fmt(t.between('tests-done', 'off'))}"
        + f", total {time.monotonic() - t.start:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.vm",
        description="Run tests in a Debian 12 guest on its stock kernel (QEMU).",
    )
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--timeout", type=float, default=2400, help="seconds, boot to power off")
    p.add_argument("--junit", type=Path, help="copy the guest's JUnit XML here")
    p.add_argument("--install-deps", action="store_true", help="apt-get install QEMU, mmdebstrap")
    p.add_argument("--rebuild", action="store_true", help="build the image even if cached")
    p.add_argument("--image-only", action="store_true", help="build the image, boot nothing")
    p.add_argument(
        "pytest_args", nargs="*", help="what pytest runs (default: GUEST_TESTS in this file)"
    )
    args = p.parse_args(argv)

    # SIGTERM (CI's timeout, a user) ends the run through the finally clauses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = Timings()
    img = image()
    try:
        if args.install_deps:
            install_tools()
        preflight(need_image=args.rebuild or not img.ready)
    except Skip as e:
        print(f"VM tier skipped: {e}", flush=True)
        return SKIP

    build_s: float | None = None
    try:
        if args.rebuild or not img.ready:
            with locked(cache_dir() / "images" / ".lock", "image build"):
                if args.rebuild or not image().ready:
                    say(f"building the image {img.dir.name} (Debian 12, {len(PACKAGES)} packages)")
                    b = time.monotonic()
                    build_image(img)
                    build_s = time.monotonic() - b
        if args.image_only:
            say(f"image ready: {img.dir}")
            return 0
        # One guest at a time on this machine: two emulated guests on its
        # cores would each take twice as long, and both might time out.
        with locked(cache_dir() / "boot.lock", "guest"):
            run = new_run()
            prepare_run(run, args.pytest_args or list(GUEST_TESTS))
            say(f"booting {img.disk} (logs: {run})")
            boot(img, run, accel(args.accel), args.timeout, t)
    except Failed as e:
        say(str(e))
        return 1
    finally:
        report(t, img, build_s)
    if args.junit is not None and (run / "junit.xml").exists():
        shutil.copy(run / "junit.xml", args.junit)
    rc = (run / "rc").read_text().strip() if (run / "rc").exists() else ""
    if not rc.isdigit():
        say("the guest gave no test result")
        return 1
    return int(rc)
