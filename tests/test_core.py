"""The C core against the real kernel: each wrapper, spawn() step by step, and
the keeper of spawn_kept().

Needs root.  Every kernel object made here is named lkc-<random> and removed in
teardown; every process started here is stopped by its own pid/pidfd.
"""

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

if os.geteuid() != 0:
    pytest.skip("the C core tests need root (namespaces, cgroups, mounts)", allow_module_level=True)
try:
    from larkns import core
except ImportError as exc:  # the extension is built by pip install, not by the checkout
    pytest.skip(
        f"larkns._core is not built ({exc}); run: pip install -e . --no-build-isolation",
        allow_module_level=True,
    )

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
NOBODY = 65534
TIMEOUT_S = 10.0


def lkc_name() -> str:
    return f"lkc-{secrets.token_hex(4)}"


def ns_link(path: str) -> str:
    return os.readlink(path)


def ns_id_of(path: str, kind: str = "net") -> str:
    """The /proc/*/ns link text of the namespace file at ``path``."""
    return f"{kind}:[{os.stat(path).st_ino}]"


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a throwaway thread: setns/unshare change only that thread."""
    box: dict[str, T] = {}
    errors: list[BaseException] = []

    def body() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=body, name="lkc-ns")
    t.start()
    t.join(TIMEOUT_S)
    assert not t.is_alive(), "namespace thread hung"
    if errors:
        raise errors[0]
    return box["result"]


def wait_pidfd(pidfd: int, timeout: float = TIMEOUT_S) -> int:
    """Reap the child of ``pidfd`` and close it: exit code, or -signal.

    A child still running after ``timeout`` is killed first, so a broken test
    never leaves a process behind.
    """
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            pytest.fail(f"child did not exit within {timeout} s")
        res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        assert res is not None
        return res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
    finally:
        os.close(pidfd)


def kill_and_reap(pidfd: int) -> None:
    """Teardown for a child that may still run."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        wait_pidfd(pidfd)


