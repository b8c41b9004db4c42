"""larkns's own nftables table: accounting and NAT for every job.

One table, `inet larkns`, for all jobs.  Its base chains count each packet
into the counters of the job whose link it crosses, found by looking the
interface name up in maps (hash lookups: a packet costs the same with 1 or
500 jobs alive), and masquerade what jobs send out:

    table inet larkns
      set link_control  icmpv6_type         ND, RA/RS and MLD messages
      set job_links     ifname              every job's host end
      set masquerade_from ifname            jobs in nat mode
      map out4 out6 in4 in6 ctl_out ctl_in dropped   ifname : counter
      counter NAME-out4 NAME-out6 NAME-in4 NAME-in6 NAME-ctl-out NAME-ctl-in NAME-drop (per job)
      chain forward  hook forward  priority 300
            iifname @job_links icmpv6 type @link_control ip6 hoplimit { 1, 255 }
                ip6 saddr { ::, fe80::/10 } goto control_out     (and daddr
                { fe80::/10, ff02::/16 }; the oifname half to control_in, which
                also takes hop limit 255: link control stays on its link)
            meta nfproto ipv4 counter name iifname map @out4
            meta nfproto ipv4 counter name oifname map @in4    (and ipv6)
      chain control_out: counter name iifname map @ctl_out   (control_in: oifname)
      chain input    hook input    priority 300     (the iifname half)
      chain output   hook output   priority 300     (the oifname half)
      chain postrouting  nat hook postrouting
            iifname @masquerade_from oifname != @job_links masquerade
      chain guard    hook prerouting priority -300  (what a job may not send)
            iifname @job_links icmpv6 type { nd-router-advert, nd-redirect } jump spoofed
            iifname @job_links udp sport { 67, 547 } jump spoofed
            iifname @job_links iifname . ip saddr != @job_src4 jump spoofed
            iifname @job_links ip6 saddr != :: iifname . ip6 saddr != @job_src6 jump spoofed
      chain spoofed: counter name iifname map @dropped; drop
      chain fence    hook forward  priority -300  (jobs do not reach each other)
            iifname @job_links oifname @job_links goto refused
      chain fence_in hook input    priority -300  (nor the worker's services)
            iifname @job_links goto job_input
      chain job_input: ct state { established, related } accept; ICMP echo and
            errors, ND, RS and MLD accept; IGMP accept;
            meta pkttype host goto refused; drop
      chain refused: counter name iifname map @dropped; TCP reset, or ICMP
            administratively prohibited
      map inbound4 inbound6   inet_service : ipv4_addr / ipv6_addr   (forwarded ports)
      chain prerouting  nat hook prerouting priority -100
            fib daddr type local meta l4proto { tcp, udp } dnat ip to th dport map @inbound4
            (and ip6 with @inbound6)

With LARKNS_CLASSES, each class C adds sets cls_C_4/6 (its prefixes), maps
cout_C/cin_C (ifname : counter), counters JOB-cout-C and JOB-cin-C per job,
counting rules after the link-control rules, and a marker: an unused
counter `class.C.FINGERPRINT` saying the class is in the table with exactly
these prefixes.  A process whose markers are all there (one netlink round
trip, whatever the number of jobs) uses the table as it is; otherwise it
brings the table in line with its classes in one transaction
(update_classes).  Classes are only ever added or refilled, never removed
while the table lives: jobs started under an older configuration keep
counting into them, and each job's record names the classes it has, so
whichever process removes the job removes all of it.

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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

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
    # what the guard dropped: spoofed sources, rogue RAs and DHCP servers
    "drop": "dropped",
}
COUNTER_KEYS = tuple(COUNTER_MAPS)
# NAME-out4, NAME-ctl-in, NAME-cout-Campus, ...: the job's name is group 1.
_COUNTER_NAME = re.compile(r"(.+)-(?:out4|out6|in4|in6|ctl-out|ctl-in|drop|cout-\w+|cin-\w+)")
# class.NAME.FINGERPRINT: no "-" in it (class names and hex digits have none),
# so it can never be taken for a job's counter, nor a job's for it.
MARKER_PREFIX = "class."
# The guard (chain guard, prerouting, before conntrack) is part of every
# table from this marker's version on; a table without it (made by an older
# larkns, its jobs still running) gets it added in place.
GUARD_MARKER = "schema.guard.src"
GUARD_PRIORITY = -300
# What a job may not send: router advertisements and redirects (it would be
# the worker's router), DHCP server replies (v4 from port 67, v6 from 547).
ROGUE_ICMPV6 = ["nd-router-advert", "nd-redirect"]
ROGUE_UDP_SPORTS = [67, 547]
# the chains that count, and which end of a job's link each one sees
_HALVES = {"forward": ("iifname", "oifname"), "input": ("iifname",), "output": ("oifname",)}


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


def base_chain(
    table: dict[str, str], name: str, hook: str, prio: int, ctype: str = "filter"
) -> dict[str, Any]:
    """A base chain of `table` (family and name), accepting by default."""
    return {
        "chain": {
            **table,
            "name": name,
            "type": ctype,
            "hook": hook,
            "prio": prio,
            "policy": "accept",
        }
    }


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {**_T, "chain": chain, "expr": list(expr)}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _count_into(key: str, m: str) -> dict[str, Any]:
    return {"counter": {"map": {"key": _meta(key), "data": f"@{m}"}}}


Classes = tuple[tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...]
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def class_rules(name: str, version: int) -> list[dict[str, Any]]:
    """The rules that count a job's traffic to and from one family of a class."""
    proto = "ip" if version == 4 else "ip6"
    rules = []
    for chain, keys in _HALVES.items():
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


