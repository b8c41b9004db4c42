"""Relays from a job's loopback to the worker's.

A job in its own network namespace cannot reach services that listen on the
worker's 127.0.0.1, the starter's chirp port first among them.  A relay
listens on the same address and port inside the job's namespace and carries
each connection over to the worker's.

Only the chirp port of the job's own condor_starter (identified by kernel
facts, see identity.py) is relayed, and only if that starter listens on it
in the worker's network namespace; and the loopback nameservers of the
node's resolv.conf.  Nothing else on the worker's loopback becomes reachable.

A relay counts the bytes it carries (they are the job's traffic: larknsd adds
them to the job's totals as "relayed"), and carries at most
MAX_CONNECTIONS at once, so that a job cannot spend larknsd's file
descriptors: each relayed connection holds two.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from larkns.daemon.chirp import ChirpError, RequestFilter
from larkns.daemon.identity import Held
from larkns.kernel import netns

LOCALHOST = "127.0.0.1"
_LISTEN = "0A"
#: Connections (TCP) or clients (UDP) a relay carries at once.
MAX_CONNECTIONS = 32


def listening_ports(process: Held) -> set[int]:
    """TCP ports `process` listens on, on 127.0.0.1 or any address, in this
    thread's network namespace (larknsd's, where the node's starter is)."""
    inodes = set()
    fd_dir = f"/proc/{process.pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                link = os.readlink(f"{fd_dir}/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    if not process.alive():
        return set()  # those fds were a later process's
    ports = set()
    with contextlib.suppress(OSError), open("/proc/thread-self/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            addr, port = local.split(":")
            if state == _LISTEN and inode in inodes and addr in ("0100007F", "00000000"):
                ports.add(int(port, 16))
    return ports


def loopback_nameservers(process: Held) -> list[str]:
    """Nameservers on the loopback in the resolv.conf that `process` (the
    node's starter: root, so its root directory is the node's) sees (a local
    resolver such as systemd-resolved's 127.0.0.53)."""
    out: list[str] = []
    try:
        root = process.open_dir("root")
    except OSError:
        return out
    try:
        fd = os.open("etc/resolv.conf", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=root)
    except OSError:
        return out
    finally:
        os.close(root)
    with open(fd, "rb") as f:
        text = f.read(1 << 16).decode(errors="replace")
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(fields[1]).is_loopback and fields[1] not in out:
                    out.append(fields[1])
    return out


class _Relay:
    """A socket bound to address:port inside netns `ns_name`, served by a
    thread until close(); the thread's own sockets are made in the netns of
    the thread that made the relay (the worker's)."""

    kind = socket.SOCK_STREAM

    def __init__(self, ns_name: str, port: int, address: str) -> None:
        self.port = port
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # Bytes carried: to the worker (the job's outgoing) and back.
        self.outgoing = 0
        self.incoming = 0
        with netns.entered(ns_name):
            self._inner = socket.socket(self.family, self.kind | socket.SOCK_CLOEXEC)
            try:
                # A fresh namespace's loopback is up (larkns brings it up).
                self._inner.bind((address, port))
                if self.kind == socket.SOCK_STREAM:
                    self._inner.listen(16)
            except BaseException:
                self._inner.close()
                raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name=f"relay-{port}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (a second call does nothing)."""
        if self._wake_w.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=15)
        self._wake_w.close()

    def _run(self) -> None:
        raise NotImplementedError