def fork_child(fn: Callable[[], int], unshare: int = 0) -> tuple[int, int]:
    """Fork a child that runs ``fn`` and exits with its result, never returning;
    (pid, pidfd).  With ``unshare`` (CLONE_NEW* flags), the child is in new
    namespaces of those kinds by the time this returns."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            os.close(ready_r)
            if unshare:
                core.unshare(unshare)
            os.close(ready_w)
            code = fn()
        except BaseException as e:
            print(f"lkc child failed: {e!r}", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        os.read(ready_r, 1)  # EOF once the child has unshared (or died)
    finally:
        os.close(ready_r)
    # Not yet reaped, so the pid is still that child's.
    return pid, os.pidfd_open(pid)


def read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        if not select.select([fd], [], [], TIMEOUT_S)[0]:
            pytest.fail("no EOF from the child's pipe")
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def run(spec: core.SpawnSpec) -> tuple[int, str]:
    """spawn ``spec`` with stdout+stderr to a pipe (stdin /dev/null unless given)."""
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        stdin = spec.stdio[0] if spec.stdio[0] >= 0 else null
        _pid, pidfd = core.spawn(dataclasses.replace(spec, stdio=(stdin, w, w)))
        os.close(w)
        w = -1
        out = read_all(r).decode()
        return wait_pidfd(pidfd), out
    finally:
        os.close(r)
        os.close(null)
        if w >= 0:
            os.close(w)


def children() -> set[int]:
    """Pids whose parent is this process, zombies included."""
    me = os.getpid()
    kids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == me:
            kids.add(int(d))
    return kids


def proc_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


# ---- fixtures ---------------------------------------------------------------


@pytest.fixture
def tmpdir_lkc() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lkc-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway named netns; yields its /run/netns path."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed")
    name = lkc_name()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def find_cgroup2() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2" and "rw" in fields[5].split(","):
                mnt = fields[4]
                if os.access(mnt, os.W_OK):
                    return mnt
    return None


@pytest.fixture
def cgroup_dir() -> Iterator[Path]:
    """A fresh cgroup v2 directory lkc-<random>, removed afterwards."""
    mnt = find_cgroup2()
    if mnt is None:
        pytest.skip("no writable cgroup2 mount in /proc/self/mountinfo")
    path = Path(mnt) / lkc_name()
    try:
        path.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup under {mnt}: {e}")
    try:
        yield path
    finally:
        path.rmdir()


# ---- constants --------------------------------------------------------------


def test_constants_come_from_the_kernel_headers() -> None:
    assert core.CLONE_NEWNET == 0x40000000
    assert core.CLONE_NEWNS == 0x00020000
    assert core.MS_BIND == 4096
    assert core.MS_REC == 16384
    assert core.MS_PRIVATE == 1 << 18
    assert core.MNT_DETACH == 2
    assert set(core.STAGES.values()) >= {"clone", "setns", "chdir", "exec", "setuid"}


# ---- setns / unshare ---------------------------------------------------------


def test_setns_by_namespace_fd_moves_only_the_calling_thread(netns: str) -> None:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    main_before = ns_link("/proc/thread-self/ns/net")
    try:

        def join() -> str:
            core.setns(fd, core.CLONE_NEWNET)
            return ns_link("/proc/thread-self/ns/net")

        assert in_thread(join) == ns_id_of(netns)
        assert ns_link("/proc/thread-self/ns/net") == main_before
    finally:
        os.close(fd)


def test_setns_with_the_wrong_type_fails_with_einval(netns: str) -> None:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(core.CoreError) as ei:
            in_thread(lambda: core.setns(fd, core.CLONE_NEWNS))
        assert ei.value.errno == errno.EINVAL
        assert "setns" in str(ei.value)
    finally:
        os.close(fd)


def test_setns_by_pidfd_joins_that_process_netns() -> None:
    r, w = os.pipe()
    pid, pidfd = fork_child(lambda: len(os.read(r, 1)) - 1, unshare=core.CLONE_NEWNET)
    try:
        target = ns_link(f"/proc/{pid}/ns/net")
        assert target != ns_link("/proc/self/ns/net")

        def join() -> str:
            core.setns(pidfd, core.CLONE_NEWNET)
            return ns_link("/proc/thread-self/ns/net")

        assert in_thread(join) == target
        # A pidfd names a process, not one namespace: the types must be given.
        with pytest.raises(core.CoreError) as ei:
            in_thread(lambda: core.setns(pidfd, 0))
        assert ei.value.errno == errno.EINVAL
        os.write(w, b"x")
        assert wait_pidfd(pidfd) == 0
    except BaseException:
        kill_and_reap(pidfd)
        raise
    finally:
        os.close(r)
        os.close(w)


def test_unshare_netns_in_a_thread_gives_it_a_fresh_loopback_only_netns() -> None:
    main_before = ns_link("/proc/thread-self/ns/net")

    def fresh() -> tuple[str, list[str]]:
        core.unshare(core.CLONE_NEWNET)
        return ns_link("/proc/thread-self/ns/net"), [n for _, n in socket.if_nameindex()]

    link, names = in_thread(fresh)
    assert link != main_before
    assert names == ["lo"]
    assert ns_link("/proc/thread-self/ns/net") == main_before


# ---- mount / umount2 ---------------------------------------------------------


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def test_bind_mount_a_file_and_umount2_it(tmpdir_lkc: Path) -> None:
    src = tmpdir_lkc / "lkc-src"
    dst = tmpdir_lkc / "lkc-dst"
    src.write_text("source\n")
    dst.write_text("target\n")
    try:
        core.mount(str(src), str(dst), None, core.MS_BIND)
        assert mounted(dst)
        assert dst.read_text() == "source\n"
        core.umount2(str(dst))
        assert not mounted(dst)
        assert dst.read_text() == "target\n"
    finally:
        if mounted(dst):
            core.umount2(str(dst), core.MNT_DETACH)


def test_mount_and_umount2_errors_name_the_call(tmpdir_lkc: Path) -> None:
    with pytest.raises(core.CoreError) as ei:
        core.mount(str(tmpdir_lkc), str(tmpdir_lkc / "lkc-missing"), None, core.MS_BIND)
    assert ei.value.errno == errno.ENOENT
    assert "mount(" in str(ei.value)
    with pytest.raises(core.CoreError) as ei:
        core.umount2(str(tmpdir_lkc))  # not a mount point
    assert ei.value.errno == errno.EINVAL


def test_mount_in_a_private_mount_ns_stays_there(tmpdir_lkc: Path) -> None:
    def child() -> int:
        core.mount(None, "/", None, core.MS_REC | core.MS_PRIVATE)
        core.mount("lkc-tmpfs", str(tmpdir_lkc), "tmpfs", 0, "size=64k,mode=700")
        (tmpdir_lkc / "lkc-inside").write_text("x")
        return 0 if mounted(tmpdir_lkc) else 1

    _, pidfd = fork_child(child, unshare=core.CLONE_NEWNS)
    assert wait_pidfd(pidfd) == 0
    assert not mounted(tmpdir_lkc)
    assert not (tmpdir_lkc / "lkc-inside").exists()


# ---- spawn: what reaches the job -----------------------------------------------


def test_spawn_returns_pid_and_pidfd_and_the_exit_code() -> None:
    pid, pidfd = core.spawn(core.SpawnSpec("/bin/sh", ["sh", "-c", "exit 3"], ENV))
    assert pid > 0
    assert not os.get_inheritable(pidfd)
    assert wait_pidfd(pidfd) == 3


def test_spawn_job_killed_by_a_signal() -> None:
    _pid, pidfd = core.spawn(core.SpawnSpec("/bin/sleep", ["sleep", "60"], ENV))
    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    assert wait_pidfd(pidfd) == -signal.SIGTERM


def test_spawn_passes_argv_exactly() -> None:
    script = 'for a in "$0" "$@"; do printf "<%s>\\n" "$a"; done'
    code, out = run(core.SpawnSpec("/bin/sh", ["sh", "-c", script, "zero", "a b", "", "ü"], ENV))
    assert code == 0
    assert out.splitlines() == ["<zero>", "<a b>", "<>", "<ü>"]


def test_spawn_passes_exactly_the_given_environment() -> None:
    env = {"A": "1", "B": "x y", "EMPTY": "", "U": "ü"}
    code, out = run(core.SpawnSpec("/usr/bin/env", ["env"], env))
    assert code == 0
    assert sorted(out.splitlines()) == ["A=1", "B=x y", "EMPTY=", "U=ü"]


def test_spawn_redirects_stdin_stdout_stderr(tmpdir_lkc: Path) -> None:
    inp = tmpdir_lkc / "lkc-in"
    inp.write_text("hello\n")
    fin = os.open(inp, os.O_RDONLY | os.O_CLOEXEC)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        spec = core.SpawnSpec(
            "/bin/sh",
            ["sh", "-c", "read x; echo out:$x; echo err:$x >&2"],
            ENV,
            stdio=(fin, out_w, err_w),
        )
        _, pidfd = core.spawn(spec)
        os.close(out_w)
        os.close(err_w)
        out_w = err_w = -1
        assert read_all(out_r) == b"out:hello\n"
        assert read_all(err_r) == b"err:hello\n"
        assert wait_pidfd(pidfd) == 0
    finally:
        for fd in (fin, out_r, err_r, out_w, err_w):
            if fd >= 0:
                os.close(fd)


def test_spawn_stdio_survives_overlap_and_a_caller_without_fds_0_1() -> None:
    """Swapped stdout/stderr stay swapped; the status pipe never lands on 0-2."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    x_r, x_w = os.pipe()

    def child() -> int:
        os.close(0)
        os.close(1)
        # The status pipe is now created as fds 0 and 1; stdio[1] must not
        # overwrite its write end, or this failure would look like a success.
        try:
            core.spawn(core.SpawnSpec("/nonexistent/lkc-x", ["x"], ENV, stdio=(-1, x_w, -1)))
        except core.SpawnError as e:
            if (e.stage, e.errno) != ("exec", errno.ENOENT):
                return 3
        else:
            return 2
        os.dup2(a_w, 1)
        os.dup2(b_w, 2)
        spec = core.SpawnSpec(
            "/bin/sh", ["sh", "-c", "echo out; echo err >&2"], ENV, stdio=(-1, 2, 1)
        )
        _, pidfd = core.spawn(spec)
        return wait_pidfd(pidfd)

    _, pidfd = fork_child(child)
    for fd in (a_w, b_w, x_w):
        os.close(fd)
    try:
        assert wait_pidfd(pidfd) == 0
        assert read_all(a_r) == b"err\n"
        assert read_all(b_r) == b"out\n"
        assert read_all(x_r) == b""
    finally:
        for fd in (a_r, b_r, x_r):
            os.close(fd)


