"""larknsd: serves job wrappers on a unix socket, builds each job's network and
starts the job in it.

Identity comes from kernel facts only: the caller's pid and uids
(SO_PEERCRED), its ancestry up to its condor_starter, its namespaces and
cgroup.  A request can ask for nothing the caller could not do itself, except
the one thing larknsd is for: a job process in a network of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from larkns import core
from larkns.config import ConfigError, Settings, check_name
from larkns.daemon import protocol
from larkns.daemon.relay import Relay, UdpRelay, chirp_port, loopback_nameservers
from larkns.doctor import available_modes
from larkns.engine import Engine
from larkns.journal import Process, start_time
from larkns.kernel import netns
from larkns.plan import JobNetwork

STARTER = "condor_starter"
_JOINED = ("ipc", "uts", "mnt")  # the wrapper's namespaces the job shares


class Refused(Exception):
    """A request larknsd will not serve; the message goes to the caller."""


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    groups: list[int]
    umask: int
    starter: int | None  # the condor_starter it descends from


def peer(conn: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def starter_of(pid: int) -> int | None:
    """The nearest condor_starter among pid's ancestors, or None."""
    p = pid
    for _ in range(64):
        if p <= 1:
            return None
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() == STARTER:
                    return p
            p = _parent(p)
        except OSError:
            return None
    return None


def identify(pid: int, uid: int, gid: int) -> Caller:
    status = _status(pid)
    # Effective ids are what the kernel checks; a caller keeps no others.
    euid = int(status["Uid"].split()[1])
    egid = int(status["Gid"].split()[1])
    if (euid, egid) != (uid, gid):
        raise Refused("caller changed identity while connecting")
    groups = [int(g) for g in status.get("Groups", "").split()]
    return Caller(pid, uid, gid, groups, int(status.get("Umask", "0022"), 8), starter_of(pid))


def job_ad(starter: int) -> Any:
    """The job's ClassAd as its starter wrote it (.job.ad in the starter's
    working directory, its scratch dir: kernel facts, not what a request
    says); None if it cannot be read."""
    try:
        import classad2

        scratch = os.readlink(f"/proc/{starter}/cwd")
        with open(f"/proc/{starter}/root{scratch}/.job.ad") as f:
            return classad2.parseOne(f.read())
    except Exception:
        return None


