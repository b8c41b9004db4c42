"""nftables JSON for larkns's two tables, `inet larkns` (nft.py) and
`bridge larkns` (bridge.py).

Expressions, the objects and commands of a table, and what both tables
declare alike: each job's named counters, found through maps keyed by the
job's interface name; link control counted apart from the job's traffic;
the admin's traffic classes.  Nothing here talks to the kernel: these are
the documents libnftables is given, and what they are made from.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

Expr = dict[str, Any]  # an expression, a statement, or an object of a table
Cmd = dict[str, Any]  # a command: {"add": object}, {"flush": ...}, ...
Listing = list[Expr]  # the objects of a listed table

NAME = "larkns"
# Counting runs after other tables' filter chains (priority 0), so a packet
# some firewall drops is not billed to the job.
ACCOUNT_PRIORITY = 300
# The guards and fences run before conntrack (-200) and before other tables.
GUARD_PRIORITY = -300

# counter key -> the map that leads to it
COUNTER_MAPS = {
    "out4": "out4",
    "out6": "out6",
    "in4": "in4",
    "in6": "in6",
    "ctl-out": "ctl_out",
    "ctl-in": "ctl_in",
    # what the guard dropped: spoofed sources, rogue RAs and DHCP servers
    "drop": "dropped",
}
COUNTER_KEYS = tuple(COUNTER_MAPS)

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
# Addresses a packet never crosses a router with: nothing is forwarded from
# the unspecified or a link-local source, nor to a link-local or
# link-scope multicast destination (RFC 4291).
LINK_SOURCES6: list[Any] = ["::", {"prefix": {"addr": "fe80::", "len": 10}}]
LINK_DESTINATIONS6: list[Any] = [
    {"prefix": {"addr": "fe80::", "len": 10}},
    {"prefix": {"addr": "ff02::", "len": 16}},
]

# What a job may not send: router advertisements and redirects (it would be
# the worker's router), DHCP server replies (v4 from port 67, v6 from 547).
ROGUE_ICMPV6 = ["nd-router-advert", "nd-redirect"]
ROGUE_UDP_SPORTS = [67, 547]

# class.NAME.FINGERPRINT: no "-" in it (class names and hex digits have none),
# so it can never be taken for a job's counter, nor a job's for it.
MARKER_PREFIX = "class."


# -- expressions ------------------------------------------------------------


def meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def payload(proto: str, field: str) -> Expr:
    return {"payload": {"protocol": proto, "field": field}}


def match(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def one_or_set(values: Sequence[Any]) -> Any:
    return values[0] if len(values) == 1 else {"set": list(values)}


def count_into(key: str, m: str) -> Expr:
    """Count into the counter map `m` holds for the packet's interface
    `key` (iifname or oifname); a packet of an interface not in it is not
    counted, and the rule ends there."""
    return {"counter": {"map": {"key": meta(key), "data": f"@{m}"}}}


def jump(chain: str) -> Expr:
    return {"jump": {"target": chain}}


def goto(chain: str) -> Expr:
    return {"goto": {"target": chain}}


def rogue() -> list[Expr]:
    """Matches of what a job may not send (ROGUE_ICMPV6, ROGUE_UDP_SPORTS)."""
    return [
        match(payload("icmpv6", "type"), {"set": ROGUE_ICMPV6}),
        match(payload("udp", "sport"), {"set": ROGUE_UDP_SPORTS}),
    ]


# -- a table ----------------------------------------------------------------


class Tap(NamedTuple):
    """A counting chain, and the end of a job's link it counts at."""

    chain: str
    # iifname: what the job sends; oifname: what it receives.
    side: str
    # Matches proving a packet here stays on the job's link (it goes to the
    # job, or ends at the worker itself); None where it may be routed on.
    on_link: tuple[Expr, ...] | None