def test_spawn_sets_cwd(tmpdir_lkc: Path) -> None:
    code, out = run(core.SpawnSpec("/bin/pwd", ["pwd"], ENV, cwd=str(tmpdir_lkc)))
    assert (code, out) == (0, f"{os.path.realpath(tmpdir_lkc)}\n")


def test_spawn_sets_umask() -> None:
    code, out = run(core.SpawnSpec("/bin/sh", ["sh", "-c", "umask"], ENV, umask=0o027))
    assert (code, out) == (0, "0027\n")


def test_spawn_drops_to_nobody_with_no_capabilities() -> None:
    spec = core.SpawnSpec(
        "/bin/sh",
        ["sh", "-c", "id -u; id -g; id -G; cat /proc/self/status"],
        ENV,
        uid=NOBODY,
        gid=NOBODY,
        groups=[NOBODY],
    )
    code, out = run(spec)
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [str(NOBODY)] * 3
    st = proc_status(out)
    assert st["Uid"].split() == [str(NOBODY)] * 4
    assert st["Gid"].split() == [str(NOBODY)] * 4
    assert st["Groups"] == str(NOBODY)
    for cap in ("CapEff", "CapPrm", "CapAmb"):
        assert int(st[cap], 16) == 0, cap


def test_spawn_keeps_only_the_given_capabilities_in_every_set() -> None:
    keep = frozenset({core.CAP_NET_RAW, core.CAP_SETUID})
    spec = core.SpawnSpec("/bin/cat", ["cat", "/proc/self/status"], ENV, caps=keep)
    code, out = run(spec)
    assert code == 0
    st = proc_status(out)
    mask = (1 << core.CAP_NET_RAW) | (1 << core.CAP_SETUID)
    for cap in ("CapBnd", "CapEff", "CapPrm"):
        assert int(st[cap], 16) == mask, cap
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    # Dropped from the bounding set: setns and mount are refused.
    spec = core.SpawnSpec("/usr/bin/unshare", ["unshare", "--mount", "true"], ENV, caps=keep)
    code, out = run(spec)
    assert code != 0 and "Operation not permitted" in out


