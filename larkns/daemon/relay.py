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
import os
import selectors
import socket
import threading

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


class Relay:
    """Listens on 127.0.0.1:port in netns `ns_name`; carries connections to the
    same port in the netns of the thread that made it."""

    def __init__(self, ns_name: str, port: int) -> None:
        self.port = port
        with netns.entered(ns_name):
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                # A fresh namespace's loopback is up (larkns brings it up).
                self._listener.bind((LOCALHOST, port))
                self._listener.listen(16)
            except BaseException:
                self._listener.close()
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
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "listen")
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
            self._listener.close()
            self._wake_r.close()

    def _accept(
        self, sel: selectors.BaseSelector, peers: dict[socket.socket, socket.socket]
    ) -> None:
        try:
            inner, _ = self._listener.accept()
        except OSError:
            return
        try:
            # Made in this thread's netns: the worker's, where the starter is.
            outer = socket.create_connection((LOCALHOST, self.port), timeout=10)
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