@dataclass(frozen=True)
class Table:
    """One of larkns's tables, as the objects and commands that make it."""

    family: str
    # the set of every job's interface (its end of the job's link)
    links: str
    taps: tuple[Tap, ...]
    # matches of IPv4 and of IPv6 packets
    versions: tuple[Expr, Expr]
    # IGMP to a multicast group with TTL 1 counts as link control (where the
    # site's multicast listeners are heard: the bridge)
    igmp: bool = False
    name: str = NAME

    @property
    def ref(self) -> dict[str, str]:
        return {"family": self.family, "table": self.name}

    def table(self) -> Expr:
        return {"table": {"family": self.family, "name": self.name}}

    def chain(self, name: str) -> Expr:
        return {"chain": {**self.ref, "name": name}}

    def base_chain(self, name: str, hook: str, prio: int, ctype: str = "filter") -> Expr:
        """A base chain, accepting by default."""
        return {
            "chain": {
                **self.ref,
                "name": name,
                "type": ctype,
                "hook": hook,
                "prio": prio,
                "policy": "accept",
            }
        }

    def rule(self, chain: str, *expr: Expr) -> Expr:
        return {"rule": {**self.ref, "chain": chain, "expr": list(expr)}}

    def set(self, name: str, kind: str | list[str], flags: list[str] | None = None) -> Expr:
        body: dict[str, Any] = {**self.ref, "name": name, "type": kind}
        if flags:
            body["flags"] = flags
        return {"set": body}

    def map(self, name: str, kind: str, data: str) -> Expr:
        return {"map": {**self.ref, "name": name, "type": kind, "map": data}}

    def counter(self, name: str) -> Expr:
        return {"counter": {**self.ref, "name": name}}

    def element(self, name: str, elems: list[Any]) -> Expr:
        return {"element": {**self.ref, "name": name, "elem": elems}}

    def listing(self) -> Cmd:
        return {"list": {"table": {"family": self.family, "name": self.name}}}

    def chains(self) -> list[str]:
        """The counting chains, each once."""
        return list(dict.fromkeys(tap.chain for tap in self.taps))


def counter_name(job: str, key: str) -> str:
    return f"{job}-{key}"


def counting_objects(t: Table) -> list[Expr]:
    """What the counting rules look up: the maps from a job's interface to
    its counters, and the link-control ICMPv6 types."""
    objs = [t.map(m, "ifname", "counter") for m in COUNTER_MAPS.values()]
    objs.append(t.set("link_control", "icmpv6_type"))
    objs.append(t.element("link_control", LINK_CONTROL_ICMPV6))
    return objs


def spoofed(t: Table) -> list[Expr]:
    """Chain spoofed: what a guard sends there is counted as the job's
    dropped, and dropped (a job of an older table has no counter here: the
    lookup then ends the counting rule, and the next one still drops)."""
    return [
        t.chain("spoofed"),
        t.rule("spoofed", count_into("iifname", "dropped")),
        t.rule("spoofed", {"drop": None}),
    ]


# -- counting ---------------------------------------------------------------


def link_control_rules(t: Table) -> list[Expr]:
    """Chains control_out and control_in (count into the job's link-control
    counters), and the rules, for the head of each counting chain, that send
    link control there (`goto`: nothing after counts it again).

    Link control is ICMPv6 of a link-control type that stays on the link:
    from a link source or to a link destination, with the hop limit ND (255)
    or MLD (1) requires.  Where a packet is known to stay on the link (to
    the job, or from it to the worker itself: Tap.on_link), a hop limit of
    255 proves it too: no router was on the way.  Whatever else has a
    link-control type (a job's ND-typed packets to the site, forwarded) is
    the job's traffic.  (The inet forward hook sees a routed packet's hop
    limit already decremented: 255 never passes there.)  With `t.igmp`,
    IGMP to a multicast group with TTL 1 as well.
    """
    ctl = match(payload("icmpv6", "type"), "@link_control")

    def hops(*values: int) -> Expr:
        return match(payload("ip6", "hoplimit"), one_or_set(values))

    def addr(field: str, nets: list[Any]) -> Expr:
        return match(payload("ip6", field), {"set": nets})

    objs: list[Expr] = [
        t.chain("control_out"),
        t.rule("control_out", count_into("iifname", "ctl_out")),
        t.chain("control_in"),
        t.rule("control_in", count_into("oifname", "ctl_in")),
    ]
    for tap in t.taps:
        job = match(meta(tap.side), f"@{t.links}")
        to = goto("control_out" if tap.side == "iifname" else "control_in")
        objs.append(t.rule(tap.chain, job, ctl, hops(1, 255), addr("saddr", LINK_SOURCES6), to))
        objs.append(
            t.rule(tap.chain, job, ctl, hops(1, 255), addr("daddr", LINK_DESTINATIONS6), to)
        )
        if tap.on_link is not None:
            objs.append(t.rule(tap.chain, job, ctl, *tap.on_link, hops(255), to))
        if t.igmp:
            group = {"prefix": {"addr": "224.0.0.0", "len": 4}}
            igmp = match(payload("ip", "protocol"), "igmp")
            ttl = match(payload("ip", "ttl"), 1)
            objs.append(t.rule(tap.chain, job, igmp, ttl, match(payload("ip", "daddr"), group), to))
    return objs


