"""LARKNS_CLASSES that change while jobs are alive (real kernel, except the first tests).

A job keeps the classes it started with; a job started later, under other
classes, gets those: the live table is brought in line without disturbing the
jobs already counting in it.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from larkns import config, plan
from larkns.kernel.nft import INET
from larkns.kernel.nftexpr import MARKER_PREFIX, class_marker, class_update
from larkns.modes import nat
from tests.world import PEER, PORT, SITE4, SITE6, World, larkns_bin, sh

PY = sys.executable
SITE = "Site = 198.18.0.0/24, 2001:db8:0:1::/64"


# -- plans and the table update as commands (no root needed) ---------------


def test_a_jobs_record_names_the_classes_it_is_counted_in() -> None:
    s = config.load(environ={"LARKNS_CLASSES": f"{SITE}; Cloud = 198.19.0.0/16"})
    p = nat.plan(s, "a", 0, ipaddress.IPv6Network("fd00:6c6b:7400::/48"))
    assert p.classes == ("Site", "Cloud")
    # through the journal, which stores JSON
    assert plan.JobNetwork.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert "Site, Cloud" in p.describe()
    # a record of an older larkns does not say: teardown then asks the table
    old = {k: v for k, v in p.to_dict().items() if k != "classes"}
    assert plan.JobNetwork.from_dict(old).classes is None


def _nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def _listed(*objs: tuple[str, str]) -> list[dict[str, Any]]:
    """A table listing as libnftables gives it, reduced to kinds and names."""
    return [{kind: {"family": "inet", "table": "larkns", "name": name}} for kind, name in objs]


def _verbs(cmds: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    out = []
    for c in cmds:
        ((verb, body),) = c.items()
        ((kind, obj),) = body.items()
        out.append((verb, kind, obj.get("name") or obj.get("chain")))
    return out


def test_a_class_the_table_serves_already_is_left_alone() -> None:
    site = _nets("198.18.0.0/24")
    table = _listed(
        ("set", "cls_Site_4"),
        ("map", "cout_Site"),
        ("map", "cin_Site"),
        ("counter", class_marker("Site", site)),
    )
    assert class_update(INET, (("Site", site),), table) == []


def test_a_new_class_gets_sets_maps_rules_and_its_marker_each_made_once() -> None:
    far = _nets("198.18.0.1/32")
    cmds = class_update(INET, (("Far", far),), _listed(("map", "out4")))
    verbs = _verbs(cmds)
    # `create`, not `add`: a second process adding the same class fails
    # instead of appending the rules again.
    assert ("create", "map", "cout_Far") in verbs and ("create", "map", "cin_Far") in verbs
    assert ("create", "set", "cls_Far_4") in verbs
    assert ("create", "counter", class_marker("Far", far)) in verbs
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    # iifname and oifname in forward, one each in input and output; IPv4 only
    assert sorted(r["chain"] for r in rules) == ["forward", "forward", "input", "output"]
    assert all(r["expr"][0]["match"]["right"] == "@cls_Far_4" for r in rules)
    assert not any("cls_Far_6" in json.dumps(c) for c in cmds)


def test_changed_prefixes_refill_the_sets_and_replace_the_marker() -> None:
    old, new = _nets("198.18.0.0/24"), _nets("2001:db8:0:1::/64")
    table = _listed(
        ("set", "cls_Site_4"),
        ("map", "cout_Site"),
        ("map", "cin_Site"),
        ("counter", class_marker("Site", old)),
        ("counter", f"{MARKER_PREFIX}Site2.0123456789abcdef"),  # another class's
    )
    verbs = _verbs(class_update(INET, (("Site", new),), table))
    assert ("flush", "set", "cls_Site_4") in verbs  # emptied: IPv4 is no longer Site's
    assert ("create", "set", "cls_Site_6") in verbs and ("add", "element", "cls_Site_6") in verbs
    assert ("delete", "counter", class_marker("Site", old)) in verbs
    assert ("create", "counter", class_marker("Site", new)) in verbs
    assert not any(kind == "map" for _verb, kind, _name in verbs)  # the maps stay
    assert not any("Site2" in name for _verb, _kind, name in verbs)


# -- live tables (real kernel) ---------------------------------------------


def _udp(host: str, n: int, size: int, reply: int) -> str:
    return f"{PY} {PEER} udp {host} {PORT} {n} {size} {reply}"


def _v4(n: int, size: int) -> int:
    return n * (28 + size)  # IPv4 header 20 + UDP 8


def _v6(n: int, size: int) -> int:
    return n * (48 + size)  # IPv6 header 40 + UDP 8


class Background:
    """A `larkns run` that makes traffic, then waits for a go, then more
    traffic; with `knobs` and `extra` (options of `larkns run`) besides."""

    def __init__(
        self,
        world: World,
        tmp_path: Path,
        name: str,
        classes: str,
        before: str,
        after: str,
        knobs: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.report = tmp_path / f"{name}.json"
        self.ready = tmp_path / f"{name}.ready"
        self.go = tmp_path / f"{name}.go"
        script = (
            f"{before} && touch {self.ready} && "
            f"while [ ! -e {self.go} ]; do sleep 0.02; done && {after}"
        )
        self.proc = subprocess.Popen(
            world.worker_cmd(
                larkns_bin(),
                "run",
                "--name",
                name,
                "--json-report",
                str(self.report),
                *extra,
                "--",
                "sh",
                "-c",
                script,
            ),
            env=world.env() | {"LARKNS_CLASSES": classes} | (knobs or {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"job {name} ended early: {self.proc.communicate()}")
            assert time.monotonic() < deadline, f"job {name} never made its first traffic"
            time.sleep(0.02)

    def finish(self) -> dict[str, Any]:
        self.go.touch()
        _out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        report: dict[str, Any] = json.loads(self.report.read_text())
        return report

    def kill(self) -> None:
        """End the job's larkns if still running; its command dies with it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        # not communicate(): the job's processes may hold the pipes until gc
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def _run(world: World, tmp_path: Path, name: str, classes: str, script: str) -> dict[str, Any]:
    report = tmp_path / f"{name}.json"
    proc = world.larkns(
        "run", "--name", name, "--json-report", str(report), "--", "sh", "-c", script,
        knobs={"LARKNS_CLASSES": classes},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def _bytes(out: int, inc: int) -> dict[str, int]:
    return {"outgoing": out, "incoming": inc}


def _table(world: World) -> list[dict[str, Any]]:
    listed = sh("nft", "-j", "list", "table", "inet", "larkns", ns=world.worker).stdout
    return [o for o in json.loads(listed)["nftables"] if "metainfo" not in o]


def test_a_class_added_while_a_job_runs_is_counted_for_the_next_job_and_the_first_keeps_its_own(
    clean_world: World, tmp_path: Path
) -> None:
    a = Background(
        clean_world,
        tmp_path,
        "lkcadda",
        SITE,
        before=f"{_udp(SITE4, 10, 400, 200)} && {_udp(SITE6, 10, 300, 100)}",
        after=f"{_udp(SITE4, 5, 700, 50)} && {_udp(SITE6, 4, 900, 10)}",
    )
    try:
        # Server: the site's IPv4 address only, a class the table does not have.
        b = _run(
            clean_world,
            tmp_path,
            "lkcaddb",
            f"{SITE}; Server = 198.18.0.1/32",
            f"{_udp(SITE4, 7, 600, 250)} && {_udp(SITE6, 3, 500, 500)}",
        )
        server4 = _bytes(_v4(7, 600), _v4(7, 250))
        assert b["classes"]["Server"]["bytes"] == server4
        assert (
            b["classes"]["Site"]["bytes"]
            == b["bytes"]
            == _bytes(server4["outgoing"] + _v6(3, 500), server4["incoming"] + _v6(3, 500))
        )
        forward = sh("nft", "list", "chain", "inet", "larkns", "forward", ns=clean_world.worker)
        # added once (iifname and oifname), after the link-control rules
        assert forward.stdout.count("@cls_Server_4") == 2, forward.stdout
        assert forward.stdout.rindex("goto control_") < forward.stdout.index("@cls_Server_4")

        rep = a.finish()
    finally:
        a.kill()
    assert set(rep["classes"]) == {"Site"}  # what the job started with
    total = _bytes(
        _v4(10, 400) + _v6(10, 300) + _v4(5, 700) + _v6(4, 900),
        _v4(10, 200) + _v6(10, 100) + _v4(5, 50) + _v6(4, 10),
    )
    assert rep["bytes"] == total
    assert rep["classes"]["Site"]["bytes"] == total  # before and after the update


def test_a_changed_prefix_list_takes_effect_for_new_traffic(
    clean_world: World, tmp_path: Path
) -> None:
    # Site moves from the site's IPv4 network to its IPv6 network: a family
    # goes and one comes, in one update.
    a = Background(
        clean_world,
        tmp_path,
        "lkcpfxa",
        "Site = 198.18.0.0/24",
        before=f"{_udp(SITE4, 10, 400, 200)} && {_udp(SITE6, 10, 300, 100)}",
        after=f"{_udp(SITE4, 5, 700, 50)} && {_udp(SITE6, 4, 900, 10)}",
    )
    try:
        b = _run(
            clean_world,
            tmp_path,
            "lkcpfxb",
            "Site = 2001:db8:0:1::/64",
            f"{_udp(SITE4, 7, 600, 250)} && {_udp(SITE6, 3, 500, 500)}",
        )
        assert b["classes"]["Site"]["bytes"] == _bytes(_v6(3, 500), _v6(3, 500))
        rep = a.finish()
    finally:
        a.kill()
    # The first job's IPv4 traffic before the change, its IPv6 traffic after.
    assert rep["classes"]["Site"]["bytes"] == _bytes(
        _v4(10, 400) + _v6(4, 900), _v4(10, 200) + _v6(4, 10)
    )


def test_a_removed_class_is_not_given_to_new_jobs_and_nothing_of_either_job_is_left(
    clean_world: World, tmp_path: Path
) -> None:
    gone = "Gone = 198.18.0.1/32, 2001:db8:0:1::1/128"
    a = Background(
        clean_world,
        tmp_path,
        "lkcrma",
        f"{SITE}; {gone}",
        before=_udp(SITE4, 10, 400, 200),
        after="true",
    )
    keeper = None
    try:
        b = _run(clean_world, tmp_path, "lkcrmb", SITE, _udp(SITE6, 3, 500, 500))
        assert set(b["classes"]) == {"Site"}
        # A process configured without Gone still sees all of the first job.
        check = clean_world.larkns("check", "lkcrma", knobs={"LARKNS_CLASSES": SITE})
        assert check.returncode == 0, check.stderr
        # Keeps the table alive, so what the first job leaves can be seen.
        keeper = clean_world.larkns_popen("run", "--name", "lkcrmk", "--", "sleep", "30")
        deadline = time.monotonic() + 10
        while not (clean_world.state_dir / "jobs" / "lkcrmk.json").exists():
            assert time.monotonic() < deadline, "the keeper job never started"
            time.sleep(0.02)
        # The first job's larkns dies; gc, without Gone in its classes, removes it.
        a.kill()
        gc = clean_world.larkns("gc", knobs={"LARKNS_CLASSES": SITE})
        assert gc.returncode == 0 and "job lkcrma" in gc.stdout, gc.stdout + gc.stderr
        table = _table(clean_world)
        names = [json.dumps(o) for o in table]
        for job in ("lkcrma", "lkcrmb"):
            assert not [n for n in names if f'"{job}-' in n or f'"lk-{job}"' in n], names
        counters = {o["counter"]["name"] for o in table if "counter" in o}
        assert "lkcrmk-out4" in counters  # the keeper's are there (the listing is real)
    finally:
        a.kill()
        if keeper is not None:
            keeper.send_signal(signal.SIGTERM)
            keeper.communicate(timeout=10)


def test_two_jobs_bringing_the_same_new_class_at_once_add_it_once(
    clean_world: World, tmp_path: Path
) -> None:
    a = Background(clean_world, tmp_path, "lkcdupa", SITE, before="true", after="true")
    both = f"{SITE}; Server = 198.18.0.1/32, 2001:db8:0:1::1/128"
    procs = [
        subprocess.Popen(
            clean_world.worker_cmd(
                larkns_bin(),
                "run",
                "--name",
                f"lkcdup{i}",
                "--",
                "sh",
                "-c",
                f"touch {tmp_path / str(i)}; sleep 1",
            ),
            env=clean_world.env() | {"LARKNS_CLASSES": both},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 10
        while not all((tmp_path / str(i)).exists() for i in range(2)):
            assert time.monotonic() < deadline, [p.poll() for p in procs]
            time.sleep(0.02)
        forward = sh(
            "nft", "list", "chain", "inet", "larkns", "forward", ns=clean_world.worker
        ).stdout
        assert forward.count("@cls_Server_4") == 2 and forward.count("@cls_Server_6") == 2, forward
        assert forward.count("@cls_Site_4") == 2, forward
    finally:
        for p in procs:
            _out, err = p.communicate(timeout=20)
            assert p.returncode == 0, err
        a.finish()
        a.kill()