class Relay(_Relay):
    """Listens on address:port (default 127.0.0.1) in netns `ns_name`; carries
    TCP connections to the same address and port in the netns of the thread
    that made it.  With `chirp`, what the job sends is filtered: it may not
    set the attributes larknsd publishes (chirp.RequestFilter)."""

    def __init__(
        self, ns_name: str, port: int, address: str = LOCALHOST, chirp: bool = False
    ) -> None:
        self._new_filter: Callable[[], RequestFilter] | None = RequestFilter if chirp else None
        super().__init__(ns_name, port, address)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._inner, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        peers: dict[socket.socket, socket.socket] = {}
        # The job's end of each connection, with its filter (if any).
        jobside: dict[socket.socket, RequestFilter | None] = {}
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "listen":
                        self._accept(sel, peers, jobside)
                        continue
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    if not self._carry(src, peers, jobside):
                        self._drop(sel, peers, jobside, src)
        finally:
            for s in list(peers):
                with contextlib.suppress(Exception):
                    sel.unregister(s)
                s.close()
            sel.close()
            self._inner.close()
            self._wake_r.close()

    def _carry(
        self,
        src: socket.socket,
        peers: dict[socket.socket, socket.socket],
        jobside: dict[socket.socket, RequestFilter | None],
    ) -> bool:
        """Carry what `src` has to its peer; False when the pair is done."""
        dst = peers.get(src)
        try:
            data = src.recv(1 << 16)
        except OSError:
            data = b""
        if not data or dst is None:
            return False
        try:
            if src in jobside:
                filt = jobside[src]
                answer = b""
                if filt is not None:
                    data, answer = filt.feed(data)
                self.outgoing += len(data)
                dst.sendall(data)
                if answer:
                    src.sendall(answer)
            else:
                self.incoming += len(data)
                dst.sendall(data)
        except (OSError, ChirpError):
            return False
        return True

    def _accept(
        self,
        sel: selectors.BaseSelector,
        peers: dict[socket.socket, socket.socket],
        jobside: dict[socket.socket, RequestFilter | None],
    ) -> None:
        try:
            inner, _ = self._inner.accept()
        except OSError:
            return
        if len(jobside) >= MAX_CONNECTIONS:
            inner.close()  # the job has enough open: it gets a reset
            return
        try:
            # Made in this thread's netns: the worker's, where the starter is.
            outer = socket.create_connection((self.address, self.port), timeout=10)
            outer.settimeout(None)
        except OSError:
            inner.close()
            return
        peers[inner], peers[outer] = outer, inner
        jobside[inner] = self._new_filter() if self._new_filter else None
        sel.register(inner, selectors.EVENT_READ, "conn")
        sel.register(outer, selectors.EVENT_READ, "conn")

    def _drop(
        self,
        sel: selectors.BaseSelector,
        peers: dict[socket.socket, socket.socket],
        jobside: dict[socket.socket, RequestFilter | None],
        s: socket.socket,
    ) -> None:
        other = peers.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            with contextlib.suppress(Exception):
                sel.unregister(x)
            peers.pop(x, None)
            jobside.pop(x, None)
            x.close()


class UdpRelay(_Relay):
    """Datagrams to address:port in netns `ns_name` go to the same address and
    port in the netns of the thread that made it, and answers come back: one
    upstream socket per job-side client, dropped after a minute unused."""

    kind = socket.SOCK_DGRAM
    IDLE = 60.0

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._inner, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        upstream: dict[Any, tuple[socket.socket, float]] = {}
        try:
            while True:
                for key, _ in sel.select(timeout=self.IDLE / 2):
                    if key.data == "stop":
                        return
                    if key.fileobj is self._inner:
                        with contextlib.suppress(OSError):
                            data, client = self._inner.recvfrom(1 << 16)
                            up = upstream.get(client)
                            if up is None and len(upstream) >= MAX_CONNECTIONS:
                                continue  # a job's flood of clients: dropped
                            if up is None:
                                # Made in this thread's netns: the worker's.
                                s = socket.socket(
                                    self.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                )
                                try:
                                    s.connect((self.address, self.port))
                                    sel.register(s, selectors.EVENT_READ, client)
                                except OSError:
                                    s.close()
                                    raise
                                up = (s, 0.0)
                            upstream[client] = (up[0], time.monotonic())
                            up[0].send(data)
                            self.outgoing += len(data)
                        continue
                    answer = key.fileobj
                    assert isinstance(answer, socket.socket)
                    with contextlib.suppress(OSError):
                        reply = answer.recv(1 << 16)
                        self._inner.sendto(reply, key.data)
                        self.incoming += len(reply)
                now = time.monotonic()
                for client, (s, used) in list(upstream.items()):
                    if now - used > self.IDLE:
                        sel.unregister(s)
                        s.close()
                        del upstream[client]
        finally:
            for s, _ in upstream.values():
                s.close()
            sel.close()
            self._inner.close()
            self._wake_r.close()
