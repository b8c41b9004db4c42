"""Putting back what a flush of the ruleset takes from live jobs.

`nft flush ruleset`, or a firewall reload that does it (nftables.service,
firewalld), deletes larkns's tables with every job's counters, guard, NAT
and policy in them.  A Watcher hears the kernel say so (nf_tables'
multicast group: a message per deleted table, no polling) and puts it all
back at once through the engine (Engine.restore).  Meanwhile it reads the
counters of its process's jobs every second, so that a job's counters go
on from at most a second before the flush: what the job sent in between
is what may be missing, and its record says for how long.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from larkns.kernel import netlink
from larkns.kernel.nftexpr import NAME

if TYPE_CHECKING:
    from larkns.engine import Engine
    from larkns.journal import Record

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_DELTABLE = 2
NFTA_TABLE_NAME = 1
_NFGEN = 4  # the nfgenmsg header: family, version, resource id
SAMPLE_INTERVAL = 1.0
RTNLGRP_TC = 4


def deleted_tables(data: bytes) -> list[str]:
    """The names of the tables whose deletion the messages in `data` tell."""
    return [
        value.rstrip(b"\0").decode(errors="replace")
        for mtype, _seq, _pid, payload in netlink.messages(data)
        if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE
        for kind, value in netlink.attrs(payload, _NFGEN)
        if kind == NFTA_TABLE_NAME
    ]


class Watcher:
    """A thread that puts back the tables' objects of `jobs()` (the records
    of this process's jobs) when the ruleset is flushed.  Made in the
    worker's netns: its socket hears that namespace's tables."""

    def __init__(
        self,
        engine: Engine,
        jobs: Callable[[], Collection[Record]],
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.say = say or (lambda line: print(f"larkns: {line}", file=sys.stderr))
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            self._sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            # A burst of events (one per table, per flush) must not be lost.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except BaseException:
            self._sock.close()
            raise
        # Deleted qdiscs (`tc qdisc del` on a job's host link or IFB).
        self._tc = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            self._tc.bind((0, 1 << (RTNLGRP_TC - 1)))
        except BaseException:
            self._tc.close()
            self._sock.close()
            raise
        self._stop = threading.Event()
        # close() wakes the thread at once, not at its next reading.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self.restored = 0  # flushes this watcher has put back after
        self.restored_at = 0.0  # when it last did (time.time()); 0: never
        self._thread = threading.Thread(target=self._run, name="flush-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._tc.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        # Nothing to read yet at the start: a job's counters begin at zero
        # (restore() goes on from there without a reading), and a short
        # `larkns run` is spared the work.
        next_sample = time.monotonic() + SAMPLE_INTERVAL
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_sample:
                self.engine.sample(self.jobs())
                next_sample = now + SAMPLE_INTERVAL
            ready = {fd for fd, _ in poller.poll(max(next_sample - now, 0.0) * 1000)}
            if self._stop.is_set():
                break
            if self._tc.fileno() in ready:
                self._qdiscs_deleted()
            if self._sock.fileno() not in ready:
                continue
            try:
                flushed = NAME in deleted_tables(self._sock.recv(1 << 16))
            except OSError:
                # ENOBUFS: events were lost; look whether anything is gone.
                flushed = True
            if not flushed or self._stop.is_set():
                continue
            # The rest of the flush (the other table, in the same
            # transaction) comes at once: take it before putting back.
            while self._sock.fileno() in {fd for fd, _ in poller.poll(20)}:
                try:
                    self._sock.recv(1 << 16)
                except OSError:
                    break
            try:
                for line in self.engine.restore([r.name for r in self.jobs()]):
                    self.say(line)
                self.restored += 1
                self.restored_at = time.time()
            except Exception as e:
                self.say(f"after a flush of the ruleset: {e}")

    def _qdiscs_deleted(self) -> None:
        from larkns.kernel import tc

        try:
            links = tc.deleted_qdiscs(self._tc.recv(1 << 16), self.engine.rtnl.port)
        except OSError:
            return
        if not links:
            return
        try:
            for line in self.engine.reshape([r.name for r in self.jobs()], links):
                self.say(line)
        except Exception as e:
            self.say(f"after a qdisc was deleted: {e}")

    def close(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._sock.close()
        self._tc.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
