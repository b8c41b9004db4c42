"""The C core: syscalls Python 3.11 lacks, and spawning a job into namespaces.

Everything here is a thin, typed front to ``larkns._core`` (cffi, API mode, built
from ``csrc/``).  The C side holds no policy; the few defaults that are policy
(which signals to reset, what happens to supplementary groups when ids drop) are
decided here, in Python, where they can be read.
"""

import errno
import os
import signal
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from larkns import signals
from larkns._core import ffi, lib

CLONE_NEWNET: Final[int] = int(lib.CLONE_NEWNET)
CLONE_NEWNS: Final[int] = int(lib.CLONE_NEWNS)
MS_BIND: Final[int] = int(lib.MS_BIND)
MS_REC: Final[int] = int(lib.MS_REC)
MS_SHARED: Final[int] = int(lib.MS_SHARED)
MS_PRIVATE: Final[int] = int(lib.MS_PRIVATE)
MNT_DETACH: Final[int] = int(lib.MNT_DETACH)

# Capabilities by name (linux/capability.h), for SpawnSpec.caps.
CAP_CHOWN: Final[int] = int(lib.CAP_CHOWN)
CAP_DAC_OVERRIDE: Final[int] = int(lib.CAP_DAC_OVERRIDE)
CAP_FOWNER: Final[int] = int(lib.CAP_FOWNER)
CAP_FSETID: Final[int] = int(lib.CAP_FSETID)
CAP_SETGID: Final[int] = int(lib.CAP_SETGID)
CAP_SETUID: Final[int] = int(lib.CAP_SETUID)
CAP_NET_BIND_SERVICE: Final[int] = int(lib.CAP_NET_BIND_SERVICE)
CAP_NET_ADMIN: Final[int] = int(lib.CAP_NET_ADMIN)
CAP_NET_RAW: Final[int] = int(lib.CAP_NET_RAW)
CAP_SYS_CHROOT: Final[int] = int(lib.CAP_SYS_CHROOT)
CAP_AUDIT_WRITE: Final[int] = int(lib.CAP_AUDIT_WRITE)

#: The program every job's keeper runs (csrc/keeper.c), built beside this
#: module; it runs as root, so spawn_kept checks who may write it.
KEEPER: Final[str] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "larkns-keeper")

_MAX_SIGNAL: Final[int] = 64
_NO_ID: Final[int] = 2**32 - 1  # (uid_t)-1 means "unchanged" to the kernel

#: Every signal a process can catch or ignore: SIG_IGN survives execve, and a job
#: must not inherit the daemon's ignored SIGPIPE (or anything else).
ALL_CATCHABLE_SIGNALS: Final[tuple[int, ...]] = tuple(
    s for s in range(1, _MAX_SIGNAL + 1) if s not in (signal.SIGKILL, signal.SIGSTOP)
)

#: Signals that come from outside a process (see larkns.signals).
EXTERNAL_SIGNALS: Final[frozenset[int]] = signals.EXTERNAL

#: Stage numbers reported by lk_spawn, by name.
STAGES: Final[Mapping[int, str]] = {
    int(lib.LK_STAGE_CLONE): "clone",
    int(lib.LK_STAGE_SETNS): "setns",
    int(lib.LK_STAGE_SETSID): "setsid",
    int(lib.LK_STAGE_SETGROUPS): "setgroups",
    int(lib.LK_STAGE_SETGID): "setgid",
    int(lib.LK_STAGE_SETUID): "setuid",
    int(lib.LK_STAGE_CHDIR): "chdir",
    int(lib.LK_STAGE_PDEATHSIG): "pdeathsig",
    int(lib.LK_STAGE_STDIO): "stdio",
    int(lib.LK_STAGE_FDS): "fds",
    int(lib.LK_STAGE_SIGNALS): "signals",
    int(lib.LK_STAGE_EXEC): "exec",
    int(lib.LK_STAGE_SYSFS): "sysfs",
    int(lib.LK_STAGE_CAPS): "caps",
    int(lib.LK_STAGE_KEEPER): "keeper",
}


class CoreError(OSError):
    """A syscall wrapper of the C core failed; ``errno`` is the kernel's."""


def _error(call: str) -> CoreError:
    err = int(ffi.errno)
    return CoreError(err, f"{call} failed: {os.strerror(err)}")


