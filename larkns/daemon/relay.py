"""TCP relays from a job's loopback to the worker's.

A job in its own network namespace cannot reach services that listen on the
worker's 127.0.0.1, the starter's chirp port first among them.  A relay
listens on the same address and port inside the job's namespace and carries
each connection over to the worker's.

Only ports the job's own condor_starter listens on are relayed: the port
comes from the job's .chirp.config, which the job owner can rewrite, so it is
checked against the starter's sockets (kernel facts) before anything is
opened.  Nothing else on the worker's loopback becomes reachable.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import socket
import threading
import time
from typing import Any

from larkns.kernel import netns

LOCALHOST = "127.0.0.1"
_LISTEN = "0A"


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on, on 127.0.0.1 or any address."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    with contextlib.suppress(OSError), open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            addr, port = local.split(":")
            if state == _LISTEN and inode in inodes and addr in ("0100007F", "00000000"):
                ports.add(int(port, 16))
    return ports


def chirp_port(env: dict[str, str], starter: int) -> int | None:
    """The chirp port of the job, if its starter really listens on it."""
    path = env.get("_CONDOR_CHIRP_CONFIG")
    if not path:
        return None
    try:
        # Read as the starter sees it: the file lives in the job's mount
        # namespace, which /proc/PID/root reaches.
        with open(f"/proc/{starter}/root{path}") as f:
            host, port, *_ = f.read().split()
    except (OSError, ValueError):
        return None
    if host != LOCALHOST or not port.isdigit():
        return None
    return int(port) if int(port) in listening_ports(starter) else None


def loopback_nameservers(pid: int) -> list[str]:
    """Nameservers on the loopback in the resolv.conf that process `pid` sees
    (a local resolver such as systemd-resolved's 127.0.0.53)."""
    out = []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/root/etc/resolv.conf") as f:
        for line in f:
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
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        self._wake_w.close()

    def _run(self) -> None:
        raise NotImplementedError


class Relay(_Relay):
    """Listens on address:port (default 127.0.0.1) in netns `ns_name`; carries
    TCP connections to the same address and port in the netns of the thread
    that made it."""

    def __init__(self, ns_name: str, port: int, address: str = LOCALHOST) -> None:
        super().__init__(ns_name, port, address)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._inner, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        peers: dict[socket.socket, socket.socket] = {}
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "listen":
                        self._accept(sel, peers)
                        continue
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    dst = peers.get(src)
                    try:
                        data = src.recv(1 << 16)
                    except OSError:
                        data = b""
                    if data and dst is not None:
                        try:
                            dst.sendall(data)
                            continue
                        except OSError:
                            pass
                    self._drop(sel, peers, src)
        finally:
            for s in list(peers):
                with contextlib.suppress(Exception):
                    sel.unregister(s)
                s.close()
            sel.close()
            self._inner.close()
            self._wake_r.close()

    def _accept(
        self, sel: selectors.BaseSelector, peers: dict[socket.socket, socket.socket]
    ) -> None:
        try:
            inner, _ = self._inner.accept()
        except OSError:
            return
        try:
            # Made in this thread's netns: the worker's, where the starter is.
            outer = socket.create_connection((self.address, self.port), timeout=10)
            outer.settimeout(None)
        except OSError:
            inner.close()
            return
        peers[inner], peers[outer] = outer, inner
        sel.register(inner, selectors.EVENT_READ, "conn")
        sel.register(outer, selectors.EVENT_READ, "conn")

    def _drop(
        self,
        sel: selectors.BaseSelector,
        peers: dict[socket.socket, socket.socket],
        s: socket.socket,
    ) -> None:
        other = peers.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            with contextlib.suppress(Exception):
                sel.unregister(x)
            peers.pop(x, None)
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
                            if up is None:
                                # Made in this thread's netns: the worker's.
                                s = socket.socket(
                                    self.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                )
                                s.connect((self.address, self.port))
                                sel.register(s, selectors.EVENT_READ, client)
                                up = (s, 0.0)
                            upstream[client] = (up[0], time.monotonic())
                            up[0].send(data)
                        continue
                    answer = key.fileobj
                    assert isinstance(answer, socket.socket)
                    with contextlib.suppress(OSError):
                        self._inner.sendto(answer.recv(1 << 16), key.data)
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
