"""larknsd's Prometheus metrics (LARKNS_METRICS) and `larkns top`."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from larkns.config import ConfigError, Settings
from larkns.kernel import netns
from tests.test_daemon import Larknsd, _launched, _show, _wait_for, json_jobs, serving
from tests.world import PEER, PORT, SITE4, World, larkns_bin, sh

ADDRESS = "127.0.0.1:9377"  # the world's worker has a loopback of its own

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    w = World("lktm")
    try:
        yield w
    finally:
        w.close()


def _connect(world: World, where: str) -> socket.socket:
    """A connection to larknsd's metrics, made from the world's worker."""
    if where.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(where[len("unix:") :])
        return s
    host, _, port = where.rpartition(":")
    with netns.entered(world.worker):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((host, int(port)))
    return s


def scrape(world: World, where: str = ADDRESS) -> Samples:
    """Every sample larknsd serves, parsed by prometheus_client's own parser."""
    with _connect(world, where) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := s.recv(1 << 16):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def of_job(samples: Samples, name: str, job: str) -> dict[frozenset[tuple[str, str]], float]:
    """Job `job`'s samples of metric `name`, by their other labels."""
    out = {}
    for (metric, labels), value in samples.items():
        found = dict(labels)
        if metric == name and found.pop("job", None) == job:
            out[frozenset(found.items())] = value
    return out


def node(samples: Samples, name: str) -> float:
    return samples[(name, frozenset())]


def _job_name(world: World) -> str:
    (name,) = [n[: -len(".json")] for n in json_jobs(world) if n.endswith(".json")]
    return name


def test_a_scrape_sees_exactly_the_bytes_a_job_moved(clean_world: World, tmp_path: Path) -> None:
    n, size, reply = 20, 300, 700
    go = tmp_path / "go"
    with serving(clean_world, LARKNS_METRICS=ADDRESS) as d:
        p = d.job_popen(
            "/bin/sh",
            "-c",
            f"/usr/bin/python3 {PEER} udp {SITE4} {PORT} {n} {size} {reply} >/dev/null"
            f" && echo moved; while [ ! -e {go} ]; do sleep 0.05; done",
        )
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "moved"
            _launched(p)
            name = _job_name(clean_world)
            samples = scrape(clean_world)
            counters = _show(clean_world, name)["counters"]
        finally:
            go.touch()
            p.communicate(timeout=20)
        base = {("owner", "root"), ("network_type", "nat")}

        def sample(family: str, direction: str) -> frozenset[tuple[str, str]]:
            return frozenset({*base, ("family", family), ("direction", direction)})

        got = of_job(samples, "larkns_job_bytes_total", name)
        assert got[sample("ipv4", "outgoing")] == n * (28 + size)
        assert got[sample("ipv4", "incoming")] == n * (28 + reply)
        packets = of_job(samples, "larkns_job_packets_total", name)
        assert packets[sample("ipv4", "outgoing")] == packets[sample("ipv4", "incoming")] == n
        # What the engine counts, to the byte and packet, for both families.
        for family in ("ipv4", "ipv6"):
            for direction, short in (("incoming", "in"), ("outgoing", "out")):
                assert got[sample(family, direction)] == counters[family][short]["bytes"]
                assert packets[sample(family, direction)] == counters[family][short]["packets"]
        assert of_job(samples, "larkns_job_dropped_packets_total", name) == {frozenset(base): 0}
        assert node(samples, "larkns_jobs") == 1
        assert node(samples, "larkns_setups_total") == 1
        assert node(samples, "larkns_setup_failures_total") == 0
        assert node(samples, "larkns_setup_seconds_count") == 1
        assert 0 < node(samples, "larkns_setup_seconds_sum") < 5
        assert node(samples, "larkns_gc_removed_total") == 0
        assert node(samples, "larkns_flush_restores_total") == 0
        assert node(samples, "process_open_fds") > 0
        # Once it has ended, the job is gone from the metrics.
        _wait_for("the job's network is gone", lambda: not json_jobs(clean_world))
        after = scrape(clean_world)
        assert not of_job(after, "larkns_job_bytes_total", name)
        assert node(after, "larkns_jobs") == 0


def test_a_network_that_cannot_be_built_is_counted_as_a_failure(clean_world: World) -> None:
    # One block of forwarded ports: one nat job at a time.
    knobs = {"LARKNS_METRICS": ADDRESS, "LARKNS_INBOUND_PORTS": "40000-40003"}
    with serving(clean_world, **knobs) as d:
        first = d.job_popen("/bin/sh", "-c", "echo started; exec sleep 60")
        try:
            assert first.stdout is not None and first.stdout.readline().strip() == "started"
            assert d.job("/bin/true").returncode == 125
            samples = scrape(clean_world)
        finally:
            first.kill()
            first.communicate(timeout=30)
    assert node(samples, "larkns_setups_total") == 1
    assert node(samples, "larkns_setup_failures_total") == 1
    assert node(samples, "larkns_jobs") == 1


