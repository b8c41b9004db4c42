"""Network sysctls, read and written through /proc/sys/net.

/proc/sys/net shows the network namespace of the thread that opens the file,
so these act on the namespace the calling thread is in (see netns.entered).
"""

from __future__ import annotations

import os

_PROC = "/proc/sys/net"


def read(key: str) -> str:
    with open(f"{_PROC}/{key}") as f:
        return f.read().strip()


def write(key: str, value: str | int) -> None:
    fd = os.open(f"{_PROC}/{key}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def ensure(key: str, value: str | int) -> bool:
    """Write `value` unless already set; True if it changed."""
    if read(key) == str(value):
        return False
    write(key, value)
    return True


def enable_forwarding() -> list[str]:
    """Turn on IPv4 and IPv6 forwarding; what changed, for the log.

    Turning IPv6 forwarding on makes the kernel ignore router advertisements
    on interfaces with accept_ra=1: a host that gets its own IPv6 default
    route by SLAAC would lose it.  So first raise those interfaces to
    accept_ra=2 ("accept even when forwarding"), as a router-aware admin would.
    """
    changed = []
    if ensure("ipv4/ip_forward", 1):
        changed.append("net.ipv4.ip_forward=1")
    if read("ipv6/conf/all/forwarding") != "1":
        for iface in sorted(os.listdir(f"{_PROC}/ipv6/conf")):
            if iface in ("all", "default", "lo"):
                continue
            try:
                if read(f"ipv6/conf/{iface}/accept_ra") == "1":
                    write(f"ipv6/conf/{iface}/accept_ra", 2)
                    changed.append(f"net.ipv6.conf.{iface}.accept_ra=2")
            except FileNotFoundError:
                continue
        write("ipv6/conf/all/forwarding", 1)
        changed.append("net.ipv6.conf.all.forwarding=1")
    return changed
