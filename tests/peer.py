"""Traffic ends for tests: a site server and a job-side client.

    peer.py serve PORT            UDP and TCP on [::]:PORT (dual stack)
    peer.py udp HOST PORT COUNT SIZE REPLY_SIZE
    peer.py tcp HOST PORT

The server answers each UDP datagram with one of the size the client asked
for, starting with the address it saw the client come from, so a job can
learn whether it was NATed.  Sizes are payload bytes; the test adds the
headers to know the exact L3 byte counts.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading


def serve(port: int) -> None:
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", port))
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("::", port))
    tcp.listen(16)

    def tcp_loop() -> None:
        while True:
            conn, peer = tcp.accept()
            with conn:
                conn.sendall(_seen(peer[0]).encode() + b"\n")

    threading.Thread(target=tcp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        data, peer = udp.recvfrom(65535)
        if len(data) < 4:
            continue
        (reply_size,) = struct.unpack("!I", data[:4])
        seen = _seen(peer[0]).encode()
        reply = (seen + b"\n").ljust(reply_size, b".")[:reply_size]
        udp.sendto(reply, peer)


def _seen(addr: str) -> str:
    return addr.removeprefix("::ffff:")


def udp(host: str, port: int, count: int, size: int, reply_size: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((host, port))
    payload = struct.pack("!I", reply_size).ljust(size, b"x")
    received = 0
    seen = ""
    # One in flight at a time: nothing is lost to a full socket buffer, so
    # the byte counts are exact.
    for _ in range(count):
        s.send(payload)
        data = s.recv(65535)
        received += 1
        seen = data.split(b"\n", 1)[0].decode()
    print(
        json.dumps(
            {"sent": count, "received": received, "seen_as": seen, "local": s.getsockname()[0]}
        )
    )


def tcp(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect((host, port))
        seen = s.makefile().readline().strip()
        print(json.dumps({"seen_as": seen, "local": s.getsockname()[0]}))


def main() -> None:
    verb, *args = sys.argv[1:]
    if verb == "serve":
        serve(int(args[0]))
    elif verb == "udp":
        udp(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]))
    elif verb == "tcp":
        tcp(args[0], int(args[1]))
    else:
        sys.exit(f"unknown verb {verb}")


if __name__ == "__main__":
    main()
