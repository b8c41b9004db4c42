"""Who is asking larknsd: kernel facts a user cannot forge.

Every job owner is an attacker.  A process name (`comm`), the environment,
and every file of the job's scratch dir are the owner's to write, so none of
them says who a caller is.  What does:

- the caller's uids and pid, from the kernel at connect time (SO_PEERCRED),
  and a pidfd of that very process (SO_PEERPIDFD; where the kernel lacks it,
  before 6.5, pidfd_open and a check that the process is still the one that
  connected), through which everything else about it is read: a pid number
  alone may be another process's by the time it is used;
- its starter: the caller's parent, which must be the node's condor_starter
  (the inode of its executable is that of HTCondor's STARTER, its real uid
  root or HTCondor's, its network namespace larknsd's), whose own parent is
  the node's condor_startd (STARTD's inode, root or HTCondor's uid).  A user
  can copy or rename a binary, and set any process name; a user's process
  can run the real starter only as the user, and never as a child of the
  startd.

Files root reads on a caller's behalf (the job ad, the chirp configuration
in the job's scratch dir) are opened O_NOFOLLOW|O_NONBLOCK relative to the
starter's working directory, must be regular files of the expected owner and
of bounded size, and their contents never appear in an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

# Linux 6.5: a pidfd of the peer as it was at connect().  Not in Python 3.11's
# socket module.
SO_PEERPIDFD = 77
# ioctl(ns_fd, NS_GET_USERNS): the user namespace that owns a namespace.
NS_GET_USERNS = 0xB701


class Refused(Exception):
    """A request larknsd will not serve; the message goes to the caller."""


@dataclass(frozen=True)
class CondorDaemons:
    """What the node's HTCondor configuration says its daemons are."""

    starter: tuple[str, ...] = ()  # paths of condor_starter binaries (STARTER)
    startd: tuple[str, ...] = ()  # paths of condor_startd (STARTD)
    uids: frozenset[int] = frozenset({0})  # root, and HTCondor's own (CONDOR_IDS)
    # What the starter runs of larkns's (USER_JOB_WRAPPER, the PREPARE_JOB
    # hook): the only programs, among a starter's children, that are served.
    entries: tuple[str, ...] = ()

    @classmethod
    def from_config(cls) -> CondorDaemons:
        """From the HTCondor configuration ($CONDOR_CONFIG or
        /etc/condor/condor_config); none known if there is none."""
        from larkns.config import condor_params

        params = condor_params(
            ("STARTER", "STARTD", "CONDOR_IDS", "USER_JOB_WRAPPER", "LARKNS_HOOK_PREPARE_JOB")
        )
        uids = {0}
        ids = params.get("CONDOR_IDS", "")
        uid = ids.split(".")[0].strip()
        if uid.isdigit():
            uids.add(int(uid))
        else:
            with contextlib.suppress(KeyError):
                import pwd

                uids.add(pwd.getpwnam("condor").pw_uid)
        return cls(
            starter=tuple(p for p in [params.get("STARTER")] if p),
            startd=tuple(p for p in [params.get("STARTD")] if p),
            uids=frozenset(uids),
            entries=tuple(
                p
                for p in (params.get("USER_JOB_WRAPPER"), params.get("LARKNS_HOOK_PREPARE_JOB"))
                if p
            ),
        )

    def describe(self) -> str:
        if not self.starter or not self.startd:
            return "no HTCondor configuration: only root's callers are served"
        return f"serving jobs of {', '.join(self.starter)} under {', '.join(self.startd)}"


def _inodes(paths: tuple[str, ...]) -> set[tuple[int, int]]:
    """(device, inode) of each path, read now: an upgrade of HTCondor
    replaces the binaries, and the starters it starts then are the node's."""
    out = set()
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            out.add((st.st_dev, st.st_ino))
    return out


