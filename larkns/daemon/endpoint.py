"""The HTTP endpoint of larknsd's metrics: GET /metrics on a loopback port or
a unix socket, served on threads of its own.

No client can hold larknsd up: a job's setup never waits on this endpoint,
and the endpoint itself serves at most MAX_CLIENTS connections at once (more
are closed at once), each for at most DEADLINE seconds whatever it does (a
client that trickles a byte at a time included), with no socket operation
waiting more than TIMEOUT.  One request per connection (HTTP/1.0): no
keep-alive connection holds a thread between scrapes.

Connections are served on threads of their own, but every scrape is made
on one thread, one at a time: glibc gives each new thread that allocates
much a malloc arena of its own, and larknsd's RSS grew by 5.7 MB over 200
scrapes of 100 jobs when each connection's thread made its own, 2.6 MB
this way (bench/metrics.py --scrapes 200).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import os
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

# Prometheus scrapes a target every 15-60 s with one connection; a few more
# for `curl` or a second scraper.
MAX_CLIENTS = 8
# A scrape of 100 jobs takes 53-79 ms (p50) here (bench/metrics.py): a connection
# alive this long is stuck, or holding its slot on purpose.
DEADLINE = 30.0
TIMEOUT = 5.0  # per read or write


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _TcpServer | _UnixServer
    protocol_version = "HTTP/1.0"
    timeout = TIMEOUT  # StreamRequestHandler sets it on the socket

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "larknsd serves /metrics")
            return
        try:
            body = self.server.scrape()
        except TimeoutError:
            self.send_error(503, "larknsd is busy; try again")
            return
        self.send_response(200)
        # The text format, version 0.0.4 (prometheus_client's CONTENT_TYPE_LATEST).
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news for larknsd's log


class _Serving(socketserver.ThreadingMixIn):
    """What both kinds of socket share: the cap on clients and their deadline."""

    daemon_threads = True
    block_on_close = False
    registry: CollectorRegistry | None = None

    def _setup_limits(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[socket.socket, float] = {}
        self._scraper = concurrent.futures.ThreadPoolExecutor(1, "metrics-scrape")

    def scrape(self) -> bytes:
        """The exposition, made on the scraping thread (TimeoutError if it
        takes past a connection's deadline)."""
        from larkns.daemon.metrics import exposition

        assert self.registry is not None
        return self._scraper.submit(exposition, self.registry).result(timeout=DEADLINE)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            if len(self._until) >= MAX_CLIENTS:
                return False  # closed at once
            self._until[request] = time.monotonic() + DEADLINE
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._until.pop(request, None)
        super().shutdown_request(request)  # type: ignore[misc]

    def service_actions(self) -> None:
        """Between two accepts (every poll interval): cut connections past
        their deadline; their threads then end on the error."""
        now = time.monotonic()
        with self._lock:
            late = [s for s, until in self._until.items() if until < now]
        for s in late:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):  # a client gone or cut: no news
            print(f"larknsd: metrics: {type(e).__name__}: {e}", file=sys.stderr)


class _TcpServer(_Serving, socketserver.TCPServer):
    allow_reuse_address = True  # a restarted larknsd binds at once


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(_Serving, socketserver.UnixStreamServer):
    pass


class Endpoint:
    """Bound now (OSError if it cannot be), served from start()."""

    def __init__(self, where: Path | tuple[str, int]) -> None:
        self.where = where
        self.path: Path | None = None
        self._server: _TcpServer | _UnixServer
        self._thread: threading.Thread | None = None
        if isinstance(where, Path):
            with contextlib.suppress(FileNotFoundError):
                where.unlink()  # a previous larknsd's
            self._server = _UnixServer(str(where), _Handler, bind_and_activate=False)
            self._server._setup_limits()
            try:
                self._server.server_bind()
                self.path = where
                # Root's, and its directory's group's: to let a scraper in
                # without root, give it a directory of its group.
                os.chown(where, 0, where.parent.stat().st_gid)
                os.chmod(where, 0o660)
                self._server.server_activate()
            except BaseException:
                self.close()
                raise
        else:
            kind = _Tcp6Server if ":" in where[0] else _TcpServer
            self._server = kind(where, _Handler, bind_and_activate=False)
            self._server._setup_limits()
            try:
                self._server.server_bind()
                self._server.server_activate()
            except BaseException:
                self.close()
                raise

    def start(self, registry: CollectorRegistry) -> None:
        self._server.registry = registry
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.5,), name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        self._server._scraper.shutdown(wait=False)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