def setns(fd: int, nstype: int = 0) -> None:
    """Move the calling thread into the namespace(s) of ``fd``.

    ``fd`` is a namespace fd (``nstype`` 0 accepts any type) or a pidfd (then
    ``nstype`` must name the namespaces to join, several at once if wanted).
    """
    if lib.setns(fd, nstype) < 0:
        raise _error(f"setns(fd={fd}, nstype={nstype:#x})")


def unshare(flags: int) -> None:
    """Give the calling thread new namespaces (CLONE_NEW* flags)."""
    if lib.unshare(flags) < 0:
        raise _error(f"unshare({flags:#x})")


def _opt_cstr(s: str | None) -> Any:
    return ffi.NULL if s is None else ffi.new("char[]", _encode(s, "mount argument"))


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """mount(2), with the strings encoded as the file system encoding does."""
    c_source = _opt_cstr(source)
    c_target = ffi.new("char[]", _encode(target, "mount target"))
    c_fstype = _opt_cstr(fstype)
    c_data = _opt_cstr(data)
    if lib.mount(c_source, c_target, c_fstype, flags, c_data) < 0:
        raise _error(f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})")


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    if lib.umount2(ffi.new("char[]", _encode(target, "umount target")), flags) < 0:
        raise _error(f"umount2({target!r}, {flags:#x})")


@dataclass(frozen=True)
class SpawnSpec:
    """Everything the job process needs, prepared before it exists.

    The child applies it in this order: join ``ns_fds`` (in order), ``own_sysfs``,
    ``caps`` (bounding and ambient sets), ``new_session``, ``umask``,
    ``groups``/``gid``/``uid``, ``caps`` (the other sets), ``cwd`` (so it is entered with the
    job owner's rights), ``pdeathsig``, ``stdio``, close-on-exec for every other
    fd, ``reset_signals``, execve.

    - ``path``: absolute and already resolved (no PATH search happens).
    - ``ns_fds``: namespace fds, or ``(fd, nstype)`` pairs; a pidfd needs a pair
      naming the namespaces to join.  A pid namespace joined this way holds the
      job's children, not the job itself (setns semantics).
    - ``groups``: None keeps the caller's supplementary groups unless ``uid`` or
      ``gid`` is given: then they are cleared, since the daemon's (root's)
      groups must never reach a job.
    - ``stdio``: fds to become 0, 1, 2; -1 inherits the caller's.
    - ``pdeathsig``: sent to the job when the *thread* that called spawn() exits
      (the kernel tracks the thread, not the process): spawn from a long-lived
      thread.
    - ``cgroup_fd``: a cgroup v2 directory fd; the job starts in it.
    - ``reset_signals``: signals whose disposition goes back to SIG_DFL even if
      ignored; caught signals are always reset.  The signal mask is emptied.
    - ``own_sysfs``: the job gets a mount namespace of its own, a child of the
      one it joined (or the caller's), that differs only in /sys: a sysfs
      mounted from the network namespace joined, so that /sys/class/net lists
      the job's links, not the caller's.  /sys/fs/cgroup is carried over.
    - ``caps``: None leaves capabilities as they are; a set of CAP_* numbers
      is all that remains, in every set, the bounding set included, so no
      setuid or file-capability program can bring the others back.
    """

    path: str
    argv: Sequence[str]
    env: Mapping[str, str]
    ns_fds: Sequence[int | tuple[int, int]] = ()
    uid: int | None = None
    gid: int | None = None
    groups: Sequence[int] | None = None
    umask: int | None = None
    cwd: str | None = None
    stdio: tuple[int, int, int] = (-1, -1, -1)
    pdeathsig: int = 0
    cgroup_fd: int | None = None
    new_session: bool = False
    reset_signals: Sequence[int] = ALL_CATCHABLE_SIGNALS
    own_sysfs: bool = False
    caps: frozenset[int] | None = None


class SpawnError(Exception):
    """spawn() failed; ``stage`` names the step ("exec", "chdir", "setns", ...)."""

    def __init__(self, stage: str, errno: int, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type["SpawnError"], tuple[str, int, str]]:
        return (SpawnError, (self.stage, self.errno, self.message))


def _encode(s: str, what: str) -> bytes:
    b = os.fsencode(s)
    if b"\0" in b:
        raise ValueError(f"{what} contains a NUL byte: {s!r}")
    return b


def _check_id(value: int | None, what: str) -> int:
    if value is None:
        return -1
    if not 0 <= value < _NO_ID:
        raise ValueError(f"spawn: {what} {value} out of range")
    return value


