"""A loopback resolver for tests: answers every A query with one address.

fakedns.py ADDRESS ANSWER      (UDP on ADDRESS:53)
"""

from __future__ import annotations

import socket
import struct
import sys


def answer(query: bytes, address: str) -> bytes:
    (qid,) = struct.unpack("!H", query[:2])
    pos = 12
    while query[pos] != 0:  # the question's name, label by label
        pos += query[pos] + 1
    question = query[12 : pos + 5]
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    return header + question + record


def main() -> None:
    listen, reply = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((listen, 53))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        if len(data) > 12:
            s.sendto(answer(data, reply), peer)


if __name__ == "__main__":
    main()
