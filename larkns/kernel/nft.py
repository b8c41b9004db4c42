"""larkns's own nftables table: accounting and NAT for every job.

One table, `inet larkns`, for all jobs.  Its base chains count each packet
into the counters of the job whose link it crosses, found by looking the
interface name up in maps (hash lookups: a packet costs the same with 1 or
500 jobs alive), and masquerade what jobs send out:

    table inet larkns
      set link_control  icmpv6_type         ND, RA/RS and MLD messages
      set job_links     ifname              every job's host end
      set masquerade_from ifname            jobs in nat mode
      map out4 out6 in4 in6 ctl_out ctl_in  ifname : counter
      counter NAME-out4 NAME-out6 NAME-in4 NAME-in6 NAME-ctl-out NAME-ctl-in   (per job)
      chain forward  hook forward  priority 300
            icmpv6 type @link_control counter name iifname map @ctl_out
            icmpv6 type @link_control counter name oifname map @ctl_in
            icmpv6 type @link_control return
            meta nfproto ipv4 counter name iifname map @out4
            meta nfproto ipv4 counter name oifname map @in4    (and ipv6)
      chain input    hook input    priority 300     (the iifname half)
      chain output   hook output   priority 300     (the oifname half)
      chain postrouting  nat hook postrouting
            iifname @masquerade_from oifname != @job_links masquerade

A job adds only named counters and map elements, never chains or rules.  The
table itself is declared through libnftables (JSON); the per-job objects go
through nfnetlink (nftnl.py), because libnftables reloads its view of the
whole ruleset before each command and so gets slower with every job alive.

Counters are named objects: read by name, never reset, and they could be
re-created with their old values should someone flush the ruleset.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import re
from typing import Any

from larkns.kernel import nftnl
from larkns.kernel.nftnl import Nftnl, NftnlError
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

# counter key -> the map that leads to it
COUNTER_MAPS = {
    "out4": "out4",
    "out6": "out6",
    "in4": "in4",
    "in6": "in6",
    "ctl-out": "ctl_out",
    "ctl-in": "ctl_in",
}
COUNTER_KEYS = tuple(COUNTER_MAPS)
# NAME-out4, NAME-ctl-in, NAME-cout-Campus, ...: the job's name is group 1.
_COUNTER_NAME = re.compile(r"(.+)-(?:out4|out6|in4|in6|ctl-out|ctl-in|cout-\w+|cin-\w+)")


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


def counter_name(job: str, key: str) -> str:
    return f"{job}-{key}"


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {**_T, "chain": chain, "expr": list(expr)}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _count_into(key: str, m: str) -> dict[str, Any]:
    return {"counter": {"map": {"key": _meta(key), "data": f"@{m}"}}}


Classes = tuple[tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...]


def class_maps(classes: Classes) -> dict[str, str]:
    """counter key -> map, for the admin's traffic classes (cout-NAME: bytes
    the job sent to the class's prefixes; cin-NAME: received from them)."""
    out = {}
    for name, _ in classes:
        out[f"cout-{name}"] = f"cout_{name}"
        out[f"cin-{name}"] = f"cin_{name}"
    return out