def cgroup_fd(pid: int) -> int | None:
    """An fd of pid's cgroup v2 directory, for CLONE_INTO_CGROUP; None if there is none."""
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
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    path = line[3:].strip()
                    return os.open(mount + path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    return None


class Daemon:
    def __init__(self, settings: Settings, socket_path: str) -> None:
        from larkns.kernel.ra import Advertiser

        self.settings = settings
        self.socket_path = socket_path
        self.advertiser = Advertiser()
        # A node serving jobs all day keeps its table and state dir.
        self.engine = Engine(settings, self.advertiser, clean_when_idle=False)
        # Opened now, in the worker's netns: a connection thread may be inside
        # a job's namespace (netns is per thread) when it first needs them.
        _ = (self.engine.rtnl, self.engine.ipr, self.engine.ruleset)
        self.me = Process.of(os.getpid())
        # The engine's netlink sockets are not for two threads at once; its
        # own lock, which its DHCP renewers take too.
        self.lock = self.engine.lock
        # Jobs taken over from a larknsd that is gone, with their relays,
        # until their wrappers attach again.
        self._adopted: dict[str, list[Relay | UdpRelay]] = {}
        self._attached: set[str] = set()
        for line in self._adopt():
            print(f"larknsd: {line}", file=sys.stderr)
        self.listener = self._listen()
        self._stopping = threading.Event()

    def _listen(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(self.socket_path)
        # Anyone may connect; who is served is decided per caller.
        os.chmod(self.socket_path, 0o666)
        sock.listen(128)
        return sock

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def close(self) -> None:
        # Jobs still running keep their networks (a restarted daemon takes
        # them over); with none left, nothing of larkns stays.  The lock is
        # kept: a teardown in progress ends first, and none starts after
        # (what is left then is the next larknsd's).
        self.lock.acquire()
        self.engine.clean_if_idle()
        self.engine.close()
        self.advertiser.close()

    # -- one connection ----------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            fds: list[int] = []
            try:
                pid, uid, gid = peer(conn)
                msg, fds = protocol.receive(conn)
                if msg is None:
                    return
                if msg.get("op") == "info":
                    # What this node offers: public, read-only (the startd
                    # cron job asks, as the condor user).
                    protocol.send(conn, {"ok": True, **self.info()})
                    return
                caller = identify(pid, uid, gid)
                if caller.uid != 0 and caller.starter is None:
                    raise Refused(
                        f"pid {pid} (uid {uid}) is not a job of this node's HTCondor starter"
                    )
                if msg.get("op") == "prepare":
                    self._prepare(conn, caller)
                elif msg.get("op") == "launch":
                    self._launch(conn, caller, msg, fds)
                elif msg.get("op") == "attach":
                    self._attach(conn, caller, msg)
                else:
                    raise Refused(f"unknown operation {msg.get('op')!r}")
            except (Refused, ConfigError, protocol.ProtocolError) as e:
                self._refuse(conn, str(e))
            except Exception as e:
                print(f"larknsd: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc()
                self._refuse(conn, f"internal error: {e}")
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _refuse(self, conn: socket.socket, error: str) -> None:
        with contextlib.suppress(OSError):
            protocol.send(
                conn, {"ok": False, "error": error.splitlines()[0] if error else "refused"}
            )

    def _launch(
        self, conn: socket.socket, caller: Caller, msg: dict[str, Any], fds: list[int]
    ) -> None:
        argv, path, env, cwd = _launch_args(msg)
        if len(fds) != 3:
            raise Refused(
                f"expected the job's stdin, stdout and stderr, got {len(fds)} descriptors"
            )
        wrapper = Process.of(caller.pid)
        name = f"s{caller.starter}" if caller.starter else f"r{caller.pid}"
        plan = self._prepared(name, caller)
        mode = plan.mode if plan is not None else self._mode(caller)
        if plan is None:
            with self.lock:
                plan = self.engine.setup(name, mode, self.me, client=wrapper)
        relays: list[Relay | UdpRelay] = []
        kept: core.Kept | None = None
        try:
            # condor_chirp inside the job reaches its starter as it would
            # without larkns: at 127.0.0.1 and the same port.  A loopback
            # resolver (127.0.0.53, ...) would be the job's own loopback,
            # where nothing answers: relay it too.
            port = chirp_port(env, caller.starter) if caller.starter else None
            servers = loopback_nameservers(caller.pid)
            relays = _relays(plan.netns, port, servers)
            self.engine.wait_ready(plan, self.settings.slaac_timeout)
            addresses = self.engine.job_addresses(plan)
            env = {**env, **plan.job_env()}
            kept = self._spawn(caller, name, plan.netns, argv, path, env, cwd, fds)
            with self.lock:
                record = self.engine.journal.read(name)
                assert record is not None
                # From now on the job is for its wrapper (a prepared network
                # was for the starter), and a restarted larknsd finds all it
                # needs to take the job over here.
                record.client = wrapper
                record.keeper = Process(kept.keeper_pid, _start(kept.keeper_pid))
                record.job = Process(kept.job_pid, _start(kept.job_pid))
                record.extra["relays"] = {"chirp": port, "nameservers": servers}
                self.engine.journal.write(record)
        except BaseException:
            if kept is not None:
                with contextlib.suppress(OSError):
                    core.pidfd_send_signal(kept.job_pidfd, 9)
                os.waitid(os.P_PIDFD, kept.keeper_pidfd, os.WEXITED)
                os.close(kept.keeper_pidfd)
            for r in relays:
                r.close()
            with self.lock:
                self.engine.teardown(name)
            if kept is not None:
                os.close(kept.job_pidfd)
            raise
        reply = {
            "ok": True,
            "name": name,
            "pid": kept.job_pid,
            "mode": mode,
            "addresses": {"ipv4": addresses[0], "ipv6": addresses[1]},
            "inbound_ports": plan.inbound_ports,
            # The wrapper runs as the job's owner and cannot read the
            # node's configuration: larknsd tells it these knobs.
            "update_interval": self.settings.update_interval,
            "reattach_timeout": self.settings.reattach_timeout,
        }
        with self.lock:
            self._attached.add(name)  # served here: no second attach
        # A wrapper killed meanwhile cannot take it: the job's keeper then
        # kills the job, and _watch cleans up.
        with contextlib.suppress(OSError):
            protocol.send(conn, reply, [kept.job_pidfd])
        os.close(kept.job_pidfd)
        self._watch(conn, name, kept.keeper_pidfd, relays)

    def _attach(self, conn: socket.socket, caller: Caller, msg: dict[str, Any]) -> None:
        """A wrapper whose larknsd restarted takes up its job again: it gets
        the counters and the job's end from this larknsd."""
        name = msg.get("name")
        if not isinstance(name, str):
            raise Refused("name: expected the job's name")
        check_name(name)
        with self.lock:
            record = self.engine.journal.read(name)
            mine = (
                record is not None
                and record.owner == self.me
                and record.keeper is not None
                and record.client is not None
                and record.client.pid == caller.pid
                and record.client.alive()
                and name not in self._attached
            )
            if not mine:
                raise Refused(f"attach: {name!r} is no job of this caller's here")
            assert record is not None and record.keeper is not None
            self._attached.add(name)
            relays = self._adopted.pop(name, [])
        keeper_fd: int | None = None
        try:
            with contextlib.suppress(OSError):
                keeper_fd = os.pidfd_open(record.keeper.pid)
            if keeper_fd is not None and not record.keeper.alive():
                os.close(keeper_fd)  # that pid is another process's now
                keeper_fd = None
            protocol.send(conn, {"ok": True, "name": name})
        except BaseException:
            if keeper_fd is not None:
                os.close(keeper_fd)
            with self.lock:
                self._attached.discard(name)
                self._adopted[name] = relays
            raise
        self._watch(conn, name, keeper_fd, relays)

    def _watch(
        self,
        conn: socket.socket,
        name: str,
        keeper_fd: int | None,
        relays: list[Relay | UdpRelay],
    ) -> None:
        """Serve the job's wrapper until the job has ended, remove the job's
        network, and tell the wrapper how the job ended: when the wrapper
        ends, nothing of the job is left."""
        try:
            outcome = self._wait(conn, name, keeper_fd)
            with self.lock:
                traffic = self.engine.stats(name)
        finally:
            if keeper_fd is not None:
                os.close(keeper_fd)
            for r in relays:
                r.close()
            with self.lock:
                self.engine.teardown(name)
                self._attached.discard(name)
        with contextlib.suppress(OSError):
            protocol.send(conn, {"exit": outcome, "traffic": _traffic(traffic)})
        _drain(conn)

    def _adopt(self) -> list[str]:
        """Take over the jobs of a larknsd that is gone (a restart): their
        networks, relays and router advertisements.  Their keepers kept them
        running meanwhile; their wrappers attach again.  What has no live
        wrapper or keeper is left to gc."""
        done = []
        with self.lock:
            for record in self.engine.records():
                if record.owner.alive() or record.client is None or record.plan is None:
                    continue  # another's, a `larkns run` job, or half made: gc decides
                keeper_alive = record.keeper is not None and record.keeper.alive()
                if not record.client.alive() and not keeper_alive:
                    continue
                record.owner = self.me
                self.engine.journal.write(record)
                try:
                    self.engine.adopt(record.plan)
                except Exception as e:
                    # One job's trouble must not keep larknsd from serving
                    # the others: its wrapper attaches all the same.
                    print(f"larknsd: job {record.name}: not all taken over: {e}", file=sys.stderr)
                relays = record.extra.get("relays") or {}
                try:
                    self._adopted[record.name] = _relays(
                        record.plan.netns, relays.get("chirp"), relays.get("nameservers", [])
                    )
                except OSError as e:
                    print(f"larknsd: job {record.name}: relays not restored: {e}", file=sys.stderr)
                    self._adopted[record.name] = []
                done.append(f"took over job {record.name} from a larknsd that is gone")
        return done

    def info(self) -> dict[str, Any]:
        with self.lock:
            v4 = bool(self.engine.ipr.get_default_routes(family=socket.AF_INET))
            v6 = bool(self.engine.ipr.get_default_routes(family=socket.AF_INET6))
        modes = available_modes(self.settings)
        return {"modes": modes, "default_mode": self.settings.mode, "ipv4": v4, "ipv6": v6}

    def _prepare(self, conn: socket.socket, caller: Caller) -> None:
        """Build the network of the caller's job ahead of it (the PREPARE_JOB
        hook), so that a network that cannot be built puts the job on hold
        instead of failing it.  It lives as long as the job's starter."""
        if caller.starter is None:
            raise Refused("prepare: only for a job of an HTCondor starter")
        name = f"s{caller.starter}"
        plan = self._prepared(name, caller)
        if plan is None:
            mode = self._mode(caller)
            starter = Process.of(caller.starter)
            with self.lock:
                plan = self.engine.setup(name, mode, self.me, client=starter)
            threading.Thread(
                target=self._until_launched, args=(name, starter), name="prepared", daemon=True
            ).start()
        protocol.send(conn, {"ok": True, "name": name, "mode": plan.mode})

    def _until_launched(self, name: str, starter: Process) -> None:
        """A prepared network whose starter ends before its job is launched
        (the job removed or held meanwhile) goes at once, not at the next gc."""
        try:
            fd = os.pidfd_open(starter.pid)
        except OSError:
            fd = None
        try:
            while True:
                if fd is not None:
                    select.select([fd], [], [], 1.0)
                else:
                    time.sleep(1.0)
                with self.lock:
                    record = self.engine.journal.read(name)
                    if record is None or record.client != starter or record.owner != self.me:
                        return  # launched (the job's keeper and wrapper rule it now), or gone
                    if not starter.alive():
                        self.engine.teardown(name)
                        return
        finally:
            if fd is not None:
                os.close(fd)

    def _mode(self, caller: Caller) -> str:
        """The job's network type: the site's LARKNS_NETWORK_TYPE evaluated
        against its ad, or what the job asks for (+LarkNetworkType) if the
        site allows it."""
        ad = job_ad(caller.starter) if caller.starter else None
        return self.settings.job_mode(ad)

    def _prepared(self, name: str, caller: Caller) -> JobNetwork | None:
        """The network the PREPARE_JOB hook had built for this caller's job."""
        if caller.starter is None:
            return None
        record = self.engine.journal.read(name)
        if record is None or record.plan is None or record.owner != self.me:
            return None
        if record.client != Process.of(caller.starter):
            return None
        return record.plan

    def gc_forever(self, interval: float) -> None:
        """Remove what jobs that are gone left (a starter that died after the
        prepare hook, before its job started)."""
        # A first pass at once: a restarted larknsd removes at start what
        # its predecessor's jobs left (those it did not take over).
        first = True
        while first or not self._stopping.wait(interval):
            first = False
            try:
                with self.lock:
                    for line in self.engine.gc():
                        print(f"larknsd: gc removed {line}", file=sys.stderr)
                    # Taken-over jobs whose wrappers never came back.
                    for name in [n for n in self._adopted if self.engine.journal.read(n) is None]:
                        for r in self._adopted.pop(name):
                            r.close()
            except Exception as e:
                print(f"larknsd: gc failed: {e}", file=sys.stderr)

    def _spawn(
        self,
        caller: Caller,
        name: str,
        ns_name: str,
        argv: list[str],
        path: str,
        env: dict[str, str],
        cwd: str,
        fds: list[int],
    ) -> core.Kept:
        opened: list[int] = []
        try:
            opened.append(os.open(netns.path(ns_name), os.O_RDONLY | os.O_CLOEXEC))
            opened.append(os.pidfd_open(caller.pid))
            watch = opened[-1]
            opened.append(
                os.open(self.engine.journal.jobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            )
            status_dir = opened[-1]
            # An earlier job of this name may have left its end here (its
            # keeper wrote it after gc had removed the rest).
            self.engine.journal.exit_path(name).unlink(missing_ok=True)
            for ns in _JOINED:
                opened.append(os.open(f"/proc/{caller.pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
            # The wrapper's pid namespace too (HTCondor's USE_PID_NAMESPACES
            # gives each job one): joined by the keeper for its child.
            opened.append(os.open(f"/proc/{caller.pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
            pid_ns = opened[-1]
            cg = cgroup_fd(caller.pid)
            if cg is not None:
                opened.append(cg)
            spec = core.SpawnSpec(
                path=path,
                argv=argv,
                env=env,
                ns_fds=[opened[0], *opened[3 : 3 + len(_JOINED)]],
                uid=caller.uid,
                gid=caller.gid,
                groups=caller.groups,
                umask=caller.umask,
                cwd=cwd,
                stdio=(fds[0], fds[1], fds[2]),
                cgroup_fd=cg,
                # The job dies with its keeper (killed by SIGKILL: the
                # keeper ignores every other signal).
                pdeathsig=9,
            )
            try:
                # The keeper, the job's parent, lives in the job's cgroup:
                # a restart of larknsd (its service's cgroup) spares it.
                return core.spawn_kept(
                    spec,
                    status_dir,
                    f"{name}.exit",
                    watch_pidfd=watch,
                    cgroup_fd=cg,
                    pid_ns_fd=pid_ns,
                )
            except core.SpawnError as e:
                raise Refused(str(e)) from None
        finally:
            for fd in opened:
                os.close(fd)

    def _wait(self, conn: socket.socket, name: str, keeper_fd: int | None) -> dict[str, int]:
        """The job's end ({"code"} or {"signal"}), once its keeper has written
        it down (the keeper also kills the job if the wrapper dies first).
        Meanwhile the wrapper may ask for the job's counters ({"op": "stats"})."""
        poller = select.poll()
        if keeper_fd is not None:
            poller.register(keeper_fd, select.POLLIN)
        poller.register(conn.fileno(), select.POLLIN)
        while keeper_fd is not None:
            ready = {fd for fd, _ in poller.poll()}
            if keeper_fd in ready:
                # Ours to reap unless we took the job over from another larknsd.
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PIDFD, keeper_fd, os.WEXITED)
                break
            if conn.fileno() in ready:
                try:
                    msg, _ = protocol.receive(conn, max_fds=0)
                except protocol.ProtocolError as e:
                    self._refuse(conn, str(e))
                    continue
                except OSError:
                    msg = None
                if msg is None:
                    # The wrapper closed its end but lives (or is dying): its
                    # keeper watches it; stop listening to it.
                    poller.unregister(conn.fileno())
                    continue
                if msg.get("op") == "stats":
                    with self.lock:
                        traffic = self.engine.stats(name)
                    with contextlib.suppress(OSError):
                        protocol.send(conn, {"traffic": _traffic(traffic)})
                else:
                    self._refuse(conn, f"unknown operation {msg.get('op')!r} while the job runs")
        end = self.engine.journal.exit_status(name)
        if end is None:
            # A keeper killed before its job's end (SIGKILL, the whole cgroup
            # killed): its job got the same signal (parent-death signal).
            print(f"larknsd: job {name}: its keeper died; the job was killed", file=sys.stderr)
            return {"signal": 9}
        return end


def _drain(conn: socket.socket, timeout: float = 5.0) -> None:
    """Read what the wrapper still sends (counter requests) until it closes.
    A unix socket closed with unread messages resets its peer, which could
    then lose the job's end sent just before."""
    conn.settimeout(timeout)
    with contextlib.suppress(OSError, protocol.ProtocolError):
        while protocol.receive(conn, max_fds=0)[0] is not None:
            pass


def _start(pid: int) -> int:
    """pid's start time; 0 if it has already ended (a zombie or gone)."""
    return start_time(pid) or 0


def _relays(ns_name: str, chirp: int | None, nameservers: list[str]) -> list[Relay | UdpRelay]:
    out: list[Relay | UdpRelay] = []
    try:
        if chirp is not None:
            out.append(Relay(ns_name, chirp))
        for server in nameservers:
            out += [Relay(ns_name, 53, server), UdpRelay(ns_name, 53, server)]
    except BaseException:
        for r in out:
            r.close()
        raise
    return out


def _launch_args(msg: dict[str, Any]) -> tuple[list[str], str, dict[str, str], str]:
    argv, path, env, cwd = msg.get("argv"), msg.get("path"), msg.get("env"), msg.get("cwd")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise Refused("argv: expected a non-empty list of strings")
    if not isinstance(path, str) or not path.startswith("/"):
        raise Refused("path: expected an absolute path")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise Refused("cwd: expected an absolute path")
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise Refused("env: expected a list of NAME=VALUE strings")
    # What execve cannot take (a C string ends at a NUL byte; JSON can also
    # carry a lone surrogate, which has no bytes) is refused here, by name.
    for what, items in (("argv", argv), ("path", [path]), ("cwd", [cwd]), ("env", env)):
        for item in items:
            if "\0" in item:
                raise Refused(f"{what}: contains a NUL byte")
            try:
                os.fsencode(item)
            except UnicodeEncodeError:
                raise Refused(f"{what}: not encodable as bytes") from None
    pairs = [e.split("=", 1) for e in env]
    if not all(k for k, _ in pairs):
        raise Refused("env: a variable without a name")
    return argv, path, {k: v for k, v in pairs}, cwd


def _traffic(t: Any) -> dict[str, Any]:
    def fam(inc: Any, out: Any) -> dict[str, Any]:
        return {
            "bytes": {"incoming": inc.bytes, "outgoing": out.bytes},
            "packets": {"incoming": inc.packets, "outgoing": out.packets},
        }

    return {
        **fam(t.incoming, t.outgoing),
        "families": {"ipv4": fam(t.ipv4_in, t.ipv4_out), "ipv6": fam(t.ipv6_in, t.ipv6_out)},
        "classes": {n: fam(inc, out) for n, (inc, out) in t.classes.items()},
        "dropped": {"packets": t.dropped.packets, "bytes": t.dropped.bytes},
    }


def _parent_is(comm: str) -> bool:
    try:
        with open(f"/proc/{os.getppid()}/comm") as f:
            return f.read().strip() == comm
    except OSError:
        return False


def _stop_with_parent(daemon: Daemon) -> None:
    parent = os.getppid()
    try:
        fd = os.pidfd_open(parent)
    except OSError:
        fd = -1
    if fd >= 0 and os.getppid() == parent:
        select.select([fd], [], [])  # readable once the parent has exited
        os.close(fd)
    print("larknsd: its parent is gone; stopping", file=sys.stderr)
    daemon.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    from larkns import config

    ap = argparse.ArgumentParser(prog="larknsd", description="larkns's root daemon")
    ap.add_argument("--socket", default=protocol.socket_path())
    ap.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the parent process ends (the default under condor_master)",
    )
    args = ap.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise ConfigError("larknsd must run as root")
        settings = config.load()
        daemon = Daemon(settings, args.socket)
    except (ConfigError, OSError) as e:
        print(f"larknsd: error: {e}", file=sys.stderr)
        return 125
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    threading.Thread(target=daemon.gc_forever, args=(60.0,), name="gc", daemon=True).start()
    if args.exit_with_parent or _parent_is("condor_master"):
        # condor_master does not always signal its daemons on a fast
        # shutdown (FACTS.md): larknsd must not stay behind, unmanaged.
        threading.Thread(
            target=_stop_with_parent, args=(daemon,), name="parent", daemon=True
        ).start()
    print(json.dumps({"larknsd": "ready", "socket": args.socket}), flush=True)
    try:
        daemon.serve_forever()
    finally:
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
