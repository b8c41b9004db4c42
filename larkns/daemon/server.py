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
import traceback
from dataclasses import dataclass
from typing import Any

from larkns import core
from larkns.config import MODES, ConfigError, Settings
from larkns.daemon import protocol
from larkns.daemon.relay import Relay, UdpRelay, chirp_port, loopback_nameservers
from larkns.engine import Engine
from larkns.journal import Process
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
        # The engine's netlink sockets are not for two threads at once.
        self.lock = threading.Lock()
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
        # Jobs still running keep their networks (a restarted daemon finds
        # them in the journal); with none left, nothing of larkns stays.
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
        client_fd = os.pidfd_open(caller.pid)
        name = f"s{caller.starter}" if caller.starter else f"r{caller.pid}"
        plan = self._prepared(name, caller)
        mode = plan.mode if plan is not None else self._mode(caller)
        if plan is None:
            with self.lock:
                plan = self.engine.setup(name, mode, self.me, client=Process.of(caller.pid))
        relays: list[Relay | UdpRelay] = []
        try:
            # condor_chirp inside the job reaches its starter as it would
            # without larkns: at 127.0.0.1 and the same port.
            port = chirp_port(env, caller.starter) if caller.starter else None
            if port is not None:
                relays.append(Relay(plan.netns, port))
            # A loopback resolver (127.0.0.53, ...) would be the job's own
            # loopback, where nothing answers: relay it too.
            for server in loopback_nameservers(caller.pid):
                relays += [Relay(plan.netns, 53, server), UdpRelay(plan.netns, 53, server)]
            self.engine.wait_ready(plan, self.settings.slaac_timeout)
            addresses = self.engine.job_addresses(plan)
            pid, job_fd = self._spawn(caller, plan.netns, argv, path, env, cwd, fds)
        except BaseException:
            os.close(client_fd)
            for r in relays:
                r.close()
            with self.lock:
                self.engine.teardown(name)
            raise
        try:
            protocol.send(
                conn,
                {
                    "ok": True,
                    "name": name,
                    "pid": pid,
                    "mode": mode,
                    "addresses": {"ipv4": addresses[0], "ipv6": addresses[1]},
                },
                [job_fd],
            )
            outcome = self._wait(conn, name, job_fd, client_fd)
            with self.lock:
                traffic = self.engine.stats(name)
            if outcome is not None:
                with contextlib.suppress(OSError):
                    protocol.send(conn, {"exit": outcome, "traffic": _traffic(traffic)})
        finally:
            os.close(job_fd)
            os.close(client_fd)
            for r in relays:
                r.close()
            with self.lock:
                self.engine.teardown(name)

    def info(self) -> dict[str, Any]:
        with self.lock:
            v4 = bool(self.engine.ipr.get_default_routes(family=socket.AF_INET))
            v6 = bool(self.engine.ipr.get_default_routes(family=socket.AF_INET6))
        return {"modes": list(MODES), "default_mode": self.settings.mode, "ipv4": v4, "ipv6": v6}

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
            with self.lock:
                plan = self.engine.setup(name, mode, self.me, client=Process.of(caller.starter))
        protocol.send(conn, {"ok": True, "name": name, "mode": plan.mode})

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
        while not self._stopping.wait(interval):
            try:
                with self.lock:
                    for line in self.engine.gc():
                        print(f"larknsd: gc removed {line}", file=sys.stderr)
            except Exception as e:
                print(f"larknsd: gc failed: {e}", file=sys.stderr)

    def _spawn(
        self,
        caller: Caller,
        ns_name: str,
        argv: list[str],
        path: str,
        env: dict[str, str],
        cwd: str,
        fds: list[int],
    ) -> tuple[int, int]:
        opened: list[int] = []
        try:
            opened.append(os.open(netns.path(ns_name), os.O_RDONLY | os.O_CLOEXEC))
            for ns in _JOINED:
                opened.append(os.open(f"/proc/{caller.pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
            cg = cgroup_fd(caller.pid)
            if cg is not None:
                opened.append(cg)
            spec = core.SpawnSpec(
                path=path,
                argv=argv,
                env=env,
                ns_fds=opened[: 1 + len(_JOINED)],
                uid=caller.uid,
                gid=caller.gid,
                groups=caller.groups,
                umask=caller.umask,
                cwd=cwd,
                stdio=(fds[0], fds[1], fds[2]),
                cgroup_fd=cg,
            )
            try:
                return core.spawn(spec)
            except core.SpawnError as e:
                raise Refused(str(e)) from None
        finally:
            for fd in opened:
                os.close(fd)

    def _wait(
        self, conn: socket.socket, name: str, job_fd: int, client_fd: int
    ) -> dict[str, int] | None:
        """The job's end ({"code"} or {"signal"}); None if its wrapper died first
        (then the job is killed: it must not outlive the wrapper HTCondor watches).
        Meanwhile the wrapper may ask for the job's counters ({"op": "stats"})."""
        poller = select.poll()
        poller.register(job_fd, select.POLLIN)
        poller.register(client_fd, select.POLLIN)
        poller.register(conn.fileno(), select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if job_fd in ready:
                info = os.waitid(os.P_PIDFD, job_fd, os.WEXITED)
                assert info is not None
                if info.si_code == os.CLD_EXITED:
                    return {"code": info.si_status}
                return {"signal": info.si_status}
            if client_fd in ready:
                with contextlib.suppress(OSError):
                    core.pidfd_send_signal(job_fd, 9)
                os.waitid(os.P_PIDFD, job_fd, os.WEXITED)
                return None
            if conn.fileno() in ready:
                try:
                    msg, _ = protocol.receive(conn, max_fds=0)
                except protocol.ProtocolError as e:
                    self._refuse(conn, str(e))
                    continue
                if msg is None:
                    # The wrapper closed its end but lives (or is dying):
                    # its pidfd says which; stop listening to it.
                    poller.unregister(conn.fileno())
                    continue
                if msg.get("op") == "stats":
                    with self.lock:
                        traffic = self.engine.stats(name)
                    protocol.send(conn, {"traffic": _traffic(traffic)})
                else:
                    self._refuse(conn, f"unknown operation {msg.get('op')!r} while the job runs")


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
    pairs = [e.split("=", 1) for e in env]
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