# In a mount namespace of its own where / is shared, as on a systemd host
# (this test machine's mounts are private): a new sysfs on a shared /sys
# would appear in the namespace the job came from.
_OWN_SYSFS = r"""
import json, os, signal, sys, time
from larkns import core
def sys_mounts():
    with open("/proc/self/mountinfo") as f:
        return [l for l in f if l.split()[4].startswith("/sys")]
before = sys_mounts()
fd = os.open(sys.argv[1], os.O_RDONLY)
r, w = os.pipe()
cmd = "ls /sys/class/net; echo --; ls /sys/fs/cgroup | head -1; echo end; exec sleep 2"
_pid, pidfd = core.spawn(core.SpawnSpec(
    "/bin/sh", ["sh", "-c", cmd], {"PATH": "/usr/bin:/bin"},
    ns_fds=[fd], own_sysfs=True, stdio=(-1, w, w)))
os.close(w)
out = b""
while not out.endswith(b"end\n"):
    out += os.read(r, 4096)
during = sys_mounts()
signal.pidfd_send_signal(pidfd, 9)
os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
print(json.dumps({"out": out.decode(), "same": before == during,
                  "shared": "shared:" in before[0]}))
"""


def test_spawn_own_sysfs_shows_the_joined_network_and_leaves_a_shared_sys_alone(
    netns: str,
) -> None:
    proc = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c"),
            'mount --make-rshared / && exec "$0" -c "$1" "$2"',
            *(sys.executable, _OWN_SYSFS, netns),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    links, cgroup = res["out"].removesuffix("end\n").split("--\n")
    assert links.split() == ["lo"]  # the throwaway netns's, not this one's
    assert cgroup.strip(), "/sys/fs/cgroup is carried over"
    assert res["shared"] and res["same"], res


def test_spawn_drop_without_groups_clears_root_groups() -> None:
    spec = core.SpawnSpec("/bin/cat", ["cat", "/proc/self/status"], ENV, uid=NOBODY, gid=NOBODY)
    code, out = run(spec)
    assert code == 0
    assert proc_status(out)["Groups"] == ""


def test_spawn_enters_cwd_with_the_dropped_ids(tmpdir_lkc: Path) -> None:
    private = tmpdir_lkc / "lkc-private"
    private.mkdir(mode=0o700)
    spec = core.SpawnSpec("/bin/true", ["true"], ENV, uid=NOBODY, gid=NOBODY, cwd=str(private))
    with pytest.raises(core.SpawnError) as ei:
        core.spawn(spec)
    assert (ei.value.stage, ei.value.errno) == ("chdir", errno.EACCES)


def test_spawn_joins_a_netns_by_fd(netns: str) -> None:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        spec = core.SpawnSpec(
            "/usr/bin/readlink", ["readlink", "/proc/self/ns/net"], ENV, ns_fds=[fd]
        )
        assert run(spec) == (0, ns_id_of(netns) + "\n")
    finally:
        os.close(fd)


def test_spawn_joins_a_netns_by_pidfd() -> None:
    r, w = os.pipe()
    pid, pidfd = fork_child(lambda: len(os.read(r, 1)) - 1, unshare=core.CLONE_NEWNET)
    try:
        spec = core.SpawnSpec(
            "/usr/bin/readlink",
            ["readlink", "/proc/self/ns/net"],
            ENV,
            ns_fds=[(pidfd, core.CLONE_NEWNET)],
        )
        assert run(spec) == (0, ns_link(f"/proc/{pid}/ns/net") + "\n")
        os.write(w, b"x")
        assert wait_pidfd(pidfd) == 0
    except BaseException:
        kill_and_reap(pidfd)
        raise
    finally:
        os.close(r)
        os.close(w)


