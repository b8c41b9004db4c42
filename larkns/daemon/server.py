"""larknsd: serves job wrappers on a unix socket, builds each job's network and
starts the job in it.

Identity comes from kernel facts only (identity.py): the caller's uids and a
pidfd of it from the kernel, and its parent being the node's condor_starter
by that starter's executable, uid, network namespace and parent.  A request
can ask for nothing the caller could not do itself, except the one thing
larknsd is for: a job process in a network of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from larkns import core, ledger, seal
from larkns.config import ConfigError, Settings, check_name
from larkns.daemon import chirp, identity, protocol
from larkns.daemon.identity import Caller, CondorDaemons, Refused
from larkns.daemon.metrics import NodeCounts
from larkns.daemon.relay import Relay, UdpRelay, listening_ports, loopback_nameservers
from larkns.doctor import available_modes
from larkns.engine import Engine, TeardownError
from larkns.journal import ChirpAccess, Process, Record, Relays, start_time, user_name
from larkns.kernel import netns
from larkns.kernel.nft import NftError
from larkns.plan import JobNetwork, LinkedNetwork

if TYPE_CHECKING:
    from larkns.daemon.endpoint import Endpoint
    from larkns.watch import Watcher

_JOINED = ("ipc", "uts", "mnt")  # the wrapper's namespaces the job shares

# A wrapper sends its request as soon as it has connected: a connection
# without one by then only holds a thread and a descriptor of larknsd's.
REQUEST_TIMEOUT = 5.0
# A peer that takes no reply for this long is not served further (a send to
# a peer that reads nothing would block its thread for good).
REPLY_TIMEOUT = 60.0
# Descriptors kept free for the work in progress (a launch opens a dozen
# for a moment), at least; or this share of the limit.
FD_RESERVE = 64
FD_RESERVE_SHARE = 16
# How long to wait before accepting again after accept(2) failed (out of
# descriptors or memory): the pending connections wait in the backlog.
ACCEPT_BACKOFF = 0.1


def job_ad(text: object) -> Any:
    """The job's ClassAd from the text the PREPARE_JOB hook read on its stdin
    (from the starter).  Raises Refused."""
    import classad2

    if not isinstance(text, str) or not text.strip():
        raise Refused("ad: expected the job's ClassAd")
    try:
        return classad2.parseOne(text)
    except Exception:
        raise Refused("ad: not a ClassAd") from None


def _scratch_file(caller: Caller, daemons: CondorDaemons, name: str, limit: int) -> bytes | None:
    """A file of the job's scratch dir (the starter's working directory);
    None if there is none of that name."""
    assert caller.starter is not None
    try:
        cwd = caller.starter.open_dir("cwd")
    except OSError:
        raise Refused("the starter's working directory cannot be opened") from None
    try:
        return identity.read_user_file(cwd, name, {caller.uid, *daemons.uids}, limit)
    except Refused:
        if _missing(cwd, name):
            return None
        raise
    finally:
        os.close(cwd)


def _missing(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def job_chirp(caller: Caller, daemons: CondorDaemons) -> chirp.ChirpConfig | None:
    """The job's chirp server, if its starter (the node's, in larknsd's
    network namespace) really listens on the port .chirp.config names."""
    if caller.starter is None:
        return None
    try:
        data = _scratch_file(caller, daemons, ".chirp.config", 4096)
    except Refused as e:
        print(f"larknsd: job of starter {caller.starter.pid}: {e}", file=sys.stderr)
        return None
    found = chirp.ChirpConfig.parse(data) if data is not None else None
    if found is None or found.port not in listening_ports(caller.starter):
        return None
    return found


class Daemon:
    def __init__(
        self, settings: Settings, socket_path: str, daemons: CondorDaemons | None = None
    ) -> None:
        from larkns.kernel.ra import Advertiser

        self.settings = settings
        self.socket_path = socket_path
        self.daemons = daemons if daemons is not None else CondorDaemons()
        self.advertiser = Advertiser()
        # A node serving jobs all day keeps its table and state dir.
        self.engine = Engine(settings, self.advertiser, clean_when_idle=False)
        self.watcher: Watcher | None = None
        self._shaping: bool | None = None
        # Opened now, in the worker's netns: a connection thread may be inside
        # a job's namespace (netns is per thread) when it first needs them.
        _ = (self.engine.rtnl, self.engine.ipr)
        self.engine.open_tables()
        self.me = Process.of(os.getpid())
        self.seal_key = seal.key(settings.lib_dir)
        # Every job's end and samples of its counters (None: LARKNS_LEDGER
        # is off, or cannot be opened: said, and jobs run all the same).
        self.ledger: ledger.Ledger | None = None
        try:
            self.ledger = ledger.open_for(settings)
        except ledger.LedgerError as e:
            print(f"larknsd: no ledger: {e}", file=sys.stderr)
        # The engine's netlink sockets are not for two threads at once; its
        # own lock, which its DHCP renewers take too.
        self.lock = self.engine.lock
        # Jobs taken over from a larknsd that is gone, with their relays,
        # until their wrappers attach again.
        self._adopted: dict[str, list[Relay | UdpRelay]] = {}
        self._attached: set[str] = set()
        # Networks prepared for a starter's job and not launched yet, with
        # the uid of the job's owner.
        self._prepared_for: dict[str, int] = {}
        self.counts = NodeCounts()  # of its work, for the metrics (metrics.py)
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
        """Accept and serve connections until stop().  Nothing a caller
        does ends this loop: out of descriptors, memory or threads, larknsd
        waits a moment and goes on (the idle connections time out)."""
        connections = Connections(self.settings.max_connections_per_uid)
        failing = False  # accept(2) is failing: said once, until it works again
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                if not failing:
                    print(f"larknsd: cannot accept connections: {e}; retrying", file=sys.stderr)
                    failing = True
                self._stopping.wait(ACCEPT_BACKOFF)
                continue
            if failing:
                print("larknsd: accepting connections again", file=sys.stderr)
                failing = False
            if not self._admit(conn, connections):
                self._stopping.wait(ACCEPT_BACKOFF)

    def _admit(self, conn: socket.socket, connections: Connections) -> bool:
        """Serve `conn` on a thread of its own, or refuse it at once (its
        user has too many connections, or larknsd too few descriptors left).
        False if no thread could be had."""
        try:
            uid = identity.peer(conn)[1]
        except OSError:
            conn.close()
            return True
        refusal = connections.admit(uid, conn.fileno())
        if refusal is not None:
            _refuse_now(conn, refusal)
            return True
        try:
            threading.Thread(
                target=self._serve_counted, args=(conn, uid, connections), daemon=True
            ).start()
        except RuntimeError as e:  # "can't start new thread": out of memory or tasks
            connections.release(uid)
            print(f"larknsd: cannot serve a connection: {e}", file=sys.stderr)
            _refuse_now(conn, "larknsd is overloaded; try again later")
            return False
        return True

    def _serve_counted(self, conn: socket.socket, uid: int, connections: Connections) -> None:
        try:
            self._serve(conn)
        finally:
            connections.release(uid)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def watch(self) -> None:
        """Put back what a flush of the ruleset takes from this larknsd's
        jobs (larkns/watch.py); from the worker's netns, as __init__."""
        from larkns.watch import Watcher

        self.watcher = Watcher(
            self.engine,
            lambda: [r for r in self.engine.records() if r.owner == self.me],
            lambda line: print(f"larknsd: {line}", file=sys.stderr),
        )

    def close(self) -> None:
        # Jobs still running keep their networks (a restarted daemon takes
        # them over); with none left, nothing of larkns stays.  The lock is
        # kept: a teardown in progress ends first, and none starts after
        # (what is left then is the next larknsd's).
        if self.watcher is not None:
            self.watcher.close()
        self.lock.acquire()
        self.engine.clean_if_idle()
        self.engine.close()
        self.advertiser.close()
        if self.ledger is not None:
            self.ledger.close()

    # -- one connection ----------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            fds: list[int] = []
            caller: Caller | None = None
            try:
                msg, fds = _request(conn)
                if msg is None:
                    return
                if msg.get("op") == "info":
                    # What this node offers: public, read-only (the startd
                    # cron job asks, as the condor user).
                    protocol.send(conn, {"ok": True, **self.info()})
                    return
                caller = identity.identify(conn, self.daemons)
                if caller.uid != 0 and caller.starter is None:
                    raise Refused(
                        f"pid {caller.pid} (uid {caller.uid}) is not a job of this node's "
                        "HTCondor starter"
                    )
                if msg.get("op") == "prepare":
                    self._prepare(conn, caller, msg)
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
                if caller is not None:
                    caller.close()
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _refuse(self, conn: socket.socket, error: str) -> None:
        with contextlib.suppress(OSError, protocol.ProtocolError):
            protocol.send(conn, _refusal(error))

    def _launch(
        self, conn: socket.socket, caller: Caller, msg: dict[str, Any], fds: list[int]
    ) -> None:
        argv, path, env, cwd = _launch_args(msg)
        if len(fds) != 3:
            raise Refused(
                f"expected the job's stdin, stdout and stderr, got {len(fds)} descriptors"
            )
        wrapper = Process.of(caller.pid)
        name = f"s{caller.starter.pid}" if caller.starter else f"r{caller.pid}"
        prepared = self._prepared(name, caller)
        plan = prepared.plan if prepared is not None else None
        # Without a network prepared from the job's ad (no PREPARE_JOB hook
        # configured): the node's default type.
        mode = plan.mode if plan is not None else self.settings.job_mode(None)
        job_id = prepared.job_id if prepared is not None else None
        chirp_to = job_chirp(caller, self.daemons)
        # A loopback resolver (127.0.0.53, ...) would be the job's own
        # loopback, where nothing answers: relayed, as the starter sees it.
        servers = loopback_nameservers(caller.starter or caller.process)
        if plan is None:
            policy = self.settings.job_policy(None)
            with self.lock:
                plan = self.counts.timed(self.engine.setup)(
                    name, mode, self.me, client=wrapper, policy=policy
                )
        with self.lock:
            self._prepared_for.pop(name, None)
        relays: list[Relay | UdpRelay] = []
        kept: core.Kept | None = None
        try:
            # condor_chirp inside the job reaches its starter as it would
            # without larkns: at 127.0.0.1 and the same port.
            relays = _relays(plan.netns, chirp_to.port if chirp_to else None, servers)
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
                record.user = record.user or user_name(caller.uid)
                record.keeper = Process(kept.keeper_pid, _start(kept.keeper_pid))
                record.job = Process(kept.job_pid, _start(kept.job_pid))
                record.relays = Relays(chirp_to.port if chirp_to else None, tuple(servers))
                if "Owner" not in record.account:
                    record.account["Owner"] = _user_name(caller.uid)
                if chirp_to is not None:
                    # The journal is root's alone (0700).
                    record.chirp = ChirpAccess(chirp_to.port, chirp_to.cookie, job_id or "")
                self.engine.journal.write(record)
        except BaseException:
            if kept is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(kept.job_pidfd, signal.SIGKILL)
                os.waitid(os.P_PIDFD, kept.keeper_pidfd, os.WEXITED)
                os.close(kept.keeper_pidfd)
            for r in relays:
                r.close()
            with self.lock:
                self._teardown(name)
            if kept is not None:
                os.close(kept.job_pidfd)
            raise
        reply = {
            "ok": True,
            "name": name,
            "pid": kept.job_pid,
            "mode": mode,
            "addresses": {"ipv4": addresses[0], "ipv6": addresses[1]},
            "inbound_ports": plan.forwarded_ports,
            # The wrapper runs as the job's owner and cannot read the
            # node's configuration: larknsd tells it this knob.
            "reattach_timeout": self.settings.reattach_timeout,
        }
        with self.lock:
            self._attached.add(name)  # served here: no second attach
        # A wrapper killed meanwhile cannot take it: the job's keeper then
        # kills the job, and _watch cleans up.
        with contextlib.suppress(OSError):
            protocol.send(conn, reply, [kept.job_pidfd])
        os.close(kept.job_pidfd)
        started = time.monotonic()
        if chirp_to is not None:
            ports = plan.forwarded_ports
            self._publish(
                name,
                chirp_to,
                {
                    "LarkAssignedNetworkType": chirp.quote(mode),
                    "LarkNetworkPolicy": chirp.quote(plan.destination_policy),
                    # The job's cap, bits/s of link-layer bytes (none: uncapped).
                    **_cap_attributes(plan),
                    "LarkIPv4Address": chirp.quote(addresses[0] or ""),
                    "LarkIPv6Addresses": chirp.quote(",".join(addresses[1] or [])),
                    # The worker's ports that reach the job (TCP and UDP),
                    # for its clients: "FIRST-LAST".
                    **(
                        {"LarkInboundPorts": chirp.quote(f"{ports[0]}-{ports[1]}")} if ports else {}
                    ),
                },
            )
        self._watch(
            conn,
            name,
            kept.keeper_pidfd,
            relays,
            chirp_to,
            started,
            job_id if isinstance(job_id, str) else "",
        )

    def _publish(self, name: str, to: chirp.ChirpConfig, attrs: dict[str, str]) -> None:
        """Into the job's ad, through its starter; a failure is logged (the
        starter may be gone with a removed job)."""
        try:
            chirp.publish(to, attrs)
        except (OSError, chirp.ChirpError) as e:
            print(f"larknsd: job {name}: cannot publish its counters: {e}", file=sys.stderr)

    def _attach(self, conn: socket.socket, caller: Caller, msg: dict[str, Any]) -> None:
        """A wrapper whose larknsd restarted takes up its job again: it gets
        the job's end from this larknsd."""
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
        found = record.chirp
        chirp_to = None if found is None else chirp.ChirpConfig(found.port, found.cookie)
        job_id = str(found.get("job_id", "")) if isinstance(found, dict) else ""
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
        self._watch(conn, name, keeper_fd, relays, chirp_to, time.monotonic(), job_id)

    def _watch(
        self,
        conn: socket.socket,
        name: str,
        keeper_fd: int | None,
        relays: list[Relay | UdpRelay],
        chirp_to: chirp.ChirpConfig | None,
        started: float,
        job_id: str,
    ) -> None:
        """Serve the job's wrapper until the job has ended, publishing its
        counters meanwhile; remove the job's network, publish its final
        counters (sealed: seal.py), and tell the wrapper how the job ended:
        when the wrapper ends, nothing of the job is left and its ad is
        complete."""
        try:
            outcome = self._wait(conn, name, keeper_fd, relays, chirp_to)
            # The relays close first (again in `finally`: closing is
            # idempotent): the job's chirp ends before the last word.
            for r in relays:
                r.close()
            with self.lock:
                traffic = _traffic(self.engine.stats(name), relays)
                ended = self.engine.journal.read(name)
                if ended is not None and ended.uncounted:
                    traffic["uncounted_s"] = round(ended.uncounted, 3)
        finally:
            if keeper_fd is not None:
                os.close(keeper_fd)
            for r in relays:
                r.close()
            with self.lock:
                self._teardown(name)
                self._attached.discard(name)
        if chirp_to is not None:
            final = chirp.attributes(traffic)
            final[seal.ATTRIBUTE] = chirp.quote(seal.seal(self.seal_key, job_id, final))
            seconds = max(time.monotonic() - started, 1e-3)
            final["LarkNetworkBandwidthIncoming"] = str(
                round(traffic["bytes"]["incoming"] / seconds)
            )
            final["LarkNetworkBandwidthOutgoing"] = str(
                round(traffic["bytes"]["outgoing"] / seconds)
            )
            self._publish(name, chirp_to, final)
        if ended is not None:
            # Before the wrapper hears of the end: once it has, the job
            # is done for HTCondor, and must be in the ledger.
            self._keep(ended, traffic, outcome)
        with contextlib.suppress(OSError):
            protocol.send(conn, {"exit": outcome, "traffic": traffic})
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
                to = record.relays or Relays(None, ())
                try:
                    self._adopted[record.name] = _relays(
                        record.plan.netns, to.chirp, list(to.nameservers), record.relayed
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
        return {
            "modes": modes,
            "default_mode": self.settings.mode,
            "ipv4": v4,
            "ipv6": v6,
            # Destination policies (nat and routed jobs), and the site's
            # destination sets a job's policy may name.
            "policies": bool({"nat", "routed"} & set(modes)),
            "destination_sets": [d.name for d in self.settings.destinations],
            "shaping": self._can_shape(),
            # What jobs share of the uplink, bits/s (LARKNS_UPLINK_BANDWIDTH).
            "uplink_bandwidth": self.settings.uplink_bandwidth,
        }

    def _can_shape(self) -> bool:
        """Whether jobs can be capped here (HTB and IFB), probed once."""
        if self._shaping is None:
            from larkns.doctor import _shaping_probe

            try:
                _shaping_probe()
                self._shaping = True
            except Exception:
                self._shaping = False
        return self._shaping

    def _prepare(self, conn: socket.socket, caller: Caller, msg: dict[str, Any]) -> None:
        """Build the network of the caller's job ahead of it (the PREPARE_JOB
        hook), so that a network that cannot be built puts the job on hold
        instead of failing it.  It lives as long as the job's starter.

        The job's network type comes from its ad as the starter gave it to
        the hook (larkns's own, checked by its executable), never from the
        scratch dir's .job.ad, which the job's owner can replace."""
        if caller.starter is None:
            raise Refused("prepare: only for a job of an HTCondor starter")
        name = f"s{caller.starter.pid}"
        prepared = self._prepared(name, caller)
        plan = prepared.plan if prepared is not None else None
        if plan is None:
            ad = job_ad(msg.get("ad"))
            mode = self.settings.job_mode(ad)
            policy = self.settings.job_policy(ad)
            bandwidth = self.settings.job_bandwidth(ad)
            weight = self.settings.job_weight(ad)
            job_id = ad.get("GlobalJobId")
            starter = Process.of(caller.starter.pid)
            with self.lock:
                waiting = sum(1 for uid in self._prepared_for.values() if uid == caller.uid)
                if waiting >= self.settings.max_prepared_per_user:
                    raise Refused(
                        f"uid {caller.uid} has {waiting} networks prepared and not launched "
                        f"(LARKNS_MAX_PREPARED_PER_USER = {self.settings.max_prepared_per_user})"
                    )
                plan = self.counts.timed(self.engine.setup)(
                    name,
                    mode,
                    self.me,
                    client=starter,
                    policy=policy,
                    bandwidth=bandwidth,
                    weight=weight,
                )
                record = self.engine.journal.read(name)
                if record is not None:
                    record.job_id = job_id if isinstance(job_id, str) else None
                    # HTCondor's Owner, who may run as another user (a slot user).
                    owner = ad.get("Owner")
                    record.user = owner if isinstance(owner, str) else user_name(caller.uid)
                    record.account = ledger.ad_account(ad)
                    self.engine.journal.write(record)
                self._prepared_for[name] = caller.uid
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
            # poll, not select: select cannot watch an fd above 1023, and
            # larknsd may have thousands open.
            ended = select.poll()
            if fd is not None:
                ended.register(fd, select.POLLIN)
            while True:
                if fd is not None:
                    ended.poll(1000)
                else:
                    time.sleep(1.0)
                with self.lock:
                    record = self.engine.journal.read(name)
                    if record is None or record.client != starter or record.owner != self.me:
                        self._prepared_for.pop(name, None)
                        return  # launched (the job's keeper and wrapper rule it now), or gone
                    if not starter.alive():
                        self._teardown(name)
                        self._prepared_for.pop(name, None)
                        return
        finally:
            if fd is not None:
                os.close(fd)

    def _prepared(self, name: str, caller: Caller) -> Record | None:
        """The record of the network the PREPARE_JOB hook had built for this
        caller's job (its plan is set)."""
        if caller.starter is None:
            return None
        record = self.engine.journal.read(name)
        if record is None or record.plan is None or record.owner != self.me:
            return None
        if record.client != Process.of(caller.starter.pid):
            return None
        return record

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
                    swept = self.engine.gc()
                    self.counts.removed(len(swept.removed))
                    for line in swept.removed:
                        print(f"larknsd: gc removed {line}", file=sys.stderr)
                    for line in swept.left:
                        print(f"larknsd: gc could not remove {line}", file=sys.stderr)
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
            # The wrapper as it connected (its pidfd from the kernel), not
            # whatever process has its pid now.
            opened.append(os.dup(caller.process.pidfd))
            watch = opened[-1]
            opened.append(
                os.open(self.engine.journal.jobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            )
            status_dir = opened[-1]
            # An earlier job of this name may have left its end here (its
            # keeper wrote it after gc had removed the rest).
            self.engine.journal.exit_path(name).unlink(missing_ok=True)
            for ns in (*_JOINED, "pid"):
                opened.append(caller.process.ns(ns))
                if caller.uid != 0 and not identity.owned_by_root_namespaces(opened[-1]):
                    # Made by the user in a user namespace of their own: the
                    # job is not to run in a world its owner arranged.
                    raise Refused(f"the wrapper's {ns} namespace is not the starter's making")
            # The wrapper's pid namespace too (HTCondor's USE_PID_NAMESPACES
            # gives each job one): joined by the keeper for its child.
            pid_ns = opened[-1]
            cg = identity.cgroup_fd(caller.process)
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
                # /sys/class/net then lists the job's own links, not the
                # worker's (sysfs shows the network of whoever mounted it).
                own_sysfs=True,
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

    def _wait(
        self,
        conn: socket.socket,
        name: str,
        keeper_fd: int | None,
        relays: list[Relay | UdpRelay],
        chirp_to: chirp.ChirpConfig | None,
    ) -> dict[str, int]:
        """The job's end ({"code"} or {"signal"}), once its keeper has written
        it down (the keeper also kills the job if the wrapper dies first).
        Meanwhile its counters go into its ad every LARKNS_UPDATE_INTERVAL,
        and the wrapper may ask for them ({"op": "stats"})."""
        poller = select.poll()
        if keeper_fd is not None:
            poller.register(keeper_fd, select.POLLIN)
        poller.register(conn.fileno(), select.POLLIN)
        interval = self.settings.update_interval
        next_update = time.monotonic() + interval
        updating = chirp_to is not None or self.ledger is not None
        while keeper_fd is not None:
            wait_ms = max(0, int((next_update - time.monotonic()) * 1000))
            ready = {fd for fd, _ in poller.poll(wait_ms if updating else None)}
            if updating and time.monotonic() >= next_update:
                with self.lock:
                    traffic = _traffic(self.engine.stats(name), relays)
                    self._keep_relayed(name, relays)
                    record = self.engine.journal.read(name)
                if chirp_to is not None:
                    self._publish(name, chirp_to, chirp.attributes(traffic))
                if record is not None:
                    self._sample(record, traffic)
                next_update = time.monotonic() + interval
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
                        traffic = _traffic(self.engine.stats(name), relays)
                    with contextlib.suppress(OSError):
                        protocol.send(conn, {"traffic": traffic})
                else:
                    self._refuse(conn, f"unknown operation {msg.get('op')!r} while the job runs")
        end = self.engine.journal.exit_status(name)
        if end is None:
            # A keeper killed before its job's end (SIGKILL, the whole cgroup
            # killed): its job got the same signal (parent-death signal).
            print(f"larknsd: job {name}: its keeper died; the job was killed", file=sys.stderr)
            return {"signal": 9}
        return end

    def _teardown(self, name: str) -> None:
        """Remove job `name`'s network; what cannot be removed is logged,
        and stays in its record for gc (which runs every minute)."""
        try:
            self.engine.teardown(name)
        except TeardownError as e:
            print(f"larknsd: {e}", file=sys.stderr)

    def _keep(self, record: Record, traffic: dict[str, Any], outcome: dict[str, int]) -> None:
        """The job's row in the ledger; a failure is logged."""
        if self.ledger is None:
            return
        try:
            self.ledger.add_job(ledger.condor_job(record, traffic, outcome, time.time()))
        except ledger.LedgerError as e:
            print(f"larknsd: job {record.name}: not in the ledger: {e}", file=sys.stderr)

    def _sample(self, record: Record, traffic: dict[str, Any]) -> None:
        if self.ledger is None:
            return
        try:
            self.ledger.add_sample(record.name, ledger.started(record), time.time(), traffic)
        except ledger.LedgerError as e:
            print(f"larknsd: job {record.name}: no sample in the ledger: {e}", file=sys.stderr)

    def _keep_relayed(self, name: str, relays: list[Relay | UdpRelay]) -> None:
        """What the relays carried so far, in the job's record: a restarted
        larknsd counts on from there."""
        record = self.engine.journal.read(name)
        if record is not None:
            record.relayed = (sum(r.incoming for r in relays), sum(r.outgoing for r in relays))
            self.engine.journal.write(record)


class Connections:
    """How many connections each user holds (a running job's lasts as long
    as the job): no user can take all of larknsd's descriptors, and larknsd
    keeps some free for the work in progress."""

    def __init__(self, per_uid: int) -> None:
        self.per_uid = per_uid
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()
        self._capped: set[int] = set()  # uids refused, said once until under their cap
        self._short = False  # refused for want of descriptors, said once

    def admit(self, uid: int, fd: int) -> str | None:
        """Count a connection of `uid` that got descriptor `fd`; or why not."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        reserve = max(FD_RESERVE, soft // FD_RESERVE_SHARE)
        # A new descriptor is the lowest free one: when even that one is this
        # close to the limit, fewer than the reserve are left.  accept(2)
        # takes its number when it starts to wait, maybe long ago: look again.
        if soft != resource.RLIM_INFINITY and fd >= soft - reserve:
            fd = _lowest_free_fd(fd)
        if soft != resource.RLIM_INFINITY and fd >= soft - reserve:
            if not self._short:
                print(
                    f"larknsd: refusing connections: descriptor {fd} of {soft} in use",
                    file=sys.stderr,
                )
                self._short = True
            return "larknsd is short of file descriptors; try again later"
        self._short = False
        with self._lock:
            held = self._held.get(uid, 0)
            if held >= self.per_uid:
                if uid not in self._capped:
                    print(
                        f"larknsd: refusing connections of uid {uid}: it holds {held} "
                        f"(LARKNS_MAX_CONNECTIONS_PER_UID)",
                        file=sys.stderr,
                    )
                    self._capped.add(uid)
                return (
                    f"uid {uid} holds {held} connections to larknsd already "
                    f"(LARKNS_MAX_CONNECTIONS_PER_UID={self.per_uid})"
                )
            self._held[uid] = held + 1
        return None

    def release(self, uid: int) -> None:
        with self._lock:
            held = self._held.get(uid, 0) - 1
            if held > 0:
                self._held[uid] = held
            else:
                self._held.pop(uid, None)
            if held < self.per_uid:
                self._capped.discard(uid)


def _lowest_free_fd(fd: int) -> int:
    """The number the next new descriptor gets (`fd` is any open one); the
    limit itself when there is none left."""
    try:
        free = os.dup(fd)
    except OSError:
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    os.close(free)
    return free


def _request(conn: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The connection's request and its descriptors, if it comes within
    REQUEST_TIMEOUT; (None, []) if the peer is gone."""
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        got = protocol.receive(conn)
    except TimeoutError:
        raise Refused(f"no request within {REQUEST_TIMEOUT:g} s") from None
    except OSError:
        return None, []
    conn.settimeout(REPLY_TIMEOUT)
    return got


def _refusal(error: str) -> dict[str, Any]:
    """A refusal's message: one line, of a size that fits any message."""
    line = next((x for x in error.splitlines() if x.strip()), "refused")
    return {"ok": False, "error": line if len(line) <= 1000 else line[:997] + "..."}


def _refuse_now(conn: socket.socket, error: str) -> None:
    """Refuse a connection from the accepting thread, which must not wait
    on any peer, and close it."""
    with conn:
        conn.setblocking(False)
        with contextlib.suppress(OSError, protocol.ProtocolError):
            protocol.send(conn, _refusal(error))
        # A socket closed with a message unread resets its peer, which then
        # never reads the refusal: read (and drop) what has come, and close
        # whatever descriptors came with it.
        with contextlib.suppress(OSError):
            while True:
                data, fds, _flags, _ = socket.recv_fds(conn, 1, 8, socket.MSG_CMSG_CLOEXEC)
                for fd in fds:
                    os.close(fd)
                if not data and not fds:
                    break


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


def _relays(
    ns_name: str,
    chirp_port: int | None,
    nameservers: list[str],
    relayed: tuple[int, int] | None = None,
) -> list[Relay | UdpRelay]:
    """The job's relays; `relayed` (in, out) what earlier relays of the job
    carried (before a restart), counted on by the first."""
    out: list[Relay | UdpRelay] = []
    try:
        if chirp_port is not None:
            out.append(Relay(ns_name, chirp_port, chirp=True))
        for server in nameservers:
            out += [Relay(ns_name, 53, server), UdpRelay(ns_name, 53, server)]
    except BaseException:
        for r in out:
            r.close()
        raise
    if out and relayed is not None:
        out[0].incoming, out[0].outgoing = relayed
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


def _traffic(t: Any, relays: Sequence[Relay | UdpRelay] = ()) -> dict[str, Any]:
    """A job's counters as the protocol and the job ad carry them: what
    crossed its link, plus what larkns's relays carried between its loopback
    and the worker's (chirp, DNS), which is in the totals too."""

    def fam(inc: Any, out: Any) -> dict[str, Any]:
        return {
            "bytes": {"incoming": inc.bytes, "outgoing": out.bytes},
            "packets": {"incoming": inc.packets, "outgoing": out.packets},
        }

    relayed_in = sum(r.incoming for r in relays)
    relayed_out = sum(r.outgoing for r in relays)
    total = fam(t.incoming, t.outgoing)
    total["bytes"]["incoming"] += relayed_in
    total["bytes"]["outgoing"] += relayed_out
    return {
        **total,
        "families": {"ipv4": fam(t.ipv4_in, t.ipv4_out), "ipv6": fam(t.ipv6_in, t.ipv6_out)},
        "relayed": {"bytes": {"incoming": relayed_in, "outgoing": relayed_out}},
        "classes": {n: fam(inc, out) for n, (inc, out) in t.classes.items()},
        "dropped": {"packets": t.dropped.packets, "bytes": t.dropped.bytes},
        "refused": {"packets": t.refused.packets, "bytes": t.refused.bytes},
        # What the job's kernel-side CLAT dropped as untranslatable.
        **({"untranslated": {"packets": t.untranslated.packets}} if t.untranslated.packets else {}),
    }


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _cap_attributes(plan: JobNetwork) -> dict[str, str]:
    if not isinstance(plan, LinkedNetwork):
        return {}
    out = {}
    if plan.bandwidth is not None:
        out["LarkNetworkCapDown"] = str(plan.bandwidth[0])
        out["LarkNetworkCapUp"] = str(plan.bandwidth[1])
    if plan.weight is not None:
        out["LarkNetworkWeight"] = f"{plan.weight:g}"
    translator = getattr(plan, "translator", None)
    if translator is not None:
        # The job's IPv4 is a CLAT's (IPv6-only worker): "bpf" (in the
        # kernel) or "tayga" (a process).
        out["LarkCLATTranslator"] = chirp.quote(translator)
    return out


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


def _raise_fd_limit() -> None:
    """Every descriptor the hard limit allows: each running job holds a few
    (its connection, its keeper's pidfd, its relays)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _metrics_endpoint(settings: Settings) -> Endpoint | None:
    """LARKNS_METRICS's endpoint, bound; OSError (one line) if it cannot be."""
    if settings.metrics is None:
        return None
    from larkns.daemon import metrics

    try:
        return metrics.listen(settings.metrics)
    except OSError as e:
        where = metrics.describe(settings.metrics)
        raise OSError(f"LARKNS_METRICS: cannot listen on {where}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    import argparse

    from larkns import config

    ap = argparse.ArgumentParser(prog="larknsd", description="larkns's root daemon")
    ap.add_argument("--socket", help="where to listen (default: LARKNS_SOCKET, /run/larknsd.sock)")
    ap.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the parent process ends (the default under condor_master)",
    )
    args = ap.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise ConfigError("larknsd must run as root")
        _raise_fd_limit()
        settings = config.load()
        Engine.validate(settings)
        daemons = CondorDaemons.from_config()
        print(f"larknsd: {daemons.describe()}", file=sys.stderr)
        endpoint = _metrics_endpoint(settings)
        try:
            daemon = Daemon(settings, args.socket or str(settings.socket), daemons)
        except BaseException:
            if endpoint is not None:
                endpoint.close()
            raise
    except (ConfigError, OSError, NftError) as e:
        print(f"larknsd: error: {e}", file=sys.stderr)
        return 125
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    threading.Thread(target=daemon.gc_forever, args=(60.0,), name="gc", daemon=True).start()
    daemon.watch()
    if args.exit_with_parent or _parent_is("condor_master"):
        # condor_master did not signal a DAEMON_LIST program on a fast
        # shutdown (condor_off -master -fast, seen on HTCondor 25.0):
        # larknsd must not stay behind, unmanaged.
        threading.Thread(
            target=_stop_with_parent, args=(daemon,), name="parent", daemon=True
        ).start()
    ready: dict[str, str] = {"larknsd": "ready", "socket": daemon.socket_path}
    if endpoint is not None:
        from larkns.daemon import metrics

        metrics.start(endpoint, daemon)
        ready["metrics"] = metrics.describe(endpoint.where)
    print(json.dumps(ready), flush=True)
    try:
        daemon.serve_forever()
    finally:
        if endpoint is not None:
            endpoint.close()
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
