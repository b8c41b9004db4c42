"""Forwarded ports in nat mode: clients of the site reach a server in a job
through the worker's own addresses (real kernel, simulated worker)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.test_run import run_job
from tests.world import PEER, SITE4, SITE6, WORKER4, WORKER6, World, sh

PORTS = {"LARKNS_INBOUND_PORTS": "41000-41099", "LARKNS_INBOUND_PORTS_PER_JOB": "4"}


def _serve(world: World, name: str, knobs: dict[str, str]) -> subprocess.Popen[str]:
    # The job learns its ports from LARKNS_JOB_PORTS, and serves on the first.
    serve = f'exec {sys.executable} {PEER} serve "${{LARKNS_JOB_PORTS%-*}}"'
    return world.serving("run", "--name", name, "--", "sh", "-c", serve, knobs=knobs)


def _from_site(world: World, verb: str, host: str, port: int) -> dict[str, str]:
    args = [verb, host, str(port)] + (["2", "100", "50"] if verb == "udp" else [])
    deadline = time.monotonic() + 5
    while True:
        out = sh(sys.executable, PEER, *args, ns=world.site, check=False)
        if out.returncode == 0:
            seen: dict[str, str] = json.loads(out.stdout)
            return seen
        assert time.monotonic() < deadline, f"the site cannot reach {host}:{port}: {out.stderr}"
        time.sleep(0.1)


def test_the_site_reaches_a_server_in_a_job_through_its_forwarded_ports(
    clean_world: World,
) -> None:
    p = _serve(clean_world, "lktin", PORTS)
    try:
        show = json.loads(clean_world.larkns("show", "lktin").stdout)
        first, last = show["plan"]["inbound_ports"]
        assert last - first == 3 and first >= 41000 and last <= 41099
        # TCP and UDP, to the worker's IPv4 and IPv6 addresses; the job sees
        # the client's own address (only the destination is translated).
        for verb in ("tcp", "udp"):
            assert _from_site(clean_world, verb, WORKER4, first)["seen_as"] == SITE4
            assert _from_site(clean_world, verb, WORKER6, first)["seen_as"] == SITE6
        # A port of no job's block reaches nothing (the worker answers with a reset).
        other = sh(
            sys.executable, PEER, "tcp", WORKER4, str(last + 1), ns=clean_world.site, check=False
        )
        assert other.returncode != 0
    finally:
        p.terminate()
        p.communicate(timeout=10)


def test_the_report_names_the_forwarded_ports(clean_world: World, tmp_path: Path) -> None:
    proc, report = run_job(
        clean_world,
        tmp_path,
        "sh",
        "-c",
        'echo "$LARKNS_JOB_PORTS"',
        LARKNS_INBOUND_PORTS=PORTS["LARKNS_INBOUND_PORTS"],
        LARKNS_INBOUND_PORTS_PER_JOB=PORTS["LARKNS_INBOUND_PORTS_PER_JOB"],
    )
    assert proc.returncode == 0, proc.stderr
    ports = report["inbound_ports"]
    assert isinstance(ports, dict)
    assert proc.stdout.strip() == f"{ports['first']}-{ports['last']}"
    assert "are forwarded to it" in proc.stderr


def test_when_every_block_of_ports_is_taken_the_next_job_is_refused(
    clean_world: World, tmp_path: Path
) -> None:
    knobs = {"LARKNS_INBOUND_PORTS": "41000-41003", "LARKNS_INBOUND_PORTS_PER_JOB": "4"}
    p = _serve(clean_world, "lktfull", knobs)
    try:
        proc, _ = run_job(
            clean_world,
            tmp_path,
            "true",
            LARKNS_INBOUND_PORTS=knobs["LARKNS_INBOUND_PORTS"],
            LARKNS_INBOUND_PORTS_PER_JOB=knobs["LARKNS_INBOUND_PORTS_PER_JOB"],
        )
        assert proc.returncode == 125
        assert "exhausted" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    finally:
        p.terminate()
        p.communicate(timeout=10)