def test_spawn_into_cgroup(cgroup_dir: Path) -> None:
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        code, out = run(core.SpawnSpec("/bin/cat", ["cat", "/proc/self/cgroup"], ENV, cgroup_fd=cg))
        assert code == 0
        line = next(ln for ln in out.splitlines() if ln.startswith("0::"))
        assert line.endswith("/" + cgroup_dir.name)
    finally:
        os.close(cg)


def test_spawn_new_session() -> None:
    def stat_ids(new_session: bool) -> tuple[int, int, int]:
        r, w = os.pipe()
        try:
            spec = core.SpawnSpec(
                "/bin/cat",
                ["cat", "/proc/self/stat"],
                ENV,
                stdio=(-1, w, -1),
                new_session=new_session,
            )
            pid, pidfd = core.spawn(spec)
            os.close(w)
            w = -1
            fields = read_all(r).decode().rpartition(")")[2].split()
            assert wait_pidfd(pidfd) == 0
            return pid, int(fields[2]), int(fields[3])
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    pid, pgrp, sid = stat_ids(True)
    assert pgrp == sid == pid
    pid, pgrp, sid = stat_ids(False)
    assert sid == os.getsid(0) != pid


def test_spawn_does_not_leak_other_fds() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(fd, True)
    high = os.dup2(fd, 200, inheritable=True)
    try:
        code, out = run(core.SpawnSpec("/bin/ls", ["ls", "/proc/self/fd"], ENV))
        assert code == 0
        # 0-2 are stdio; 3 is ls's own handle on /proc/self/fd.
        assert sorted(out.split(), key=int) == ["0", "1", "2", "3"]
        assert os.get_inheritable(high), "the caller's fds must be left alone"
    finally:
        os.close(fd)
        os.close(high)


def sig_bit(sig: int) -> int:
    return 1 << (sig - 1)


def test_spawn_resets_ignored_signals_and_the_mask() -> None:
    status = proc_status(Path("/proc/thread-self/status").read_text())
    assert int(status["SigIgn"], 16) & sig_bit(signal.SIGPIPE), "python ignores SIGPIPE"
    old_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        spec = core.SpawnSpec("/bin/cat", ["cat", "/proc/self/status"], ENV)
        code, out = run(spec)
        assert code == 0
        st = proc_status(out)
        assert int(st["SigIgn"], 16) == 0
        assert int(st["SigBlk"], 16) == 0

        code, out = run(dataclasses.replace(spec, reset_signals=()))
        ign = int(proc_status(out)["SigIgn"], 16)
        assert ign & sig_bit(signal.SIGPIPE) and ign & sig_bit(signal.SIGUSR1)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGUSR1, old_usr1)


# ---- spawn: parent death --------------------------------------------------------