def counting_rules(t: Table, listing: Listing) -> list[Cmd]:
    """The counting chains' rules, as `add` commands: link control first,
    then each IP version, then the classes of a listed table (`listing`;
    empty when the table is being declared, whose classes come after)."""
    objs = link_control_rules(t)
    for tap in t.taps:
        direction = "out" if tap.side == "iifname" else "in"
        for version, is_version in zip((4, 6), t.versions, strict=True):
            objs.append(
                t.rule(tap.chain, is_version, count_into(tap.side, f"{direction}{version}"))
            )
    cmds = [{"add": o} for o in objs]
    for name, version in class_sets_in(listing):
        cmds += [{"add": r} for r in class_rules(t, name, version)]
    return cmds


# -- traffic classes --------------------------------------------------------

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Classes = tuple[tuple[str, tuple[Net, ...]], ...]


def class_names(classes: Classes) -> tuple[str, ...]:
    return tuple(name for name, _ in classes)


def class_maps(names: Iterable[str]) -> dict[str, str]:
    """counter key -> map, for the admin's traffic classes (cout-NAME: bytes
    the job sent to the class's prefixes; cin-NAME: received from them)."""
    out = {}
    for name in names:
        out[f"cout-{name}"] = f"cout_{name}"
        out[f"cin-{name}"] = f"cin_{name}"
    return out


def class_marker(name: str, nets: Sequence[Net]) -> str:
    """The name of the marker that says class `name` is in the table with `nets`."""
    import hashlib  # only with LARKNS_CLASSES: OpenSSL's _hashlib costs ~2.5 ms to load

    canonical = ",".join(sorted(str(n) for n in nets))
    return f"{MARKER_PREFIX}{name}.{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def class_rules(t: Table, name: str, version: int) -> list[Expr]:
    """The rules that count a job's traffic to and from one family of a class."""
    proto = "ip" if version == 4 else "ip6"
    rules = []
    for tap in t.taps:
        # From the job (iifname) to the class: its destination; to the
        # job (oifname) from the class: its source.
        field = "daddr" if tap.side == "iifname" else "saddr"
        m = f"cout_{name}" if tap.side == "iifname" else f"cin_{name}"
        in_class = match(payload(proto, field), f"@cls_{name}_{version}")
        rules.append(t.rule(tap.chain, in_class, count_into(tap.side, m)))
    return rules


