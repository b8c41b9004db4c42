"""MAC addresses as larkns writes them ("02:6c:6b:00:00:01") and as the
kernel takes them (six bytes)."""

from __future__ import annotations


def parse(mac: str) -> bytes:
    """ "02:6c:6b:00:00:01" as its six bytes; ValueError for anything else."""
    b = bytes(int(x, 16) for x in mac.split(":"))
    if len(b) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return b


def format(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)