HELPER = """
import os, signal, sys, time
from larkns import core
pid, pidfd = core.spawn(core.SpawnSpec("/bin/sleep", ["sleep", "60"], {},
                                       pdeathsig=int(sys.argv[1])))
print(pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("pdeathsig", [signal.SIGKILL, 0])
def test_spawn_pdeathsig_kills_the_job_when_its_parent_dies(pdeathsig: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(int(pdeathsig))], stdout=subprocess.PIPE, env=env
    )
    jfd = -1
    try:
        assert helper.stdout is not None
        job = int(helper.stdout.readline())
        jfd = os.pidfd_open(job)
        assert not select.select([jfd], [], [], 0)[0], "job died early"
        helper.kill()
        helper.wait(TIMEOUT_S)
        job_exited = bool(select.select([jfd], [], [], 2.0 if pdeathsig == 0 else TIMEOUT_S)[0])
        assert job_exited == bool(pdeathsig)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        if helper.stdout is not None:
            helper.stdout.close()
        if jfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(jfd, signal.SIGKILL)
            os.close(jfd)


# ---- spawn: failures -------------------------------------------------------------


@pytest.fixture
def no_new_children() -> Iterator[None]:
    before = children()
    yield
    assert children() == before, "spawn left a child (zombie) behind"


@pytest.mark.usefixtures("no_new_children")
def test_spawn_missing_executable_fails_at_exec_with_enoent() -> None:
    path = f"/nonexistent/{lkc_name()}"
    with pytest.raises(core.SpawnError) as ei:
        core.spawn(core.SpawnSpec(path, ["x"], ENV))
    assert (ei.value.stage, ei.value.errno) == ("exec", errno.ENOENT)
    assert str(ei.value) == f"cannot exec {path}: No such file or directory"


@pytest.mark.usefixtures("no_new_children")
def test_spawn_non_executable_fails_at_exec_with_eacces(tmpdir_lkc: Path) -> None:
    script = tmpdir_lkc / "lkc-script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(core.SpawnError) as ei:
        core.spawn(core.SpawnSpec(str(script), ["x"], ENV))
    assert (ei.value.stage, ei.value.errno) == ("exec", errno.EACCES)


@pytest.mark.usefixtures("no_new_children")
def test_spawn_bad_cwd_fails_at_chdir() -> None:
    with pytest.raises(core.SpawnError) as ei:
        core.spawn(core.SpawnSpec("/bin/true", ["true"], ENV, cwd=f"/nonexistent/{lkc_name()}"))
    assert (ei.value.stage, ei.value.errno) == ("chdir", errno.ENOENT)
    assert str(ei.value).startswith("cannot chdir to /nonexistent/lkc-")


@pytest.mark.usefixtures("no_new_children")
def test_spawn_bad_ns_fd_fails_at_setns(tmpdir_lkc: Path) -> None:
    f = tmpdir_lkc / "lkc-not-a-ns"
    f.write_text("")
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(core.SpawnError) as ei:
            core.spawn(core.SpawnSpec("/bin/true", ["true"], ENV, ns_fds=[fd]))
        assert (ei.value.stage, ei.value.errno) == ("setns", errno.EINVAL)
    finally:
        os.close(fd)


@pytest.mark.usefixtures("no_new_children")
def test_spawn_bad_cgroup_fd_fails_at_clone(tmpdir_lkc: Path) -> None:
    fd = os.open(tmpdir_lkc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(core.SpawnError) as ei:
            core.spawn(core.SpawnSpec("/bin/true", ["true"], ENV, cgroup_fd=fd))
        assert (ei.value.stage, ei.value.errno) == ("clone", errno.EBADF)
    finally:
        os.close(fd)


def test_spawn_error_pickles() -> None:
    e = core.SpawnError("exec", errno.ENOENT, "cannot exec /x: No such file or directory")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.stage, e2.errno, str(e2)) == (e.stage, e.errno, str(e))


@pytest.mark.parametrize(
    "bad",
    [
        {"path": "bin/true"},
        {"argv": []},
        {"argv": ["a\0b"]},
        {"env": {"A=B": "c"}},
        {"uid": -1},
        {"reset_signals": [65]},
        {"umask": 0o1000},
    ],
)
def test_spawn_rejects_bad_specs_before_forking(bad: dict[str, object]) -> None:
    spec = dataclasses.replace(core.SpawnSpec("/bin/true", ["true"], ENV), **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        core.spawn(spec)


# -- spawn_kept: a job with a keeper ---------------------------------------


@pytest.fixture()
def status_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield tmp_path, fd
    finally:
        os.close(fd)


def _reap_keeper(kept: core.Kept, timeout: float = 10) -> None:
    ready, _, _ = select.select([kept.keeper_pidfd], [], [], timeout)
    assert ready, "the keeper did not end"
    os.waitid(os.P_PIDFD, kept.keeper_pidfd, os.WEXITED)
    os.close(kept.keeper_pidfd)
    os.close(kept.job_pidfd)


def test_a_kept_job_s_end_is_written_down_by_its_keeper(status_dir: tuple[Path, int]) -> None:
    d, fd = status_dir
    spec = core.SpawnSpec(path="/bin/sh", argv=["sh", "-c", "exit 3"], env={}, pdeathsig=9)
    kept = core.spawn_kept(spec, fd, "j.exit")
    _reap_keeper(kept)
    assert (d / "j.exit").read_text() == "code 3\n"
    assert sorted(p.name for p in d.iterdir()) == ["j.exit"]  # no temp file left


def test_a_keeper_holds_only_what_it_needs_and_ignores_all_but_sigkill(
    status_dir: tuple[Path, int],
) -> None:
    d, fd = status_dir
    spec = core.SpawnSpec(path="/bin/sleep", argv=["sleep", "30"], env={}, pdeathsig=9)
    kept = core.spawn_kept(spec, fd, "j.exit", comm="lkc-keeper")
    try:
        assert Path(f"/proc/{kept.keeper_pid}/comm").read_text().strip() == "lkc-keeper"
        # stdio on /dev/null, the status dir and the job's pidfd: none of the
        # caller's sockets or pipes (a wrapper waits for EOF on one).
        fds = {
            int(n): os.readlink(f"/proc/{kept.keeper_pid}/fd/{n}")
            for n in os.listdir(f"/proc/{kept.keeper_pid}/fd")
        }
        assert [fds[i] for i in (0, 1, 2)] == ["/dev/null"] * 3
        assert sorted(fds[i] for i in fds if i > 2) == [str(d), "anon_inode:[pidfd]"]
        # Its own session: a signal to the caller's process group misses it.
        assert os.getsid(kept.keeper_pid) == kept.keeper_pid
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(kept.keeper_pid, sig)
        time.sleep(0.1)
        assert Path(f"/proc/{kept.job_pid}").exists()
        assert not (d / "j.exit").exists()
    finally:
        signal.pidfd_send_signal(kept.job_pidfd, signal.SIGTERM)
        _reap_keeper(kept)
    assert (d / "j.exit").read_text() == f"signal {int(signal.SIGTERM)}\n"


def test_a_kept_job_dies_with_the_process_it_is_for(status_dir: tuple[Path, int]) -> None:
    d, fd = status_dir
    watched = subprocess.Popen(["sleep", "30"])
    wfd = os.pidfd_open(watched.pid)
    spec = core.SpawnSpec(path="/bin/sleep", argv=["sleep", "30"], env={}, pdeathsig=9)
    try:
        kept = core.spawn_kept(spec, fd, "j.exit", watch_pidfd=wfd)
    finally:
        os.close(wfd)
    watched.kill()
    watched.wait()
    _reap_keeper(kept)
    assert (d / "j.exit").read_text() == "signal 9\n"


def test_a_kept_job_dies_with_its_keeper(status_dir: tuple[Path, int]) -> None:
    d, fd = status_dir
    spec = core.SpawnSpec(path="/bin/sleep", argv=["sleep", "30"], env={}, pdeathsig=9)
    kept = core.spawn_kept(spec, fd, "j.exit")
    job = kept.job_pidfd
    signal.pidfd_send_signal(kept.keeper_pidfd, signal.SIGKILL)
    ready, _, _ = select.select([job], [], [], 10)
    assert ready, "the job outlived its keeper"
    _reap_keeper(kept)
    assert not (d / "j.exit").exists()


def test_a_kept_job_that_cannot_start_leaves_no_keeper(status_dir: tuple[Path, int]) -> None:
    d, fd = status_dir

    def children() -> set[str]:
        tasks = Path("/proc/self/task")
        return {c for t in tasks.iterdir() for c in (t / "children").read_text().split()}

    before = children()
    spec = core.SpawnSpec(path="/nonexistent/lkc", argv=["lkc"], env={})
    with pytest.raises(core.SpawnError) as e:
        core.spawn_kept(spec, fd, "j.exit")
    assert e.value.stage == "exec" and e.value.errno == errno.ENOENT
    assert children() == before  # the keeper is gone, and reaped
    assert not list(d.iterdir())


# -- spawn_kept: the keeper is a program of its own --------------------------


def lktk_name() -> str:
    return f"lktk-{secrets.token_hex(4)}"


@pytest.fixture
def lktk_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lktk-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def lktk_netns() -> Iterator[str]:
    """A throwaway named netns lktk-<random>; yields its /run/netns path."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed")
    name = lktk_name()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def run_kept(spec: core.SpawnSpec, status_dir: tuple[Path, int]) -> tuple[int, str]:
    """spawn_kept ``spec`` with stdout+stderr to a pipe and stdin on /dev/null:
    (exit code as its keeper wrote it down, output)."""
    d, fd = status_dir
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        kept = core.spawn_kept(dataclasses.replace(spec, stdio=(null, w, w)), fd, "j.exit")
        os.close(w)
        w = -1
        out = read_all(r).decode()
        _reap_keeper(kept)
        word, code = (d / "j.exit").read_text().split()
        return int(code) if word == "code" else -int(code), out
    finally:
        os.close(r)
        os.close(null)
        if w >= 0:
            os.close(w)


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup, in kB."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines)}