def _describe(spec: SpawnSpec, stage: str, err: int) -> str:
    if stage == "pdeathsig" and err == errno.ESRCH:
        return "the spawning process died before the job started"
    if stage == "exec":
        return f"cannot exec {spec.path}"
    if stage == "chdir":
        return f"cannot chdir to {spec.cwd}"
    if stage == "setns":
        return f"cannot join namespaces {list(spec.ns_fds)}"
    if stage == "setuid":
        return f"cannot set uid {spec.uid}"
    if stage == "setgid":
        return f"cannot set gid {spec.gid}"
    if stage == "setgroups":
        return f"cannot set groups {list(spec.groups or [])}"
    if stage == "stdio":
        return f"cannot set up stdio from fds {spec.stdio}"
    if stage == "pdeathsig":
        return f"cannot arm parent-death signal {spec.pdeathsig}"
    if stage == "clone":
        return "cannot create the job process"
    if stage == "sysfs":
        return "cannot give the job a /sys of its own network"
    if stage == "caps":
        return "cannot drop the job's capabilities"
    if stage == "keeper":
        return f"cannot start the job's keeper {KEEPER}"
    return f"cannot prepare the job ({stage})"


def _attr(spec: SpawnSpec, keep: list[Any]) -> Any:
    """The C struct for ``spec``; ``keep`` holds every cdata it points into."""
    if not os.path.isabs(spec.path):
        raise ValueError(f"spawn: path must be absolute, got {spec.path!r}")
    if not spec.argv:
        raise ValueError("spawn: argv must not be empty")
    if len(spec.stdio) != 3 or any(fd < -1 for fd in spec.stdio):
        raise ValueError(f"spawn: bad stdio {spec.stdio!r}")
    if spec.umask is not None and not 0 <= spec.umask <= 0o777:
        raise ValueError(f"spawn: bad umask {spec.umask!r}")
    if spec.cgroup_fd is not None and spec.cgroup_fd < 0:
        raise ValueError(f"spawn: bad cgroup fd {spec.cgroup_fd}")
    if not 0 <= spec.pdeathsig <= _MAX_SIGNAL:
        raise ValueError(f"spawn: bad pdeathsig {spec.pdeathsig}")

    def cstr(s: str, what: str) -> Any:
        c = ffi.new("char[]", _encode(s, what))
        keep.append(c)
        return c

    def carray(ctype: str, items: list[Any]) -> Any:
        c = ffi.new(ctype, items)
        keep.append(c)
        return c

    env_items = []
    for k, v in spec.env.items():
        if not k or "=" in k:
            raise ValueError(f"spawn: bad environment variable name {k!r}")
        env_items.append(cstr(f"{k}={v}", "environment"))

    fds: list[int] = []
    types: list[int] = []
    for item in spec.ns_fds:
        fd, nstype = item if isinstance(item, tuple) else (item, 0)
        fds.append(fd)
        types.append(nstype)

    groups: Sequence[int] | None = spec.groups
    if groups is None and (spec.uid is not None or spec.gid is not None):
        groups = ()

    mask = 0
    for sig in spec.reset_signals:
        if not 1 <= sig <= _MAX_SIGNAL:
            raise ValueError(f"spawn: bad signal {sig} in reset_signals")
        mask |= 1 << (sig - 1)

    attr = ffi.new("struct lk_spawn_attr *")
    attr.path = cstr(spec.path, "path")
    attr.argv = carray("char *[]", [cstr(a, "argv") for a in spec.argv] + [ffi.NULL])
    attr.envp = carray("char *[]", [*env_items, ffi.NULL])
    attr.ns_fds = carray("int[]", fds) if fds else ffi.NULL
    attr.ns_types = carray("int[]", types) if types else ffi.NULL
    attr.n_ns = len(fds)
    attr.cgroup_fd = -1 if spec.cgroup_fd is None else spec.cgroup_fd
    attr.new_session = int(spec.new_session)
    attr.umask = -1 if spec.umask is None else spec.umask
    attr.uid = _check_id(spec.uid, "uid")
    attr.gid = _check_id(spec.gid, "gid")
    if groups is None:
        attr.groups = ffi.NULL
        attr.n_groups = -1
    else:
        attr.groups = (
            carray("uint32_t[]", [_check_id(g, "group") for g in groups]) if groups else ffi.NULL
        )
        attr.n_groups = len(groups)
    attr.cwd = ffi.NULL if spec.cwd is None else cstr(spec.cwd, "cwd")
    attr.stdio = list(spec.stdio)
    attr.pdeathsig = spec.pdeathsig
    attr.sigdefault = mask
    attr.own_sysfs = int(spec.own_sysfs)
    attr.confine_caps = int(spec.caps is not None)
    keep_caps = 0
    for cap in spec.caps or ():
        if not 0 <= cap < 64:
            raise ValueError(f"spawn: bad capability {cap}")
        keep_caps |= 1 << cap
    attr.cap_keep = keep_caps
    return attr


