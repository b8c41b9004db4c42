"""pyroute2's IPRoute, served by one thread of its own.

pyroute2 0.9 gives every thread that calls an IPRoute a netlink socket of its
own, made in that thread's network namespace and kept until the IPRoute is
closed.  larknsd serves each connection on a thread of its own: each `info`
request left one socket behind, and a node serving jobs for days would run
out of descriptors.  Here every call runs on the one thread that opened the
IPRoute, so there is one socket, in the namespace of the thread that made
this object (the worker's), whichever thread asks and wherever it is.
"""

from __future__ import annotations

import errno
import queue
import threading
import types
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute

# (method name, args, kwargs, where the (ok, result or exception) goes)
_Reply = queue.SimpleQueue[tuple[bool, Any]]
_Call = tuple[str, tuple[Any, ...], dict[str, Any], _Reply]


class PinnedIPRoute:
    """An IPRoute whose methods may be called from any thread."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        opened: _Reply = queue.SimpleQueue()
        # Made here, it starts in this thread's network namespace.
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="iproute", daemon=True
        )
        self._thread.start()
        ok, error = opened.get()
        if not ok:
            self._thread.join()
            raise error

    def _run(self, opened: _Reply) -> None:
        try:
            ipr = IPRoute()
        except BaseException as e:
            opened.put((False, e))
            return
        opened.put((True, None))
        try:
            while (call := self._calls.get()) is not None:
                name, args, kwargs, reply = call
                try:
                    result = getattr(ipr, name)(*args, **kwargs)
                    # A dump may come as a generator, which would read the
                    # socket on the caller's thread: read it here.
                    if isinstance(result, types.GeneratorType):
                        result = tuple(result)
                except BaseException as e:
                    reply.put((False, e))
                else:
                    reply.put((True, result))
        finally:
            ipr.close()

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        reply: _Reply = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "pyroute2 IPRoute is closed")
            self._calls.put((name, args, kwargs, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, args, kwargs)

        return call

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._calls.put(None)
        self._thread.join()

    def __enter__(self) -> PinnedIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