# The shell's own status is read first, by the shell itself (no child):
# while it forks a child, dash blocks every signal for a moment, and a
# child reading /proc/$$/status then may see that.
_SHOW = r"""
while read -r line; do
  case $line in SigBlk:*|SigIgn:*|Cap[IPEBA]??:*) status="$status$line
";; esac
done < /proc/$$/status
printf '<%s>\n' "$0" "$@"
env | LC_ALL=C sort
pwd; umask; id -u; id -g; id -G
readlink /proc/self/ns/net; ls /sys/class/net
printf '%s' "$status"
[ "$(cut -d' ' -f6 /proc/$$/stat)" = $$ ] && echo session leader
"""


def test_a_kept_job_starts_exactly_as_a_spawned_one(
    status_dir: tuple[Path, int], lktk_netns: str
) -> None:
    """Every attribute reaches the job through the keeper's spec, an
    environment larger than any socket message (100 kB) included."""
    ns = os.open(lktk_netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        spec = core.SpawnSpec(
            "/bin/sh",
            ["sh", "-c", _SHOW, "zero", "a b", "", "ü", "k=v"],
            {"PATH": ENV["PATH"], "EQ": "x=y", "EMPTY": "", "U": "ü", "BIG": "b" * 100_000},
            ns_fds=[(ns, core.CLONE_NEWNET)],
            uid=NOBODY,
            gid=NOBODY,
            groups=[NOBODY, 4321],
            umask=0o027,
            cwd="/",
            pdeathsig=signal.SIGKILL,
            new_session=True,
            own_sysfs=True,
            caps=frozenset({core.CAP_NET_RAW}),
        )
        spawned = run(spec)
        kept = run_kept(spec, status_dir)
    finally:
        os.close(ns)
    assert kept == spawned
    code, out = kept
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:5] == ["<zero>", "<a b>", "<>", "<ü>", "<k=v>"]
    assert "BIG=" + "b" * 100_000 in lines and "EQ=x=y" in lines and "EMPTY=" in lines
    at = lines.index("0027") - 1
    assert lines[at : at + 6] == ["/", "0027", "65534", "65534", "65534 4321", ns_id_of(lktk_netns)]
    assert "lo" in lines and "session leader" in lines


