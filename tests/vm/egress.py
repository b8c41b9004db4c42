"""The way out of a private network namespace, without touching the host's
network: an HTTP proxy whose listening socket is on that namespace's
loopback and whose connections out are made from the host's namespace.

A QEMU guest with user-mode networking, run inside such a namespace, reaches
the namespace's loopback as its gateway (10.0.2.2): with apt and pip told to
use the proxy there, it gets to the package registries, and to nothing of
the host's but this proxy.  No link, route, address or rule is made
anywhere: only a socket, created by a thread that entered the namespace.

It serves CONNECT (HTTPS: the TLS is end to end) and plain HTTP requests in
absolute form (apt), to ports 80 and 443 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections import Counter

CLONE_NEWNET = 0x40000000
PORTS = (80, 443)


def listen_in_netns(netns: str, port: int) -> socket.socket:
    """A TCP socket listening on 127.0.0.1:port of the named namespace: a
    thread enters it (setns applies to the calling thread alone), makes the
    socket, which stays in that namespace, and ends."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_listen() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.create_server(("127.0.0.1", port)))
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=enter_and_listen, name=f"netns {netns}")
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return made[0]


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Bytes from a to b until a ends; then b is told no more will come."""
    with contextlib.suppress(OSError):
        while data := a.recv(65536):
            b.sendall(data)
    with contextlib.suppress(OSError):
        b.shutdown(socket.SHUT_WR)


class Proxy:
    """The proxy, serving from start() until close(); `hosts` counts the
    connections made to each host."""

    def __init__(self, netns: str, port: int = 3128) -> None:
        self.listener = listen_in_netns(netns, port)
        self.hosts: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="egress proxy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=5)

    def summary(self) -> str:
        made = ", ".join(f"{h} {n}" for h, n in self.hosts.most_common()) or "none"
        refused = ", ".join(f"{h} {n}" for h, n in self.refused.most_common())
        return f"connections {made}" + (f"; refused {refused}" if refused else "")

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), ""]
            if method == "CONNECT":
                host, _, port_s = target.rpartition(":")
            elif target.startswith("http://"):
                hostport = target.removeprefix("http://").split("/", 1)[0]
                host, _, port_s = hostport.partition(":")
                port_s = port_s or "80"
            else:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            port = int(port_s) if port_s.isdigit() else 0
            if port not in PORTS:
                with self._lock:
                    self.refused[f"{host}:{port_s}"] += 1
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            try:
                up = socket.create_connection((host.strip("[]"), port), timeout=30)
            except OSError:
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            with self._lock:
                self.hosts[host] += 1
            with up:
                up.settimeout(None)
                if method == "CONNECT":
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:
                    # HTTP/1.1 servers take the absolute form as it is.
                    up.sendall(head)
                back = threading.Thread(target=_relay, args=(up, conn), daemon=True)
                back.start()
                _relay(conn, up)
                back.join()