@dataclass
class Held:
    """A process held by a pidfd, and its /proc directory opened while the
    pidfd showed it alive: both stay that process's even if its pid is
    reused.  (journal.Process is a process as a record keeps it: pid and
    start time.)"""

    pid: int
    pidfd: int
    proc: int  # fd of /proc/PID
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, pid: int, pidfd: int | None = None) -> Held:
        """`pid` as it is now (with `pidfd` if the caller has one: it is
        taken over, closed with this)."""
        if pidfd is None:
            pidfd = os.pidfd_open(pid)
        try:
            proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            raise ProcessLookupError(pid) from None
        p = cls(pid, pidfd, proc)
        if not p.alive():
            # The /proc directory opened may be a later process's.
            p.close()
            raise ProcessLookupError(pid)
        return p

    def alive(self) -> bool:
        # poll, not select: larknsd may hold more than 1024 descriptors.
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return not p.poll(0)  # a pidfd becomes readable when its process exits

    def read(self, name: str, limit: int = 1 << 16) -> bytes:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc)
        try:
            return os.read(fd, limit)
        finally:
            os.close(fd)

    def status(self) -> dict[str, str]:
        out = {}
        for line in self.read("status").decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def parent(self) -> int:
        stat_ = self.read("stat")
        return int(stat_[stat_.rindex(b")") + 2 :].split()[1])

    def real_uid(self) -> int:
        return int(self.status()["Uid"].split()[0])

    def exe(self) -> tuple[int, int] | None:
        """(device, inode) of its executable; None if unknown (a kernel thread)."""
        try:
            st = os.stat("exe", dir_fd=self.proc)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def ns(self, kind: str) -> int:
        """An fd of its namespace `kind` (net, mnt, ...)."""
        return os.open(f"ns/{kind}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc)

    def ns_inode(self, kind: str) -> int:
        return os.stat(f"ns/{kind}", dir_fd=self.proc).st_ino

    def open_dir(self, link: str) -> int:
        """An fd of the directory its `cwd` or `root` link names."""
        return os.open(link, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.proc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.proc)
            os.close(self.pidfd)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Caller:
    """A connected client: its credentials and its process (open)."""

    process: Held
    uid: int
    gid: int
    groups: list[int]
    umask: int
    starter: Held | None  # the node's condor_starter it is a child of

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        if self.starter is not None:
            self.starter.close()
        self.process.close()


def peer(conn: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def peer_process(conn: socket.socket, pid: int) -> Held:
    """The connected process, held by a pidfd: the kernel's own (SO_PEERPIDFD,
    Linux 6.5) or, on older kernels, one opened by pid.  There a reused pid
    could name another process; identify() then still requires the
    credentials the kernel recorded at connect time, so it is at worst
    another process of the same user."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
        pidfd: int | None = struct.unpack("i", raw)[0]
    except OSError:
        pidfd = None
    if pidfd is not None:
        os.set_inheritable(pidfd, False)
    return Held.open(pid, pidfd)


def identify(conn: socket.socket, daemons: CondorDaemons) -> Caller:
    """The caller on `conn`, with its starter if it is a job's wrapper or
    hook (a child of the node's condor_starter).  Raises Refused."""
    pid, uid, gid = peer(conn)
    try:
        process = peer_process(conn, pid)
    except ProcessLookupError:
        raise Refused(f"pid {pid}: gone before it could be served") from None
    try:
        status = process.status()
        # Effective ids are what the kernel checks; a caller keeps no others.
        euid = int(status["Uid"].split()[1])
        egid = int(status["Gid"].split()[1])
        if (euid, egid) != (uid, gid) or int(status["Uid"].split()[0]) != uid:
            raise Refused("caller changed identity while connecting")
        groups = [int(g) for g in status.get("Groups", "").split()]
        umask = int(status.get("Umask", "0022"), 8)
        starter = verify_starter(process, daemons)
        if not process.alive():
            if starter is not None:
                starter.close()
            raise Refused(f"pid {pid}: gone before it could be served")
    except BaseException:
        process.close()
        raise
    return Caller(process, uid, gid, groups, umask, starter)


def verify_starter(process: Held, daemons: CondorDaemons) -> Held | None:
    """The caller's parent if it is the node's condor_starter and the caller
    larkns's wrapper or hook (by its executable: the starter runs other
    programs as the job's owner too, such as a +PreCmd), open; None if not."""
    starters = _inodes(daemons.starter)
    startds = _inodes(daemons.startd)
    if not starters or not startds or process.exe() not in _inodes(daemons.entries):
        return None
    try:
        ppid = process.parent()
        starter = Held.open(ppid)
    except (OSError, ValueError):
        return None
    try:
        my_net = os.stat("/proc/self/ns/net").st_ino
        ok = (
            starter.exe() in starters
            and starter.real_uid() in daemons.uids
            and starter.ns_inode("net") == my_net
        )
        if ok:
            with Held.open(starter.parent()) as startd:
                ok = startd.exe() in startds and startd.real_uid() in daemons.uids
        # Still the caller's parent, and still alive: what was read was its.
        ok = ok and process.parent() == ppid and starter.alive()
    except (OSError, ValueError, KeyError):
        ok = False
    if not ok:
        starter.close()
        return None
    return starter


def owned_by_root_namespaces(fd: int) -> bool:
    """Whether the namespace `fd` belongs to larknsd's own user namespace
    (was made by root, not by a user in a user namespace of their own)."""
    try:
        userns = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError:
        return False
    try:
        return os.fstat(userns).st_ino == os.stat("/proc/self/ns/user").st_ino
    finally:
        os.close(userns)


def read_user_file(dir_fd: int, name: str, owners: set[int], limit: int) -> bytes:
    """The contents of `name` in the directory `dir_fd`, which a user
    controls: not through a symlink, not a FIFO or device (which would block
    or never end), owned by one of `owners`, at most `limit` bytes.  Raises
    Refused with a reason that quotes nothing of the file."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as e:
        raise Refused(f"{name}: cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{name}: not a regular file")
        if st.st_uid not in owners:
            raise Refused(f"{name}: not the job's (owned by uid {st.st_uid})")
        if st.st_size > limit:
            raise Refused(f"{name}: larger than {limit} bytes")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise Refused(f"{name}: larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


def cgroup_fd(process: Held) -> int | None:
    """An fd of the process's cgroup v2 directory, for CLONE_INTO_CGROUP;
    None if there is none."""
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                mount = fields[4]
                break
    if mount is None:
        return None
    try:
        for line in process.read("cgroup").decode(errors="replace").splitlines():
            if line.startswith("0::"):
                path = Path(mount + line[3:].strip())
                return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    return None