def test_a_keeper_is_a_small_program_that_keeps_the_job_s_environment_private(
    status_dir: tuple[Path, int],
) -> None:
    _, fd = status_dir
    secret = lktk_name()
    spec = core.SpawnSpec("/bin/sleep", ["sleep", "30"], {"LKTK_TOKEN": secret}, pdeathsig=9)
    kept = core.spawn_kept(spec, fd, "j.exit")
    try:
        keeper = f"/proc/{kept.keeper_pid}"
        assert os.readlink(f"{keeper}/exe") == os.path.realpath(core.KEEPER)
        # Not a copy of this process (tens of MB): the 1 MB a keeper may cost.
        assert smaps_rollup(kept.keeper_pid)["Pss"] < 1024
        # Anyone may read a command line; only the job's owner its environment.
        assert secret.encode() not in Path(f"{keeper}/cmdline").read_bytes()
        assert Path(f"{keeper}/environ").read_bytes() == b""
    finally:
        signal.pidfd_send_signal(kept.job_pidfd, signal.SIGKILL)
        _reap_keeper(kept)


def test_a_keeper_that_cannot_be_executed_fails_the_spawn_and_leaves_nothing(
    status_dir: tuple[Path, int], lktk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, fd = status_dir
    fake = lktk_dir / "larkns-keeper"
    fake.write_text("not a program\n")
    fake.chmod(0o755)
    monkeypatch.setattr(core, "KEEPER", str(fake))
    marker = lktk_dir / "lktk-ran"
    spec = core.SpawnSpec("/bin/sh", ["sh", "-c", f"touch {marker}"], ENV, pdeathsig=9)
    kids, fds = children(), sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(core.SpawnError) as ei:
        core.spawn_kept(spec, fd, "j.exit")
    assert (ei.value.stage, ei.value.errno) == ("keeper", errno.ENOEXEC)
    assert str(ei.value) == f"cannot start the job's keeper {fake}: Exec format error"
    assert children() == kids, "a keeper process was left behind"
    assert sorted(os.listdir("/proc/self/fd")) == fds, "an fd was left open"
    assert not marker.exists() and not list(d.iterdir())


@pytest.mark.parametrize("how", ["group-writable", "not root's", "a symlink", "missing"])
def test_a_keeper_program_that_others_could_change_is_not_run(
    how: str, status_dir: tuple[Path, int], lktk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, fd = status_dir
    copy = lktk_dir / "larkns-keeper"
    shutil.copy(core.KEEPER, copy)
    if how == "group-writable":
        copy.chmod(0o775)
    elif how == "not root's":
        os.chown(copy, NOBODY, NOBODY)
    else:
        copy.unlink()
        if how == "a symlink":
            copy.symlink_to(core.KEEPER)
    monkeypatch.setattr(core, "KEEPER", str(copy))
    kids = children()
    with pytest.raises(core.SpawnError) as ei:
        core.spawn_kept(core.SpawnSpec("/bin/true", ["true"], ENV, pdeathsig=9), fd, "j.exit")
    assert ei.value.stage == "keeper"
    if how == "missing":
        assert ei.value.errno == errno.ENOENT
        assert str(ei.value).startswith(f"cannot open the job's keeper {copy}:")
    else:
        assert ei.value.errno == errno.EPERM
        assert str(ei.value).startswith(f"refusing to run the job's keeper {copy}: ")
    assert children() == kids


def test_a_keeper_run_by_hand_does_nothing() -> None:
    proc = subprocess.run([core.KEEPER], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 127
    assert proc.stderr == "larkns-keeper: started by larkns only, never by hand\n"