def test_hung_clients_hold_up_neither_a_scrape_nor_a_job(clean_world: World) -> None:
    with serving(clean_world, LARKNS_METRICS=ADDRESS) as d:
        hung = [_connect(clean_world, ADDRESS) for _ in range(4)]
        hung[0].sendall(b"GET /met")  # and stops
        try:
            start = time.monotonic()
            samples = scrape(clean_world)
            assert time.monotonic() - start < 1.0
            assert node(samples, "larkns_jobs") == 0
            # More than larknsd serves at once: the rest are closed at once.
            hung += [_connect(clean_world, ADDRESS) for _ in range(8)]
            assert hung[-1].recv(1) == b""
            start = time.monotonic()
            assert d.job("/bin/true").returncode == 0
            assert time.monotonic() - start < 10
        finally:
            for s in hung:
                s.close()
        # The slots come back once the clients are gone.
        _wait_for("a scrape is served again", lambda: _scrapes(clean_world))
        assert node(scrape(clean_world), "larkns_setups_total") == 1


def _scrapes(world: World) -> bool:
    try:
        scrape(world)
    except (OSError, AssertionError):
        return False
    return True


def test_a_flush_of_the_ruleset_put_back_shows(clean_world: World) -> None:
    with serving(clean_world, LARKNS_METRICS=ADDRESS) as d:
        p = d.job_popen("/bin/sh", "-c", "echo started; exec sleep 60")
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "started"
            _launched(p)
            before = time.time()
            sh("nft", "flush", "ruleset", ns=clean_world.worker)
            _wait_for(
                "larknsd has put its job back",
                lambda: node(scrape(clean_world), "larkns_flush_restores_total") == 1,
            )
            at = node(scrape(clean_world), "larkns_last_flush_restore_timestamp_seconds")
            assert before <= at <= time.time()
        finally:
            p.kill()
            p.communicate(timeout=30)


def test_larknsd_without_metrics_loads_none_of_their_modules() -> None:
    code = (
        "import sys, larkns.daemon.server, larkns.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('prometheus_client', 'http', 'socketserver', 'concurrent')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_metrics_on_a_unix_socket_are_root_s_and_its_directory_group_s(
    clean_world: World,
) -> None:
    path = f"/tmp/{clean_world.prefix}-metrics.sock"
    with serving(clean_world, LARKNS_METRICS=f"unix:{path}"):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, os.stat("/tmp").st_gid)
        assert node(scrape(clean_world, f"unix:{path}"), "larkns_jobs") == 0
    assert not os.path.exists(path)


def test_metrics_are_off_by_default(clean_world: World) -> None:
    d = Larknsd(clean_world)
    try:
        listening = sh("ss", "-Hltn", ns=clean_world.worker).stdout
        assert listening.strip() == ""
    finally:
        err = d.stop()
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "value",
    ["0.0.0.0:9377", "198.18.0.2:9377", "[::]:9377", "localhost:9377", "127.0.0.1:0", "unix:x"],
)
def test_a_bad_LARKNS_METRICS_is_a_one_line_error(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings().with_overrides({"LARKNS_METRICS": value})
    assert str(e.value).startswith("LARKNS_METRICS: expected unix:/")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("0.0.0.0:9377", "a loopback address"),
        ("unix:/nonexistent-lktm/metrics.sock", "cannot listen on unix:/nonexistent-lktm/"),
    ],
)
def test_larknsd_refuses_to_start_with_metrics_it_cannot_serve(
    clean_world: World, value: str, error: str
) -> None:
    env = clean_world.env() | {
        "LARKNS_SOCKET": f"/tmp/{clean_world.prefix}-larknsd.sock",
        "LARKNS_METRICS": value,
    }
    proc = subprocess.run(
        clean_world.worker_cmd(str(Path(sys.executable).parent / "larknsd")),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 125
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("larknsd: error: LARKNS_METRICS: ") and error in line, proc.stderr
    assert "Traceback" not in proc.stderr


def test_top_shows_live_jobs_by_rate(clean_world: World) -> None:
    """`larkns top --once` in a pipe: one plain frame, the busiest job first."""
    busy = clean_world.larkns_popen(
        "run", "--name", "lktmbusy", "--", "/bin/sh", "-c",
        f"echo ready; exec ping -q -i 0.05 -s 1000 {SITE4}",
    )  # fmt: skip
    idle = clean_world.larkns_popen(
        "run", "--name", "lktmidle", "--", "/bin/sh", "-c", "echo ready; exec sleep 60"
    )
    try:
        for p in (busy, idle):
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        proc = subprocess.run(
            clean_world.worker_cmd(larkns_bin(), "top", "--once", "--interval", "0.5"),
            env=clean_world.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout
        header, first, second = proc.stdout.splitlines()
        assert header.split()[:3] == ["NAME", "OWNER", "TYPE"]
        assert first.split()[0] == "lktmbusy" and second.split()[0] == "lktmidle"
        # ~20 pings of 1028 bytes a second each way: ~165 kbit/s
        rate_in, rate_out = first.split()[3:5]
        assert rate_in.endswith("kb/s") and rate_out.endswith("kb/s"), first
        assert 80 < float(rate_out.removesuffix("kb/s")) < 400, first
        assert second.split()[3:5] == ["0b/s", "0b/s"], second
    finally:
        for p in (busy, idle):
            p.terminate()
            p.communicate(timeout=20)


def test_top_refuses_a_bad_interval(clean_world: World) -> None:
    proc = clean_world.larkns("top", "--interval", "0")
    assert proc.returncode == 125
    assert proc.stderr.strip() == (
        "larkns: error: --interval: expected 0.1 to 3600 seconds, got '0'"
    )
