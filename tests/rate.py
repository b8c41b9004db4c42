"""Bulk TCP for rate tests (no iperf3 needed): the receiver counts.

    rate.py sink PORT              in the site: serves both directions
    rate.py get HOST PORT SECONDS  in the job: download for SECONDS
    rate.py put HOST PORT SECONDS  in the job: upload for SECONDS

Both client verbs print one JSON line: the payload bytes the receiving end
counted in each tenth of a second from its first byte ("bins"), and the
bits/s over the whole transfer ("bps"), over its first second
("first_bps") and after it ("steady_bps").
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

BIN = 0.1
CHUNK = 1 << 16


def _receive(conn: socket.socket) -> dict[str, object]:
    bins: list[int] = []
    start = None
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        now = time.monotonic()
        if start is None:
            start = now
        i = int((now - start) / BIN)
        bins += [0] * (i + 1 - len(bins))
        bins[i] += len(data)
    total = sum(bins)
    seconds = len(bins) * BIN
    first = sum(bins[: int(1 / BIN)])
    return {
        "bins": bins,
        # CLOCK_MONOTONIC of the first byte: one clock for every namespace,
        # so that transfers of several jobs can be lined up.
        "start": start,
        "bytes": total,
        "bps": 8 * total / seconds if seconds else 0,
        "first_bps": 8 * first,
        # after the first second (TCP's slow start): the shaper's own rate
        "steady_bps": 8 * (total - first) / (seconds - 1) if seconds > 1 else 0,
    }


def _send(conn: socket.socket, seconds: float) -> None:
    buf = b"\0" * CHUNK
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.sendall(buf)
    conn.shutdown(socket.SHUT_WR)


def sink(port: int) -> None:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)  # byte by byte: what follows is the upload
            head = line.decode().split()
            if head[0] == "get":
                _send(conn, float(head[1]))
            else:
                conn.sendall(json.dumps(_receive(conn)).encode())

    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def client(verb: str, host: str, port: int, seconds: float) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_connection((host, port), timeout=seconds + 20) as conn:
        assert conn.family == family
        conn.sendall(f"{verb} {seconds}\n".encode())
        if verb == "get":
            print(json.dumps(_receive(conn)))
            return
        _send(conn, seconds)
        reply = b""
        while chunk := conn.recv(1 << 16):
            reply += chunk
        print(reply.decode())


def main() -> None:
    verb, *args = sys.argv[1:]
    if verb == "sink":
        sink(int(args[0]))
    else:
        client(verb, args[0], int(args[1]), float(args[2]))


if __name__ == "__main__":
    main()