def _failed(spec: SpawnSpec, err_stage: Any, err_errno: Any) -> SpawnError:
    stage = STAGES.get(int(err_stage[0]), f"stage {int(err_stage[0])}")
    err = int(err_errno[0])
    return SpawnError(stage, err, f"{_describe(spec, stage, err)}: {os.strerror(err)}")


def spawn(spec: SpawnSpec) -> tuple[int, int]:
    """Start a job as described by ``spec``; return (pid, pidfd).

    Returns only once execve has succeeded; any failure before that raises
    SpawnError, with the child already reaped.  The pidfd is close-on-exec and
    belongs to the caller.
    """
    # Every cdata the attr points into must outlive the lk_spawn call: cffi frees
    # an ffi.new() object as soon as Python drops it.
    keep: list[Any] = []
    attr = _attr(spec, keep)
    pidfd = ffi.new("int *", -1)
    err_stage = ffi.new("int *", 0)
    err_errno = ffi.new("int *", 0)
    pid = int(lib.lk_spawn(attr, pidfd, err_stage, err_errno))
    if pid < 0:
        raise _failed(spec, err_stage, err_errno)
    return pid, int(pidfd[0])


@dataclass(frozen=True)
class Kept:
    """A job started under a keeper (spawn_kept): pids and pidfds of both."""

    keeper_pid: int
    keeper_pidfd: int
    job_pid: int
    job_pidfd: int


