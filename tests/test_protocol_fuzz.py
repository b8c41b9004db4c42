"""larknsd's socket, fuzzed: random bytes, random JSON, random requests with
random descriptors.  larknsd never dies, never keeps a descriptor it was
sent, and every refusal is one line."""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from larkns.daemon import protocol
from tests.test_daemon import Larknsd, serving
from tests.test_daemon_abuse import SO_SNDBUFFORCE, settled_fd_count, warm_fd_count
from tests.world import World

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["\u0000", "\n", "/", "/bin/true\u0000x", "A=B", "=", "s1"]),
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
_huge = st.one_of(
    st.integers(0, protocol.MAX_MESSAGE).map(lambda n: "x" * n),
    st.integers(0, protocol.MAX_MESSAGE // 6).map(lambda n: "\u0000" * n),
)
_field = st.one_of(_json, _huge, st.lists(st.text(max_size=20), max_size=4))
_requests = st.fixed_dictionaries(
    {
        "v": st.one_of(st.sampled_from([1, 1, 1, 0, 2, "1", None, True, -1, 2**70]), _json),
        "op": st.one_of(
            st.sampled_from(["info", "launch", "attach", "prepare", "stats", ""]), _json
        ),
    },
    optional={
        "argv": _field,
        "path": st.one_of(_field, st.text(max_size=30).map(lambda t: "/" + t)),
        "env": st.one_of(_field, st.lists(st.text(max_size=10).map(lambda t: t + "=x"))),
        "cwd": st.one_of(_field, st.just("/")),
        "name": st.one_of(_field, st.sampled_from(["s1", "r1", "../x", "a" * 20])),
    },
)
# Launches that get as far as the job's network (the caller is root here:
# no starter needed), to fail at the exec (no such program) or before.
_launches = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "op": st.just("launch"),
        "argv": st.lists(st.text(max_size=10), min_size=1, max_size=3),
        "path": st.text(max_size=20).map(lambda t: "/nonexistent/" + t),
        "env": st.lists(st.text(max_size=10).map(lambda t: t + "=x"), max_size=3),
        "cwd": st.sampled_from(["/", "/nonexistent", "/tmp"]),
    }
)
_messages = st.one_of(
    st.binary(max_size=300),
    _launches.map(lambda r: json.dumps(r).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    _requests.map(lambda r: json.dumps(r).encode()),
    st.sampled_from([b"[" * 100000, b"{" * 5000, b"1" * 5000, b'{"v": 1, "op": "info"']),
)
_fd_kind = st.sampled_from(["pipe", "null", "socket"])
# Three as often as not: a launch's stdin, stdout and stderr.
_fd_kinds = st.one_of(st.lists(_fd_kind, min_size=3, max_size=3), st.lists(_fd_kind, max_size=8))


def _open(kinds: list[str]) -> list[int]:
    """One descriptor of each kind (a pipe's write end, a socket of a pair)."""
    fds: list[int] = []
    for kind in kinds:
        if kind == "pipe":
            r, w = os.pipe()
            os.close(r)
            fds.append(w)
        elif kind == "null":
            fds.append(os.open("/dev/null", os.O_RDWR))
        else:
            a, b = socket.socketpair()
            b.close()
            fds.append(a.detach())
    return fds


@pytest.fixture()
def fuzzed(clean_world: World) -> Iterator[Larknsd]:
    with serving(clean_world) as d:
        yield d


def test_larknsd_survives_any_message_and_keeps_no_descriptor(fuzzed: Larknsd) -> None:
    pid = fuzzed.proc.pid
    before = warm_fd_count(fuzzed)

    @settings(
        max_examples=300,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(_messages, _fd_kinds)
    def exchange(data: bytes, kinds: list[str]) -> None:
        fds = _open(kinds)
        replies: list[bytes] = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(30)
                s.connect(fuzzed.socket)
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 * protocol.MAX_MESSAGE)
                try:
                    socket.send_fds(s, [data], fds)
                except OSError as e:
                    if e.errno != errno.EMSGSIZE:
                        raise
                    return
                for fd in fds:
                    os.close(fd)
                fds = []
                while True:
                    msg, got, _flags, _ = socket.recv_fds(s, protocol.MAX_MESSAGE, 4)
                    for fd in got:
                        os.close(fd)
                    if not msg:
                        break
                    replies.append(msg)
        finally:
            for fd in fds:
                os.close(fd)
        assert fuzzed.proc.poll() is None, "larknsd died"
        for raw in replies:
            assert b"\n" not in raw, raw[:200]
            reply: dict[str, Any] = json.loads(raw)
            if reply.get("ok") is False:
                error = reply["error"]
                assert isinstance(error, str) and "\n" not in error, error
                # Every bad request is understood as such.
                assert not error.startswith("internal error"), error

    exchange()
    assert fuzzed.proc.poll() is None
    assert settled_fd_count(pid, before) <= before