def _prefixes(nets: Sequence[Net], version: int) -> list[dict[str, Any]]:
    return [
        {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
        for n in nets
        if n.version == version
    ]


def _class_set(name: str, version: int) -> dict[str, Any]:
    kind = "ipv4_addr" if version == 4 else "ipv6_addr"
    return {"set": {**_T, "name": f"cls_{name}_{version}", "type": kind, "flags": ["interval"]}}


def _class_map(m: str) -> dict[str, Any]:
    return {"map": {**_T, "name": m, "type": "ifname", "map": "counter"}}


def _class_declaration(classes: Classes) -> list[dict[str, Any]]:
    """Each class's sets, maps, marker and rules, as `add` commands."""
    cmds: list[dict[str, Any]] = []
    for name, nets in classes:
        for version in (4, 6):
            elems = _prefixes(nets, version)
            if elems:
                cmds.append({"add": _class_set(name, version)})
                cmds.append(
                    {"add": {"element": {**_T, "name": f"cls_{name}_{version}", "elem": elems}}}
                )
        cmds += [{"add": _class_map(m)} for m in class_maps([name]).values()]
        cmds.append({"add": {"counter": {**_T, "name": class_marker(name, nets)}}})
        for version in (4, 6):
            if _prefixes(nets, version):
                cmds += [{"add": r} for r in class_rules(name, version)]
    return cmds


def class_update(classes: Classes, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    sets = {o["set"]["name"] for o in table if "set" in o}
    maps = {o["map"]["name"] for o in table if "map" in o}
    markers = {
        o["counter"]["name"]
        for o in table
        if "counter" in o and o["counter"]["name"].startswith(MARKER_PREFIX)
    }
    cmds: list[dict[str, Any]] = []
    for name, nets in classes:
        marker = class_marker(name, nets)
        if marker in markers:
            continue
        cmds += [{"create": _class_map(m)} for m in class_maps([name]).values() if m not in maps]
        for version in (4, 6):
            set_name = f"cls_{name}_{version}"
            elems = _prefixes(nets, version)
            element = {"element": {**_T, "name": set_name, "elem": elems}}
            if set_name in sets:
                cmds.append({"flush": {"set": {**_T, "name": set_name}}})
                if elems:
                    cmds.append({"add": element})
            elif elems:
                cmds.append({"create": _class_set(name, version)})
                cmds.append({"add": element})
                cmds += [{"add": r} for r in class_rules(name, version)]
        # The old prefixes' marker goes: a process configured with them must
        # bring them back rather than take the table for its own.
        cmds += [
            {"delete": {"counter": {**_T, "name": old}}}
            for old in sorted(markers)
            if old.startswith(f"{MARKER_PREFIX}{name}.")
        ]
        cmds.append({"create": {"counter": {**_T, "name": marker}}})
    return cmds


def _guard() -> list[dict[str, Any]]:
    """The guard's chains, sets, map, rules and marker, as `add` commands.

    Anti-spoofing: a packet from a job's link must come from one of the
    addresses the job was given, found in sets keyed by link and address
    (hash lookups, as cheap with 500 jobs as with one).  "::" is let through
    (MLD before the job has a link-local address).  The kernel's reverse-path
    lookup (fib saddr . iif) would need no per-job element, but costs ~14 %
    of a job's IPv6 TCP throughput here (measured: 12.2 against 14.1
    Gbit/s); skipping it for established flows would let a job inject into
    another job's flow by taking its address.
    """
    from_job = _match(_meta("iifname"), "@job_links")
    spoofed = {"jump": {"target": "spoofed"}}

    def src(proto: str) -> dict[str, Any]:
        return {"concat": [_meta("iifname"), {"payload": {"protocol": proto, "field": "saddr"}}]}

    objs: list[dict[str, Any]] = [
        {"map": {**_T, "name": "dropped", "type": "ifname", "map": "counter"}},
        {"set": {**_T, "name": "job_src4", "type": ["ifname", "ipv4_addr"]}},
        {"set": {**_T, "name": "job_src6", "type": ["ifname", "ipv6_addr"]}},
        base_chain(_T, "guard", "prerouting", GUARD_PRIORITY),
        {"chain": {**_T, "name": "spoofed"}},
        _rule(
            "guard",
            from_job,
            _match({"payload": {"protocol": "icmpv6", "field": "type"}}, {"set": ROGUE_ICMPV6}),
            spoofed,
        ),
        _rule(
            "guard",
            from_job,
            _match({"payload": {"protocol": "udp", "field": "sport"}}, {"set": ROGUE_UDP_SPORTS}),
            spoofed,
        ),
        _rule(
            "guard",
            from_job,
            _match(_meta("nfproto"), "ipv4"),
            _match(src("ip"), "@job_src4", "!="),
            spoofed,
        ),
        _rule(
            "guard",
            from_job,
            _match({"payload": {"protocol": "ip6", "field": "saddr"}}, "::", "!="),
            _match(src("ip6"), "@job_src6", "!="),
            spoofed,
        ),
        # Counted apart (a job of an older table has no counter here: the
        # lookup then ends this rule, and the next one still drops).
        _rule("spoofed", _count_into("iifname", "dropped")),
        _rule("spoofed", {"drop": None}),
        {"counter": {**_T, "name": GUARD_MARKER}},
    ]
    return [{"add": o} for o in objs]


INBOUND_MARKER = "schema.inbound"
INBOUND_PRIORITY = -100  # dstnat


def _inbound() -> list[dict[str, Any]]:
    """Forwarded ports (nat mode): a new TCP or UDP connection to one of the
    worker's own addresses, on a port of a job's range, goes to that job.
    The maps are keyed by port: each job adds its ports, nothing else."""
    dport = {"payload": {"protocol": "th", "field": "dport"}}
    local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    l4 = _match(_meta("l4proto"), {"set": ["tcp", "udp"]})
    objs: list[dict[str, Any]] = [
        {"map": {**_T, "name": "inbound4", "type": "inet_service", "map": "ipv4_addr"}},
        {"map": {**_T, "name": "inbound6", "type": "inet_service", "map": "ipv6_addr"}},
        base_chain(_T, "prerouting", "prerouting", INBOUND_PRIORITY, "nat"),
    ]
    for fam, m in (("ip", "inbound4"), ("ip6", "inbound6")):
        nfproto = _match(_meta("nfproto"), "ipv4" if fam == "ip" else "ipv6")
        dnat = {"dnat": {"family": fam, "addr": {"map": {"key": dport, "data": f"@{m}"}}}}
        objs.append(_rule("prerouting", nfproto, local, l4, dnat))
    objs.append({"counter": {**_T, "name": INBOUND_MARKER}})
    return [{"add": o} for o in objs]


# Addresses a packet never crosses a router with: nothing is forwarded from
# the unspecified or a link-local source, nor to a link-local or
# link-scope multicast destination (RFC 4291).
LINK_SOURCES6: list[Any] = ["::", {"prefix": {"addr": "fe80::", "len": 10}}]
LINK_DESTINATIONS6: list[Any] = [
    {"prefix": {"addr": "fe80::", "len": 10}},
    {"prefix": {"addr": "ff02::", "len": 16}},
]
LINK_CONTROL_MARKER = "schema.linkctl"
# The counting chains' names, keyed by the hook they count at.
COUNTING_CHAINS = tuple(_HALVES)


def link_control_rules(table: dict[str, str], links: str, igmp: bool) -> list[dict[str, Any]]:
    """Chains control_out and control_in (count into the job's link-control
    counters), and the rules, for the head of each counting chain, that send
    link control there (`goto`: nothing after counts it again).

    Link control is ICMPv6 of a link-control type that stays on the link:
    from a link source or to a link destination, with the hop limit ND (255)
    or MLD (1) requires.  Towards a job, or from it to the worker itself, a
    hop limit of 255 proves it too: no router was on the way.  Whatever else has a
    link-control type (a job's ND-typed packets to the site, forwarded) is
    the job's traffic.  (The forward hook sees a routed packet's hop limit
    already decremented: 255 never passes there.)  With `igmp` (the bridge,
    where the site's multicast listeners are heard), IGMP to a multicast
    group with TTL 1.
    """

    def rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
        return {"rule": {**table, "chain": chain, "expr": list(expr)}}

    ctl = _match({"payload": {"protocol": "icmpv6", "field": "type"}}, "@link_control")

    def hops(*values: int) -> dict[str, Any]:
        field = {"payload": {"protocol": "ip6", "field": "hoplimit"}}
        return _match(field, values[0] if len(values) == 1 else {"set": list(values)})

    def addr(field: str, nets: list[Any]) -> dict[str, Any]:
        return _match({"payload": {"protocol": "ip6", "field": field}}, {"set": nets})

    objs: list[dict[str, Any]] = [
        {"chain": {**table, "name": "control_out"}},
        rule("control_out", _count_into("iifname", "ctl_out")),
        {"chain": {**table, "name": "control_in"}},
        rule("control_in", _count_into("oifname", "ctl_in")),
    ]
    for chain, keys in _HALVES.items():
        for key in keys:
            job = _match(_meta(key), f"@{links}")
            to = {"goto": {"target": "control_out" if key == "iifname" else "control_in"}}
            objs.append(rule(chain, job, ctl, hops(1, 255), addr("saddr", LINK_SOURCES6), to))
            objs.append(rule(chain, job, ctl, hops(1, 255), addr("daddr", LINK_DESTINATIONS6), to))
            if key == "oifname" or chain == "input":
                # Towards the job, or ending at the worker: never forwarded.
                objs.append(rule(chain, job, ctl, hops(255), to))
            if igmp:
                group = {"prefix": {"addr": "224.0.0.0", "len": 4}}
                objs.append(
                    rule(
                        chain,
                        job,
                        _match({"payload": {"protocol": "ip", "field": "protocol"}}, "igmp"),
                        _match({"payload": {"protocol": "ip", "field": "ttl"}}, 1),
                        _match({"payload": {"protocol": "ip", "field": "daddr"}}, group),
                        to,
                    )
                )
    return objs


def class_sets_in(table: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(class, IP version) of each class set a listed table has."""
    found = []
    for o in table:
        name = o.get("set", {}).get("name", "")
        if name.startswith("cls_") and name[-2:] in ("_4", "_6"):
            found.append((name[4:-2], int(name[-1])))
    return sorted(found)


def _link_control(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The counting chains' rules, link control first (see
    link_control_rules), as `add` commands.  For a listed table made before
    them (`table` not empty), the chains are flushed and filled again, class
    rules included, in the same transaction: a packet sees the old rules or
    the new, and the counters keep their values."""
    cmds: list[dict[str, Any]] = []
    if table:
        cmds += [{"flush": {"chain": {**_T, "name": c}}} for c in COUNTING_CHAINS]
    objs = link_control_rules(_T, "job_links", igmp=False)
    for chain, keys in _HALVES.items():
        for fam, v in (("ipv4", "4"), ("ipv6", "6")):
            for key in keys:
                m = ("out" if key == "iifname" else "in") + v
                objs.append(_rule(chain, _match(_meta("nfproto"), fam), _count_into(key, m)))
    objs.append({"counter": {**_T, "name": LINK_CONTROL_MARKER}})
    cmds += [{"add": o} for o in objs]
    for name, version in class_sets_in(table):
        cmds += [{"add": r} for r in class_rules(name, version)]
    return cmds


FENCE_MARKER = "schema.fence"
FENCE_PRIORITY = -300
# What a job may send to the worker itself: ICMP echo and errors (ping its
# gateway, path MTU), IPv6 router and neighbour discovery and MLD (larkns's
# own RAs answer its solicitations), IGMP.  Its relays (DNS, chirp) live in
# its own namespace and need none of the worker's addresses.
JOB_INPUT_ICMP = ["echo-request", "destination-unreachable", "time-exceeded", "parameter-problem"]
JOB_INPUT_ICMPV6 = [
    "echo-request",
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "nd-router-solicit",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-query",
    "mld-listener-report",
    "mld-listener-done",
    "mld2-listener-report",
]


def _fence(_table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a job may reach besides the site and the internet.

    Not another job: whatever comes from one job's link and would leave by
    another's (nat, routed, and a job's forwarded ports taken from another
    job) is refused.  This is the one place where a policy letting some
    jobs reach each other would go (an `accept` for pairs of links, before
    the refusal); there is none.

    On the worker itself, only what larkns serves it (RAs and neighbour
    discovery), ICMP echo and errors, and replies to what the worker began;
    nothing else addressed to the worker's own addresses (services bound to
    0.0.0.0 or ::).  Unicast is refused and counted as dropped; broadcast
    and multicast to the worker are dropped quietly (a job's mDNS is no
    attack).
    """
    from_job = _match(_meta("iifname"), "@job_links")
    refuse = {"goto": {"target": "refused"}}
    objs: list[dict[str, Any]] = [
        # Refused at once (a TCP reset, or ICMP administratively
        # prohibited): the job's connect fails rather than waits.  Not a
        # reset to a link-local address: the kernel routes resets without
        # the interface such an address needs, and it leaves by another
        # link; ICMPv6 errors go back by the one the packet came in by.
        {"chain": {**_T, "name": "refused"}},
        _rule("refused", _count_into("iifname", "dropped")),
        _rule(
            "refused",
            _match(_meta("l4proto"), "tcp"),
            _match(_meta("nfproto"), "ipv4"),
            {"reject": {"type": "tcp reset"}},
        ),
        _rule(
            "refused",
            _match(_meta("l4proto"), "tcp"),
            _match(
                {"payload": {"protocol": "ip6", "field": "daddr"}},
                {"prefix": {"addr": "fe80::", "len": 10}},
                "!=",
            ),
            {"reject": {"type": "tcp reset"}},
        ),
        _rule("refused", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
        base_chain(_T, "fence", "forward", FENCE_PRIORITY),
        _rule("fence", from_job, _match(_meta("oifname"), "@job_links"), refuse),
        {"chain": {**_T, "name": "job_input"}},
        base_chain(_T, "fence_in", "input", FENCE_PRIORITY),
        _rule("fence_in", from_job, {"goto": {"target": "job_input"}}),
        _rule(
            "job_input",
            _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}),
            {"accept": None},
        ),
        _rule(
            "job_input",
            _match({"payload": {"protocol": "icmp", "field": "type"}}, {"set": JOB_INPUT_ICMP}),
            {"accept": None},
        ),
        _rule(
            "job_input",
            _match({"payload": {"protocol": "icmpv6", "field": "type"}}, {"set": JOB_INPUT_ICMPV6}),
            {"accept": None},
        ),
        _rule("job_input", _match(_meta("l4proto"), "igmp"), {"accept": None}),
        _rule("job_input", _match(_meta("pkttype"), "host"), refuse),
        _rule("job_input", {"drop": None}),
        {"counter": {**_T, "name": FENCE_MARKER}},
    ]
    return [{"add": o} for o in objs]


# Parts of the table added after its first version: (marker, a chain that
# only they make, their commands given the table's listing: empty when the
# table is being declared).  A table made by an older larkns, its jobs still
# running, gets the missing ones in place.
FEATURES: tuple[tuple[str, str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]], ...] = (
    (GUARD_MARKER, "guard", lambda _t: _guard()),
    (INBOUND_MARKER, "prerouting", lambda _t: _inbound()),
    (LINK_CONTROL_MARKER, "control_out", _link_control),
    (FENCE_MARKER, "fence", _fence),
)


def feature_update(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a listed table lacks of FEATURES."""
    chains = {o["chain"]["name"] for o in table if "chain" in o}
    cmds: list[dict[str, Any]] = []
    for _marker, chain, objects in FEATURES:
        if chain not in chains:
            cmds += objects(table)
    return cmds


def _declaration(classes: Classes = ()) -> list[dict[str, Any]]:
    """The whole table as `add` commands, for one transaction."""

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
    objs += [
        base_chain(_T, "forward", "forward", ACCOUNT_PRIORITY),
        base_chain(_T, "input", "input", ACCOUNT_PRIORITY),
        base_chain(_T, "output", "output", ACCOUNT_PRIORITY),
        base_chain(_T, "postrouting", "postrouting", 100, "nat"),
    ]
    objs.append(
        _rule(
            "postrouting",
            _match(_meta("iifname"), "@masquerade_from"),
            _match(_meta("oifname"), "@job_links", "!="),
            {"masquerade": None},
        )
    )
    # The counting rules come with the link-control feature (which rebuilt
    # them in tables made before it); class rules after them, as when a
    # class is added to a live table.
    features = [c for _m, _chain, objects in FEATURES for c in objects([])]
    return [{"add": o} for o in objs] + features + _class_declaration(classes)


class Inbound(NamedTuple):
    """A job's forwarded ports, and where they go."""

    ports: range
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None


class TableJobs(NamedTuple):
    """What jobs own in the table, as gc finds it."""

    jobs: set[str]  # job names that own counters
    links: set[str]  # links in the job maps and sets
    classes: tuple[str, ...]  # every class the table has maps for
    # link -> the source addresses the guard allows it
    sources: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]


class Ruleset:
    """The `inet larkns` table in the calling thread's network namespace."""

    def __init__(self, classes: Classes = ()) -> None:
        self.classes = classes
        # every counter a job set up by this process gets: key -> its map
        self.maps = {**COUNTER_MAPS, **class_maps(class_names(classes))}
        self._markers = [m for m, _c, _o in FEATURES]
        self._markers += [class_marker(name, nets) for name, nets in classes]
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

    def _maps(self, classes: Sequence[str] | None) -> dict[str, str]:
        """A job's counter keys and maps: those of `classes` (the job's, from
        its record), or by default those this process gives a new job."""
        if classes is None:
            return self.maps
        return {**COUNTER_MAPS, **class_maps(classes)}

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

    def serves_classes(self) -> bool:
        """Whether the table is as this process needs it: it has the guard
        and counts this process's classes as configured (all their markers
        are there).  One netlink round trip, whatever the number
        of jobs; False if the table is missing."""
        return len(self._nl.counters(TABLE, self._markers)) == len(self._markers)

    def update_classes(self) -> None:
        """Bring the table in line with this process's classes, in one
        transaction, declaring it if missing.

        Lists the whole table (slow with many jobs alive): only for when
        serves_classes() says no, and only with every other process that
        could do the same shut out (the caller holds the journal's exclusive
        lock), since two that add the same class at once would count it twice.
        """
        if not self.has_table():
            self.ensure_table()
            return
        table = self._listing()
        cmds = feature_update(table) + class_update(self.classes, table)
        if cmds:
            self._run(cmds)
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

    def add_job(
        self,
        job: str,
        link: str,
        masquerade: bool,
        inbound: Inbound | None = None,
        sources: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    ) -> None:
        """Counters and map entries of one job, in one transaction; with
        `inbound`, its forwarded ports.

        The table must serve this process's classes (serves_classes, or
        update_classes under the journal's exclusive lock); a table that is
        missing is declared with them.
        """
        key = nftnl.ifname_key(link)
        ops = [nftnl.add_counter(TABLE, counter_name(job, k)) for k in self.maps]
        ops += [
            nftnl.add_element(TABLE, m, key, counter_name(job, k)) for k, m in self.maps.items()
        ]
        ops.append(nftnl.add_element(TABLE, "job_links", key))
        if masquerade:
            ops.append(nftnl.add_element(TABLE, "masquerade_from", key))
        ops += [self._source(link, a, add=True) for a in sources]
        if inbound is not None:
            for port in inbound.ports:
                pk = nftnl.port_key(port)
                for m, addr in (("inbound4", inbound.ipv4), ("inbound6", inbound.ipv6)):
                    if addr is not None:
                        ops.append(nftnl.add_element(TABLE, m, pk, data=addr.packed))
        if not self._ready:
            self.ensure_table()
        try:
            self._nl.batch(ops)
        except NftnlError as e:
            if e.errno == errno.EEXIST:
                # A killed job of the same name left its objects (its record,
                # and so its name, is ours now): remove them, start at zero.
                self.remove_job(job, link, self.table_classes(), inbound=inbound, sources=sources)
            elif e.errno == errno.ENOENT:
                # The table went since our last look (the last job out
                # removed it, or someone flushed the ruleset).
                self.ensure_table()
            else:
                raise NftError(str(e)) from None
            try:
                self._nl.batch(ops)
            except NftnlError as e2:
                raise NftError(str(e2)) from None

    @staticmethod
    def _source(
        link: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, add: bool
    ) -> nftnl.Op:
        s = "job_src4" if addr.version == 4 else "job_src6"
        key = nftnl.concat_key(nftnl.ifname_key(link), addr.packed)
        return nftnl.add_element(TABLE, s, key) if add else nftnl.delete_element(TABLE, s, key)

    def allow(
        self, link: str, sources: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]
    ) -> None:
        """Let the job of `link` send from these addresses too (ones it took
        that could not be known in advance)."""
        if sources:
            self._nl.batch([self._source(link, a, add=True) for a in sources])

    def remove_job(
        self,
        job: str,
        link: str | None,
        classes: Sequence[str] | None = None,
        masquerade: bool = True,
        inbound: Inbound | None = None,
        sources: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    ) -> bool:
        """Remove everything of `job`, whose counters cover `classes` (by
        default: this process's); True if anything was there.

        One transaction in the common case; when part of it is already gone
        (a half-built or half-removed job), the kernel refuses the batch, so
        each object is then removed on its own.
        """
        maps = self._maps(classes)
        ops = []
        if inbound is not None:
            for port in inbound.ports:
                for m, addr in (("inbound4", inbound.ipv4), ("inbound6", inbound.ipv6)):
                    if addr is not None:
                        ops.append(nftnl.delete_element(TABLE, m, nftnl.port_key(port)))
        if link is not None:
            ops += [self._source(link, a, add=False) for a in sources]
            key = nftnl.ifname_key(link)
            # Map entries first: they hold references to the counters.
            ops += [nftnl.delete_element(TABLE, m, key) for m in maps.values()]
            sets = ("job_links", "masquerade_from") if masquerade else ("job_links",)
            ops += [nftnl.delete_element(TABLE, s, key) for s in sets]
        ops += [nftnl.delete_counter(TABLE, counter_name(job, k)) for k in maps]
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

    def counters(self, job: str, classes: Sequence[str] | None = None) -> dict[str, Count]:
        """The job's counters by key (out4, in6, cout-NAME, ...), for the job's
        `classes` (by default: this process's); missing ones read as zero."""
        maps = self._maps(classes)
        got = self._nl.counters(TABLE, [counter_name(job, k) for k in maps])
        out = {}
        for k in maps:
            packets, nbytes = got.get(counter_name(job, k), (0, 0))
            out[k] = Count(packets, nbytes)
        return out

    def has_job(self, job: str, classes: Sequence[str] | None = None) -> bool:
        """Whether all of the job's counters exist."""
        maps = self._maps(classes)
        got = self._nl.counters(TABLE, [counter_name(job, k) for k in maps])
        return len(got) == len(maps)

    def _listing(self) -> list[dict[str, Any]]:
        return self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])

    def table_classes(self) -> tuple[str, ...]:
        """Every class the table has maps for, whichever process added it:
        for a job whose record does not say which it has (lists the whole
        table: slow with many jobs alive)."""
        if not self.has_table():
            return ()
        return _classes_in(self._listing())

    def job_objects(self) -> TableJobs:
        """What jobs own in the table, for gc."""
        if not self.has_table():
            return TableJobs(set(), set(), (), {})
        table = self._listing()
        classes = _classes_in(table)
        jobs: set[str] = set()
        links: set[str] = set()
        sources: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        maps = set(self._maps(classes).values()) | {"job_links", "masquerade_from"}
        for obj in table:
            if "counter" in obj:
                name = obj["counter"]["name"]
                found = _COUNTER_NAME.fullmatch(name)
                if found:
                    jobs.add(found.group(1))
            body = obj.get("map") or obj.get("set") or {}
            if body.get("name") in maps:
                for e in body.get("elem", []):
                    links.add(e[0] if isinstance(e, list) else e)
            if body.get("name") in ("job_src4", "job_src6"):
                for e in body.get("elem", []):
                    parts = e.get("concat") if isinstance(e, dict) else None
                    if parts and len(parts) == 2:
                        link, addr = parts
                        links.add(link)
                        sources.setdefault(link, []).append(ipaddress.ip_address(addr))
        return TableJobs(jobs, links, classes, sources)


def as_family(cmds: Any, family: str) -> Any:
    """Commands for the inet table, made for the same-named table of another
    family (the bridge table counts classes with the same objects)."""
    if isinstance(cmds, dict):
        return {
            k: (family if k == "family" and v == FAMILY else as_family(v, family))
            for k, v in cmds.items()
        }
    if isinstance(cmds, list):
        return [as_family(c, family) for c in cmds]
    return cmds


def class_declaration(classes: Classes) -> list[dict[str, Any]]:
    return _class_declaration(classes)


def classes_in(table: list[dict[str, Any]]) -> tuple[str, ...]:
    return _classes_in(table)


def _classes_in(table: list[dict[str, Any]]) -> tuple[str, ...]:
    """The classes a listed table has maps for."""
    return tuple(
        sorted(
            o["map"]["name"][len("cout_") :]
            for o in table
            if "map" in o and o["map"]["name"].startswith("cout_")
        )
    )


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
