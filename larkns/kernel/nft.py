"""larkns's own nftables table: accounting and NAT for every job.

One table, `inet larkns`, for all jobs.  Its base chains look a packet's
interface up in a verdict map and jump to that job's chain, so the cost of a
packet and of adding a job stays flat however many jobs are alive (one table
per job makes every nft operation slower with each job: MEASURED.md).

    table inet larkns
      map job_from  ifname : verdict     host end of a job's veth -> jump from-NAME
      map job_to    ifname : verdict     host end of a job's veth -> jump to-NAME
      set masquerade_from  ifname        jobs in nat mode
      set job_links        ifname        every job's host end
      set link_control     icmpv6_type   ND, RA/RS and MLD messages
      chain forward     hook forward     iifname vmap @job_from; oifname vmap @job_to
      chain input       hook input       iifname vmap @job_from
      chain output      hook output      oifname vmap @job_to
      chain postrouting hook postrouting (nat)
                        iifname @masquerade_from oifname != @job_links masquerade
      chain from-NAME / to-NAME          @link_control -> counter NAME-ctl-*, return
                                         then counter NAME-{out,in}{4,6} by family
      counter NAME-out4 NAME-out6 NAME-in4 NAME-in6 NAME-ctl-out NAME-ctl-in

Counters are named objects: they are read by name, never reset, and can be
re-created with their old values should someone flush the ruleset.

Only this module knows nft's JSON; callers pass names.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from larkns.traffic import Count

FAMILY = "inet"
TABLE = "larkns"
_T = {"family": FAMILY, "table": TABLE}

# Counting runs after other tables' filter chains (priority 0), so a packet
# some firewall drops is not billed to the job.
ACCOUNT_PRIORITY = 300

# ICMPv6 that keeps a link working (router and neighbour discovery, MLD):
# counted apart from the job's traffic, so job byte counts are exactly what
# the job sent and received beyond its link.
LINK_CONTROL_ICMPV6 = [
    "mld-listener-query",
    "mld-listener-report",
    "mld-listener-done",
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "nd-redirect",
    "mld2-listener-report",
]

COUNTER_KEYS = ("out4", "out6", "in4", "in6", "ctl-out", "ctl-in")


class NftError(Exception):
    pass


def _load() -> Any:
    try:
        import nftables
    except ImportError as e:
        raise NftError(
            "the nftables Python binding is missing "
            "(Debian/Ubuntu: apt-get install python3-nftables; "
            "EL: dnf install python3-nftables), or this Python cannot see it"
        ) from e
    try:
        nft = nftables.Nftables()
    except OSError as e:
        raise NftError(f"libnftables cannot be loaded: {e}") from e
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


def _counter_name(job: str, key: str) -> str:
    return f"{job}-{key}"


def _elem(name: str, key: str, value: Any | None = None) -> dict[str, Any]:
    e: Any = [key, value] if value is not None else key
    return {"element": {**_T, "name": name, "elem": [e]}}


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {**_T, "chain": chain, "expr": list(expr)}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _base_objects() -> list[dict[str, Any]]:
    def base(
        name: str, hook: str, ctype: str = "filter", prio: int = ACCOUNT_PRIORITY
    ) -> dict[str, Any]:
        return {
            "chain": {
                **_T,
                "name": name,
                "type": ctype,
                "hook": hook,
                "prio": prio,
                "policy": "accept",
            }
        }

    return [
        {"table": {"family": FAMILY, "name": TABLE}},
        {"map": {**_T, "name": "job_from", "type": "ifname", "map": "verdict"}},
        {"map": {**_T, "name": "job_to", "type": "ifname", "map": "verdict"}},
        {"set": {**_T, "name": "masquerade_from", "type": "ifname"}},
        {"set": {**_T, "name": "job_links", "type": "ifname"}},
        {"set": {**_T, "name": "link_control", "type": "icmpv6_type"}},
        base("forward", "forward"),
        base("input", "input"),
        base("output", "output"),
        base("postrouting", "postrouting", "nat", 100),
    ]


def _base_elements() -> list[dict[str, Any]]:
    return [{"element": {**_T, "name": "link_control", "elem": LINK_CONTROL_ICMPV6}}]


def _base_rules() -> list[dict[str, Any]]:
    def vmap(key: str, m: str) -> dict[str, Any]:
        return {"vmap": {"key": _meta(key), "data": f"@{m}"}}

    return [
        _rule("forward", vmap("iifname", "job_from")),
        _rule("forward", vmap("oifname", "job_to")),
        _rule("input", vmap("iifname", "job_from")),
        _rule("output", vmap("oifname", "job_to")),
        _rule(
            "postrouting",
            _match(_meta("iifname"), "@masquerade_from"),
            _match(_meta("oifname"), "@job_links", "!="),
            {"masquerade": None},
        ),
    ]


def _job_chain(chain: str, job: str, direction: str) -> list[dict[str, Any]]:
    ctl = _match({"payload": {"protocol": "icmpv6", "field": "type"}}, "@link_control")
    return [
        {"chain": {**_T, "name": chain}},
        _rule(chain, ctl, {"counter": _counter_name(job, f"ctl-{direction}")}, {"return": None}),
        _rule(
            chain,
            _match(_meta("nfproto"), "ipv4"),
            {"counter": _counter_name(job, f"{direction}4")},
        ),
        _rule(
            chain,
            _match(_meta("nfproto"), "ipv6"),
            {"counter": _counter_name(job, f"{direction}6")},
        ),
    ]


class Ruleset:
    """The `inet larkns` table in the calling thread's network namespace."""

    def __init__(self) -> None:
        self._nft = _load()

    def _run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rc, out, err = self._nft.cmd(json.dumps({"nftables": commands}))
        if rc != 0:
            raise NftError(err.strip().splitlines()[0] if err.strip() else f"nft failed (rc {rc})")
        return _parse(out)

    def ensure_table(self) -> None:
        """Create the table, its maps and base chains, unless present."""
        if self.has_table():
            return
        # The table is made in one transaction, so it exists whole or not at all.
        self._run([{"add": o} for o in _base_objects() + _base_elements() + _base_rules()])

    def has_table(self) -> bool:
        rc, _out, _err = self._nft.cmd(
            json.dumps({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]})
        )
        return bool(rc == 0)

    def delete_table(self) -> bool:
        rc, _out, _err = self._nft.cmd(
            json.dumps({"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]})
        )
        return bool(rc == 0)

    def add_job(self, job: str, link: str, masquerade: bool) -> None:
        """Counters, chains and map entries of one job, in one transaction."""
        objs: list[dict[str, Any]] = [
            {"counter": {**_T, "name": _counter_name(job, k)}} for k in COUNTER_KEYS
        ]
        objs += _job_chain(f"from-{job}", job, "out")
        objs += _job_chain(f"to-{job}", job, "in")
        objs.append(_elem("job_from", link, {"jump": {"target": f"from-{job}"}}))
        objs.append(_elem("job_to", link, {"jump": {"target": f"to-{job}"}}))
        objs.append(_elem("job_links", link))
        if masquerade:
            objs.append(_elem("masquerade_from", link))
        self._run([{"add": o} for o in objs])

    def remove_job(self, job: str, link: str | None) -> bool:
        """Remove everything of `job`; True if anything was there.

        The whole removal is one transaction in the common case; when some
        part is already gone (a half-built or half-removed job), nft refuses
        the batch, so we fall back to removing each object on its own.
        """
        ops = self._removal(job, link)
        try:
            self._run(ops)
            return True
        except NftError:
            pass
        removed = False
        for op in ops:
            with contextlib.suppress(NftError):
                self._run([op])
                removed = True
        return removed

    def _removal(self, job: str, link: str | None) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        if link is not None:
            # Map entries go first: they hold references to the chains.
            for m in ("job_from", "job_to", "job_links", "masquerade_from"):
                ops.append({"delete": _elem(m, link)})
        for chain in (f"from-{job}", f"to-{job}"):
            ops.append({"flush": {"chain": {**_T, "name": chain}}})
            ops.append({"delete": {"chain": {**_T, "name": chain}}})
        for k in COUNTER_KEYS:
            ops.append({"delete": {"counter": {**_T, "name": _counter_name(job, k)}}})
        return ops

    def counters(self, job: str) -> dict[str, Count]:
        """The job's counters by key (out4, in6, ...); missing ones read as zero."""
        cmds = [{"list": {"counter": {**_T, "name": _counter_name(job, k)}}} for k in COUNTER_KEYS]
        rc, out, _err = self._nft.cmd(json.dumps({"nftables": cmds}))
        found: dict[str, Count] = {}
        for obj in _parse(out):
            c = obj.get("counter")
            if c is None:
                continue
            key = c["name"][len(job) + 1 :]
            found[key] = Count(int(c["packets"]), int(c["bytes"]))
        if rc != 0 and not found:
            # One missing counter fails the whole listing: read one by one.
            for k in COUNTER_KEYS:
                rc1, out1, _ = self._nft.cmd(
                    json.dumps({"nftables": [cmds[COUNTER_KEYS.index(k)]]})
                )
                for obj in _parse(out1) if rc1 == 0 else []:
                    c = obj.get("counter")
                    if c is not None:
                        found[k] = Count(int(c["packets"]), int(c["bytes"]))
        return {k: found.get(k, Count()) for k in COUNTER_KEYS}

    def job_objects(self) -> tuple[set[str], set[str]]:
        """(job names that own chains or counters, links in the job maps), for gc."""
        if not self.has_table():
            return set(), set()
        jobs: set[str] = set()
        links: set[str] = set()
        for obj in self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}]):
            if "chain" in obj:
                name = obj["chain"]["name"]
                for p in ("from-", "to-"):
                    if name.startswith(p):
                        jobs.add(name[len(p) :])
            elif "counter" in obj:
                name = obj["counter"]["name"]
                for k in COUNTER_KEYS:
                    if name.endswith(f"-{k}"):
                        jobs.add(name[: -len(k) - 1])
            elif obj.get("map", {}).get("name") in ("job_from", "job_to") or obj.get("set", {}).get(
                "name"
            ) in (
                "job_links",
                "masquerade_from",
            ):
                body = obj.get("map") or obj.get("set") or {}
                for e in body.get("elem", []):
                    links.add(e[0] if isinstance(e, list) else e)
        return jobs, links


def _parse(out: str) -> list[dict[str, Any]]:
    """Objects of nft's JSON output, which is one document per listing command."""
    objs: list[dict[str, Any]] = []
    dec = json.JSONDecoder()
    pos = 0
    out = out.strip()
    while pos < len(out):
        doc, end = dec.raw_decode(out, pos)
        objs.extend(o for o in doc.get("nftables", []) if "metainfo" not in o)
        pos = end
        while pos < len(out) and out[pos].isspace():
            pos += 1
    return objs