def _class_rules(classes: Classes, chain: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    rules = []
    for name, nets in classes:
        for proto, version in (("ip", 4), ("ip6", 6)):
            if not any(n.version == version for n in nets):
                continue
            for key in keys:
                # From the job (iifname) to the class: its destination; to the
                # job (oifname) from the class: its source.
                field = "daddr" if key == "iifname" else "saddr"
                m = f"cout_{name}" if key == "iifname" else f"cin_{name}"
                match = _match(
                    {"payload": {"protocol": proto, "field": field}}, f"@cls_{name}_{version}"
                )
                rules.append(_rule(chain, match, _count_into(key, m)))
    return rules


def _class_objects(classes: Classes) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for name, nets in classes:
        for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            elems = [
                {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
                for n in nets
                if n.version == version
            ]
            if not elems:
                continue
            objs.append(
                {
                    "set": {
                        **_T,
                        "name": f"cls_{name}_{version}",
                        "type": kind,
                        "flags": ["interval"],
                    }
                }
            )
            objs.append({"element": {**_T, "name": f"cls_{name}_{version}", "elem": elems}})
    objs += [
        {"map": {**_T, "name": m, "type": "ifname", "map": "counter"}}
        for m in class_maps(classes).values()
    ]
    return objs


def _declaration(classes: Classes = ()) -> list[dict[str, Any]]:
    """The whole table as `add` commands, for one transaction."""

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

    objs: list[dict[str, Any]] = [
        {"table": {"family": FAMILY, "name": TABLE}},
        {"set": {**_T, "name": "link_control", "type": "icmpv6_type"}},
        {"element": {**_T, "name": "link_control", "elem": LINK_CONTROL_ICMPV6}},
        {"set": {**_T, "name": "job_links", "type": "ifname"}},
        {"set": {**_T, "name": "masquerade_from", "type": "ifname"}},
    ]
    objs += [
        {"map": {**_T, "name": m, "type": "ifname", "map": "counter"}}
        for m in COUNTER_MAPS.values()
    ]
    objs += _class_objects(classes)
    objs += [
        base("forward", "forward"),
        base("input", "input"),
        base("output", "output"),
        base("postrouting", "postrouting", "nat", 100),
    ]
    ctl = _match({"payload": {"protocol": "icmpv6", "field": "type"}}, "@link_control")
    halves = {"forward": ("iifname", "oifname"), "input": ("iifname",), "output": ("oifname",)}
    for chain, keys in halves.items():
        for key in keys:
            objs.append(
                _rule(chain, ctl, _count_into(key, "ctl_out" if key == "iifname" else "ctl_in"))
            )
        objs.append(_rule(chain, ctl, {"return": None}))
        objs += _class_rules(classes, chain, keys)
        for fam, v in (("ipv4", "4"), ("ipv6", "6")):
            for key in keys:
                m = ("out" if key == "iifname" else "in") + v
                objs.append(_rule(chain, _match(_meta("nfproto"), fam), _count_into(key, m)))
    objs.append(
        _rule(
            "postrouting",
            _match(_meta("iifname"), "@masquerade_from"),
            _match(_meta("oifname"), "@job_links", "!="),
            {"masquerade": None},
        )
    )
    return [{"add": o} for o in objs]


class Ruleset:
    """The `inet larkns` table in the calling thread's network namespace."""

    def __init__(self, classes: Classes = ()) -> None:
        self.classes = classes
        # every counter of a job: key -> the map that leads to it
        self.maps = {**COUNTER_MAPS, **class_maps(classes)}
        self._nft = _load()
        self._nl = Nftnl()
        self._ready = False  # the table was there at our last look

    def close(self) -> None:
        self._nl.close()

    def _run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rc, out, err = self._nft.cmd(json.dumps({"nftables": commands}))
        if rc != 0:
            raise NftError(err.strip().splitlines()[0] if err.strip() else f"nft failed (rc {rc})")
        return _parse(out)

    def ensure_table(self) -> None:
        """Declare the table, unless present (whole or not at all: one transaction)."""
        if not self.has_table():
            # "create" fails if the table exists: two jobs starting at once on
            # an idle node must not both declare it (its rules would be there
            # twice, and count every packet twice).
            create = [{"create": {"table": {"family": FAMILY, "name": TABLE}}}]
            try:
                self._run(create + _declaration(self.classes)[1:])
            except NftError:
                if not self.has_table():
                    raise
        self._ready = True

    def has_table(self) -> bool:
        # "list tables" costs the same with 1 or 500 jobs; listing the table
        # itself would return every job's objects.
        rc, out, _err = self._nft.cmd(
            json.dumps({"nftables": [{"list": {"tables": {"family": FAMILY}}}]})
        )
        if rc != 0:
            return False
        return any(o.get("table", {}).get("name") == TABLE for o in _parse(out))

    def delete_table(self) -> bool:
        self._ready = False
        rc, _out, _err = self._nft.cmd(
            json.dumps({"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]})
        )
        return bool(rc == 0)

    def add_job(self, job: str, link: str, masquerade: bool) -> None:
        """Counters and map entries of one job, in one transaction."""
        key = nftnl.ifname_key(link)
        ops = [nftnl.add_counter(TABLE, counter_name(job, k)) for k in self.maps]
        ops += [
            nftnl.add_element(TABLE, m, key, counter_name(job, k)) for k, m in self.maps.items()
        ]
        ops.append(nftnl.add_element(TABLE, "job_links", key))
        if masquerade:
            ops.append(nftnl.add_element(TABLE, "masquerade_from", key))
        if not self._ready:
            self.ensure_table()
        try:
            self._nl.batch(ops)
        except NftnlError as e:
            if e.errno == errno.EEXIST:
                # A killed job of the same name left its objects (its record,
                # and so its name, is ours now): remove them, start at zero.
                self.remove_job(job, link)
            elif e.errno == errno.ENOENT:
                # The table went since our last look (the last job out
                # removed it, or someone flushed the ruleset).
                self.ensure_table()
            else:
                raise NftError(str(e)) from None
            try:
                self._nl.batch(ops)
            except NftnlError as e2:
                if e2.errno == errno.ENOENT and self.classes:
                    # The table is there but lacks a class's map: it was
                    # declared before LARKNS_CLASSES changed.
                    raise NftError(
                        f"{e2}: the table inet {TABLE} was declared with other LARKNS_CLASSES; "
                        "it is declared anew once no job is alive"
                    ) from None
                raise NftError(str(e2)) from None

    def remove_job(self, job: str, link: str | None) -> bool:
        """Remove everything of `job`; True if anything was there.

        One transaction in the common case; when part of it is already gone
        (a half-built or half-removed job), the kernel refuses the batch, so
        each object is then removed on its own.
        """
        ops = []
        if link is not None:
            key = nftnl.ifname_key(link)
            # Map entries first: they hold references to the counters.
            ops += [nftnl.delete_element(TABLE, m, key) for m in self.maps.values()]
            ops += [nftnl.delete_element(TABLE, s, key) for s in ("job_links", "masquerade_from")]
        ops += [nftnl.delete_counter(TABLE, counter_name(job, k)) for k in self.maps]
        try:
            self._nl.batch(ops)
            return True
        except NftnlError:
            pass
        removed = False
        for op in ops:
            with contextlib.suppress(NftnlError):
                self._nl.batch([op])
                removed = True
        return removed

    def counters(self, job: str) -> dict[str, Count]:
        """The job's counters by key (out4, in6, ...); missing ones read as zero."""
        got = self._nl.counters(TABLE, [counter_name(job, k) for k in self.maps])
        out = {}
        for k in self.maps:
            packets, nbytes = got.get(counter_name(job, k), (0, 0))
            out[k] = Count(packets, nbytes)
        return out

    def has_job(self, job: str) -> bool:
        """Whether all of the job's counters exist."""
        got = self._nl.counters(TABLE, [counter_name(job, k) for k in self.maps])
        return len(got) == len(self.maps)

    def job_objects(self) -> tuple[set[str], set[str]]:
        """(job names that own counters, links in the job maps and sets), for gc."""
        if not self.has_table():
            return set(), set()
        jobs: set[str] = set()
        links: set[str] = set()
        maps = set(self.maps.values()) | {"job_links", "masquerade_from"}
        for obj in self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}]):
            if "counter" in obj:
                name = obj["counter"]["name"]
                found = _COUNTER_NAME.fullmatch(name)
                if found:
                    jobs.add(found.group(1))
            body = obj.get("map") or obj.get("set") or {}
            if body.get("name") in maps:
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