def _open_keeper() -> int:
    """An fd of the keeper program, for execveat: what was checked is what
    runs, whatever is renamed into its place meanwhile.

    larknsd is root and runs it as root, so it must be a regular file that
    only root (or this process's own user, who gains nothing) can write: one
    whose contents someone else can replace would run their code as root
    beside every job."""
    try:
        fd = os.open(KEEPER, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SpawnError(
            "keeper", e.errno or 0, f"cannot open the job's keeper {KEEPER}: {e.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "it is not a regular file"
    elif st.st_uid not in (0, os.geteuid()):
        problem = f"it belongs to uid {st.st_uid}, not to root"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"others than its owner may write it (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        os.close(fd)
        raise SpawnError(
            "keeper", errno.EPERM, f"refusing to run the job's keeper {KEEPER}: {problem}"
        )
    return fd


def spawn_kept(
    spec: SpawnSpec,
    status_dir_fd: int,
    status_name: str,
    watch_pidfd: int | None = None,
    cgroup_fd: int | None = None,
    comm: str = "larkns-keeper",
    pid_ns_fd: int | None = None,
) -> Kept:
    """Start a job as ``spawn`` does, but as the child of a keeper: a small
    process that outlives its caller (a daemon may restart while the job
    runs), kills the job when the process of ``watch_pidfd`` ends, and writes
    how the job ended ("code N" or "signal N", one line) to ``status_name``
    in the directory ``status_dir_fd`` once it has.  The keeper is the
    caller's child until the caller dies, and should be reaped.

    The keeper is the program ``KEEPER``, executed right after the fork: it
    shares no memory with the caller.  It starts in ``cgroup_fd``'s cgroup
    (the job's own is ``spec.cgroup_fd``); the job starts in the pid namespace
    of ``pid_ns_fd`` (the keeper stays in the caller's).  The keeper sets up
    no other namespaces, ids or limits of its own, and holds no fd but the
    three it needs.  Set ``spec.pdeathsig``: the job should not outlive a
    keeper killed by SIGKILL.

    SpawnError with stage "keeper": the keeper program is missing, may be
    written by someone other than root (then it is not run), or did not start.
    """
    if "/" in status_name or status_name in ("", ".", ".."):
        raise ValueError(f"spawn_kept: bad status file name {status_name!r}")
    if cgroup_fd is not None and cgroup_fd < 0:
        raise ValueError(f"spawn_kept: bad cgroup fd {cgroup_fd}")
    keep: list[Any] = []
    attr = _attr(spec, keep)
    k = ffi.new("struct lk_keep_attr *")
    k.watch_pidfd = -1 if watch_pidfd is None else watch_pidfd
    k.status_dirfd = status_dir_fd
    names = [
        ffi.new("char[]", _encode(n, "status file name"))
        for n in (status_name, f".{status_name}.tmp", comm[:15])
    ]
    k.status_name, k.status_tmp, k.comm = names
    k.cgroup_fd = -1 if cgroup_fd is None else cgroup_fd
    k.pid_ns_fd = -1 if pid_ns_fd is None else pid_ns_fd
    out = [ffi.new("int *", -1) for _ in range(3)]
    err_stage = ffi.new("int *", 0)
    err_errno = ffi.new("int *", 0)
    k.exe_fd = _open_keeper()
    try:
        pid = int(lib.lk_spawn_kept(attr, k, out[0], out[1], out[2], err_stage, err_errno))
    finally:
        os.close(k.exe_fd)
    if pid < 0:
        raise _failed(spec, err_stage, err_errno)
    return Kept(pid, int(out[0][0]), int(out[1][0]), int(out[2][0]))


#: bpf(2) program types (linux/bpf.h): a tc classifier.
BPF_PROG_TYPE_SCHED_CLS: Final[int] = 3


def bpf_prog_load(prog_type: int, insns: bytes, name: str) -> int:
    """Load the eBPF program `insns` (8 bytes an instruction); its fd, which
    the caller closes.  A refused program raises CoreError with the
    verifier's reason."""
    if len(insns) % 8:
        raise ValueError("eBPF instructions are 8 bytes each")
    code = ffi.from_buffer(insns)
    # Without a log first: the verifier's log of a large program overflows
    # any small buffer, and an overflowing log fails the load (ENOSPC).
    fd = int(
        lib.lk_bpf_prog_load(prog_type, code, len(insns) // 8, _encode(name, "name"), ffi.NULL, 0)
    )
    if fd >= 0:
        return fd
    err = int(ffi.errno)
    size = 1 << 20
    log = ffi.new("char[]", size)
    fd = int(
        lib.lk_bpf_prog_load(prog_type, code, len(insns) // 8, _encode(name, "name"), log, size)
    )
    if fd >= 0:  # loaded the second time: a passing failure (EAGAIN, ENOMEM)
        return fd
    # The verifier's reason is the last line before its statistics.
    lines = ffi.string(log).decode(errors="replace").strip().splitlines()
    why = [ln for ln in lines if not ln.startswith(("processed ", "verification time"))]
    detail = f": {why[-1]}" if why else ""
    raise CoreError(err, f"bpf(BPF_PROG_LOAD) failed: {os.strerror(err)}{detail}")


#: bpf(2) map types and flags (linux/bpf.h).
BPF_MAP_TYPE_HASH: Final[int] = 1
BPF_F_NO_PREALLOC: Final[int] = 1
_BPF_MAP_UPDATE_ELEM: Final[int] = 2
_BPF_MAP_DELETE_ELEM: Final[int] = 3


def bpf_map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str
) -> int:
    """A new eBPF map; its fd, which the caller closes."""
    fd = int(
        lib.lk_bpf_map_create(
            map_type, key_size, value_size, max_entries, flags, _encode(name, "name")
        )
    )
    if fd < 0:
        err = int(ffi.errno)
        raise CoreError(err, f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)}")
    return fd


def bpf_map_update(fd: int, key: bytes, value: bytes) -> None:
    """Set `key` to `value` in map `fd` (sizes as the map's)."""
    if lib.lk_bpf_map_elem(_BPF_MAP_UPDATE_ELEM, fd, key, value) < 0:
        err = int(ffi.errno)
        raise CoreError(err, f"bpf(BPF_MAP_UPDATE_ELEM) failed: {os.strerror(err)}")


def bpf_map_delete(fd: int, key: bytes) -> bool:
    """Remove `key` from map `fd`; False if it was not there."""
    if lib.lk_bpf_map_elem(_BPF_MAP_DELETE_ELEM, fd, key, ffi.NULL) < 0:
        err = int(ffi.errno)
        if err == errno.ENOENT:
            return False
        raise CoreError(err, f"bpf(BPF_MAP_DELETE_ELEM) failed: {os.strerror(err)}")
    return True