def _prefixes(nets: Sequence[Net], version: int) -> list[Expr]:
    return [
        {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
        for n in nets
        if n.version == version
    ]


def _class_set(t: Table, name: str, version: int) -> Expr:
    kind = "ipv4_addr" if version == 4 else "ipv6_addr"
    return t.set(f"cls_{name}_{version}", kind, ["interval"])


def class_declaration(t: Table, classes: Classes) -> list[Cmd]:
    """Each class's sets, maps, marker and rules, as `add` commands."""
    cmds: list[Cmd] = []
    for name, nets in classes:
        for version in (4, 6):
            elems = _prefixes(nets, version)
            if elems:
                cmds.append({"add": _class_set(t, name, version)})
                cmds.append({"add": t.element(f"cls_{name}_{version}", elems)})
        cmds += [{"add": t.map(m, "ifname", "counter")} for m in class_maps([name]).values()]
        cmds.append({"add": t.counter(class_marker(name, nets))})
        for version in (4, 6):
            if _prefixes(nets, version):
                cmds += [{"add": r} for r in class_rules(t, name, version)]
    return cmds


def class_update(t: Table, classes: Classes, listing: Listing) -> list[Cmd]:
    """Commands that make the listed table count `classes` as configured.

    Only classes without their marker are touched.  A new class gets its
    sets, maps and rules; rules are appended to the chains, after the
    link-control rules (counting rules do not end the chain, so where
    they stand among them does not matter).  A class already there gets its
    sets refilled (flush and add, within the transaction: a packet sees the
    old prefixes or the new ones); a family it no longer has keeps an empty
    set, so its rules match nothing, and a family it gains gets its set and
    rules.  Objects that should not exist yet are made with `create`, which
    fails if they do: should a process ever get here without the journal's
    lock, it fails rather than add a class's rules twice (counting twice).
    """
    sets = {o["set"]["name"] for o in listing if "set" in o}
    maps = {o["map"]["name"] for o in listing if "map" in o}
    markers = {
        o["counter"]["name"]
        for o in listing
        if "counter" in o and o["counter"]["name"].startswith(MARKER_PREFIX)
    }
    cmds: list[Cmd] = []
    for name, nets in classes:
        marker = class_marker(name, nets)
        if marker in markers:
            continue
        cmds += [
            {"create": t.map(m, "ifname", "counter")}
            for m in class_maps([name]).values()
            if m not in maps
        ]
        for version in (4, 6):
            set_name = f"cls_{name}_{version}"
            elems = _prefixes(nets, version)
            if set_name in sets:
                cmds.append({"flush": {"set": {**t.ref, "name": set_name}}})
                if elems:
                    cmds.append({"add": t.element(set_name, elems)})
            elif elems:
                cmds.append({"create": _class_set(t, name, version)})
                cmds.append({"add": t.element(set_name, elems)})
                cmds += [{"add": r} for r in class_rules(t, name, version)]
        # The old prefixes' marker goes: a process configured with them must
        # bring them back rather than take the table for its own.
        cmds += [
            {"delete": t.counter(old)}
            for old in sorted(markers)
            if old.startswith(f"{MARKER_PREFIX}{name}.")
        ]
        cmds.append({"create": t.counter(marker)})
    return cmds


def classes_in(listing: Listing) -> tuple[str, ...]:
    """The classes a listed table has maps for."""
    return tuple(
        sorted(
            o["map"]["name"][len("cout_") :]
            for o in listing
            if "map" in o and o["map"]["name"].startswith("cout_")
        )
    )


def class_sets_in(listing: Listing) -> list[tuple[str, int]]:
    """(class, IP version) of each class set a listed table has."""
    found = []
    for o in listing:
        name = o.get("set", {}).get("name", "")
        if name.startswith("cls_") and name[-2:] in ("_4", "_6"):
            found.append((name[4:-2], int(name[-1])))
    return sorted(found)


# -- versions of a table ----------------------------------------------------


class Feature(NamedTuple):
    """A part of a table added after its first version.  A table made by an
    older larkns, its jobs still running, gets the parts it lacks in place."""

    marker: str  # a counter that says the table has it
    chain: str  # a chain only it makes: a table without it lacks the part
    # its commands, given the table's listing (empty when the table is
    # being declared)
    commands: Callable[[Listing], list[Cmd]]


def feature_update(features: Iterable[Feature], listing: Listing) -> list[Cmd]:
    """What a listed table lacks of `features`."""
    chains = {o["chain"]["name"] for o in listing if "chain" in o}
    cmds: list[Cmd] = []
    for feature in features:
        if feature.chain not in chains:
            cmds += feature.commands(listing)
    return cmds


def parse(out: str) -> Listing:
    """Objects of nft's JSON output, which is one document per listing command."""
    objs: Listing = []
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
