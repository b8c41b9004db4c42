"""The worker's rtnetlink socket for lookups and dumps, usable from any thread.

It answers the calls of pyroute2's IPRoute that larkns makes
(get_default_routes, link_lookup, get_addr), in the shapes pyroute2 gives
(header fields by key, attributes by name with get_attr), over larkns's own
rtnetlink socket: importing pyroute2's package costs ~100 ms, a third of a
whole `larkns run -- true`, and the path of every job looks up the worker's
default route (whether jobs need a CLAT).

One socket, made in the network namespace of the thread that makes this
object (the worker's) and bound to it for good, whichever thread asks and
wherever that thread is; calls take turns.  (pyroute2 0.9 gave every calling
thread a socket of its own, kept until close: larknsd, which serves each
connection on a thread of its own, ran out of descriptors.)
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from larkns.kernel.rtnl import Link, Rtnl


class Message:
    """A reply as pyroute2 shapes it: header fields by key, attributes by name."""

    def __init__(self, fields: dict[str, int], attrs: dict[str, Any]) -> None:
        self._fields = fields
        self._attrs = attrs

    def __getitem__(self, key: str) -> int:
        return self._fields[key]

    def get_attr(self, name: str) -> Any:
        return self._attrs.get(name)


class PinnedIPRoute:
    """Link, address and route lookups in the namespace this object was made in."""

    def __init__(self) -> None:
        self._rtnl: Rtnl | None = Rtnl()
        self._lock = threading.Lock()

    def _socket(self) -> Rtnl:
        if self._rtnl is None:
            raise OSError(errno.EBADF, "the rtnetlink socket is closed")
        return self._rtnl

    # -- what pyroute2's IPRoute answered ----------------------------------

    def get_default_routes(self, family: int) -> list[Message]:
        """Routes of `family` without a destination in the main table."""
        with self._lock:
            found = self._socket().default_routes(family)
        return [
            Message(
                {"family": family},
                {
                    "RTA_OIF": r.oif,
                    "RTA_GATEWAY": None if r.gateway is None else str(r.gateway),
                },
            )
            for r in found
        ]

    def link_lookup(self, ifname: str) -> list[int]:
        """[index of link `ifname`], or [] if there is none."""
        found = self.link(name=ifname)
        return [] if found is None else [found.ifindex]

    def get_addr(self, family: int, index: int) -> list[Message]:
        with self._lock:
            found = self._socket().addresses(family, index)
        return [
            Message(
                {
                    "family": family,
                    "prefixlen": a.prefixlen,
                    "scope": a.scope,
                    "flags": a.flags,
                    "index": index,
                },
                {"IFA_ADDRESS": str(a.address)},
            )
            for a in found
        ]

    # -- links (see links.py) ----------------------------------------------

    def link(self, index: int = 0, name: str | None = None) -> Link | None:
        with self._lock:
            return self._socket().link(index, name)

    def links(self) -> list[Link]:
        with self._lock:
            return self._socket().links()

    def delete_link(self, index: int, what: str) -> bool:
        with self._lock:
            return self._socket().delete_link(index, what)

    def close(self) -> None:
        with self._lock:
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None

    def __enter__(self) -> PinnedIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
