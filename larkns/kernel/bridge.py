"""larkns's `bridge larkns` table: accounting and the guard for bridge-mode jobs.

A bridge-mode job's veth is a port of a bridge on the site network: its
frames are switched, never routed, so the `inet larkns` table does not see
them.  This table does the same work at the bridge's hooks:

    table bridge larkns
      set ports            ifname                  every bridge-mode job's port
      set link_control     icmpv6_type             as in inet larkns
      map out4 out6 in4 in6 ctl_out ctl_in dropped  ifname : counter
      counter NAME-out4 ... NAME-drop               (per job, as in inet larkns)
      map guards           ifname : verdict        port -> jump g-NAME
      chain guard    hook prerouting priority -300:  iifname @ports jump link_layer;
                     iifname vmap @guards
      chain guard_in hook input priority -300:  iifname @ports jump link_layer
      chain link_layer  only untagged IPv4, IPv6 and ARP; nothing to
                     01:80:c2:00:00:0X (STP, pause, LLDP, 802.1X)
      chain g-NAME   (per job) what the job may send: its MAC; ARP and IPv4
                     from its address (or 0.0.0.0); IPv6 from its link-local,
                     its SLAAC addresses (or ::); neighbour advertisements
                     only for those; no router advertisements, redirects, DHCP
                     server replies
      chain spoofed: counter name iifname map @dropped; drop
      chain fence    hook forward  priority -300  nothing from one job's port
                     to another's (unicast counted as dropped)
      chain forward  hook forward  priority 300   count, both ends (link
                     control first, by scope, as in inet larkns)
      chain input    hook input    priority 300   (frames to the worker itself)
      chain output   hook output   priority 300   (frames from the worker)

Counters count L3 bytes, as in inet larkns (bridge hooks see the frame from
its network header on); ARP is not counted, IGMP with TTL 1 to a multicast
group counts as link control.
The per-job guard chain is made through libnftables: a job's allowed
addresses are constants in its rules (the ND target is checked as raw
payload, which no set type can hold in nftables 1.0.6).  That costs more
per job than the inet table's map elements, with many bridge-mode jobs
alive.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from larkns.kernel import nftnl
from larkns.kernel.nft import (
    ACCOUNT_PRIORITY,
    COUNTER_MAPS,
    LINK_CONTROL_ICMPV6,
    ROGUE_ICMPV6,
    ROGUE_UDP_SPORTS,
    Classes,
    NftError,
    _load,
    _parse,
    as_family,
    base_chain,
    class_declaration,
    class_maps,
    class_marker,
    class_names,
    class_rules,
    class_sets_in,
    class_update,
    classes_in,
    counter_name,
    link_control_rules,
)
from larkns.kernel.nftnl import Nftnl, NftnlError
from larkns.traffic import Count

FAMILY = "bridge"
TABLE = "larkns"
_T = {"family": FAMILY, "table": TABLE}
GUARD_PRIORITY = -300
# The link-layer guard, the fence between jobs and link control by scope are
# part of every table from this marker's version on; a table without them
# (made by an older larkns, its jobs still running) gets them in place.
LINK_LAYER_MARKER = "schema.l2"
_HALVES = {"forward": ("iifname", "oifname"), "input": ("iifname",), "output": ("oifname",)}


def guard_chain(job: str) -> str:
    return f"g-{job}"


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {**_T, "chain": chain, "expr": list(expr)}}


def _count_into(key: str, m: str) -> dict[str, Any]:
    return {"counter": {"map": {"key": _meta(key), "data": f"@{m}"}}}


def _set(values: Sequence[str]) -> Any:
    return values[0] if len(values) == 1 else {"set": list(values)}


def declaration() -> list[dict[str, Any]]:
    """The table without any job, as `add` commands."""

    objs: list[dict[str, Any]] = [
        {"table": {"family": FAMILY, "name": TABLE}},
        {"set": {**_T, "name": "ports", "type": "ifname"}},
        {"set": {**_T, "name": "link_control", "type": "icmpv6_type"}},
        {"element": {**_T, "name": "link_control", "elem": LINK_CONTROL_ICMPV6}},
        {"map": {**_T, "name": "guards", "type": "ifname", "map": "verdict"}},
    ]
    objs += [
        {"map": {**_T, "name": m, "type": "ifname", "map": "counter"}}
        for m in COUNTER_MAPS.values()
    ]
    objs += [
        {"chain": {**_T, "name": "spoofed"}},
        _rule("spoofed", _count_into("iifname", "dropped")),
        _rule("spoofed", {"drop": None}),
        base_chain(_T, "guard", "prerouting", GUARD_PRIORITY),
        base_chain(_T, "forward", "forward", ACCOUNT_PRIORITY),
        base_chain(_T, "input", "input", ACCOUNT_PRIORITY),
        base_chain(_T, "output", "output", ACCOUNT_PRIORITY),
    ]
    return [{"add": o} for o in objs] + _link_layer([]) + _guards()


def _guards() -> list[dict[str, Any]]:
    """The rule of the guard chain that sends each job's frames to its own
    guard chain (after _link_layer's)."""
    return [{"add": _rule("guard", {"vmap": {"key": _meta("iifname"), "data": "@guards"}})}]


def _counting(listing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The counting chains' rules, as `add` commands: link control first
    (IGMP too: a job on the site's L2 hears every multicast listener there),
    then each family, then the classes of a listed table (`listing`; empty
    when the table is being declared, whose classes come after)."""
    objs = link_control_rules(_T, "ports", igmp=True)
    for chain, keys in _HALVES.items():
        for proto, v in (("ip", "4"), ("ip6", "6")):
            for key in keys:
                m = ("out" if key == "iifname" else "in") + v
                objs.append(_rule(chain, _match(_meta("protocol"), proto), _count_into(key, m)))
    cmds = [{"add": o} for o in objs]
    for name, version in class_sets_in(listing):
        cmds += as_family([{"add": r} for r in class_rules(name, version)], FAMILY)
    return cmds


def _link_layer(listing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a job may send at the link layer, what it may not send to other
    jobs, and the counting rules, as commands; for a listed table made before
    them (`listing` not empty), added in place, in one transaction.

    From a job's port only untagged IPv4, IPv6 and ARP: a VLAN tag (even
    VLAN 0, a priority tag, which the site takes for untagged) would hide a
    frame's real type from every rule keyed on it; nor anything to the
    reserved link-local group 01:80:c2:00:00:0X (STP, pause, LLDP, 802.1X),
    which the bridge itself acts on.  Those frames skip the prerouting hook
    when the bridge keeps them, hence the same check at input.

    Between two jobs' ports, nothing: unicast is dropped and counted, what
    the bridge floods (broadcast, multicast) dropped quietly.  As in inet
    larkns, a policy that lets some jobs reach each other would go here.
    """
    from_job = _match(_meta("iifname"), "@ports")
    spoofed = {"jump": {"target": "spoofed"}}
    reserved = {"&": [_payload("ether", "daddr"), "ff:ff:ff:ff:ff:f0"]}
    group = {"&": [_payload("ether", "daddr"), "01:00:00:00:00:00"]}
    l2 = _rule("guard", from_job, {"jump": {"target": "link_layer"}})
    objs: list[dict[str, Any]] = [
        {"chain": {**_T, "name": "link_layer"}},
        _rule(
            "link_layer",
            _match(_payload("ether", "type"), {"set": ["ip", "ip6", "arp"]}, "!="),
            spoofed,
        ),
        _rule("link_layer", _match(reserved, "01:80:c2:00:00:00"), spoofed),
        base_chain(_T, "guard_in", "input", GUARD_PRIORITY),
        _rule("guard_in", from_job, {"jump": {"target": "link_layer"}}),
        base_chain(_T, "fence", "forward", GUARD_PRIORITY),
        _rule("fence", from_job, _match(_meta("oifname"), "@ports"),
              _match(group, "00:00:00:00:00:00"), spoofed),
        _rule("fence", from_job, _match(_meta("oifname"), "@ports"), {"drop": None}),
        {"counter": {**_T, "name": LINK_LAYER_MARKER}},
    ]  # fmt: skip
    if not listing:
        return [{"add": o} for o in [*objs, l2]] + _counting(listing)
    flush = [{"flush": {"chain": {**_T, "name": c}}} for c in _HALVES]
    # `insert`: at the head of the guard chain, before each job's own.
    return flush + [{"add": o} for o in objs] + [{"insert": l2}] + _counting(listing)


def guard_rules(
    job: str,
    mac: str,
    ipv4: ipaddress.IPv4Address | None,
    ipv6: Sequence[ipaddress.IPv6Address],
) -> list[dict[str, Any]]:
    """The rules of job `job`'s guard chain: anything else it sends is spoofed."""
    chain = guard_chain(job)
    spoofed = {"jump": {"target": "spoofed"}}
    v4 = ["0.0.0.0"] + ([str(ipv4)] if ipv4 else [])
    v6 = [str(a) for a in ipv6]
    # The ND target, at byte 8 of the ICMPv6 header, as a 128-bit integer.
    targets = [hex(int(a)) for a in ipv6]
    target = {"payload": {"base": "th", "offset": 64, "len": 128}}
    rules = [
        _rule(chain, _match(_payload("ether", "saddr"), mac, "!="), spoofed),
        _rule(chain, _match(_payload("arp", "saddr ether"), mac, "!="), spoofed),
        _rule(chain, _match(_payload("arp", "saddr ip"), _set(v4), "!="), spoofed),
        _rule(chain, _match(_payload("ip", "saddr"), _set(v4), "!="), spoofed),
        _rule(chain, _match(_payload("udp", "sport"), {"set": ROGUE_UDP_SPORTS}), spoofed),
        _rule(chain, _match(_payload("icmpv6", "type"), {"set": ROGUE_ICMPV6}), spoofed),
        _rule(chain, _match(_payload("ip6", "saddr"), _set(["::", *v6]), "!="), spoofed),
        _rule(
            chain,
            _match(_payload("icmpv6", "type"), "nd-neighbor-advert"),
            _match(target, _set(targets), "!="),
            spoofed,
        ),
    ]
    return rules


class BridgeRuleset:
    """The `bridge larkns` table in the calling thread's network namespace."""

    def __init__(self, classes: Classes = ()) -> None:
        # The admin's traffic classes, counted as in inet larkns (the same
        # sets, maps, rules and markers, in this table).
        self.classes = classes
        self._markers = [LINK_LAYER_MARKER]
        self._markers += [class_marker(name, nets) for name, nets in classes]
        self._nft = _load()
        self._nl = Nftnl(nftnl.NFPROTO_BRIDGE)

    def _maps(self, classes: Sequence[str] | None) -> dict[str, str]:
        names = class_names(self.classes) if classes is None else classes
        return {**COUNTER_MAPS, **class_maps(names)}

    def serves_classes(self) -> bool:
        """Whether the table is as this process needs it: it has the
        link-layer guard and counts this process's classes as configured."""
        try:
            found = self._nl.counters(TABLE, self._markers)
        except NftnlError:
            return False
        return len(found) == len(self._markers)

    def update_classes(self) -> None:
        """Bring the table in line with this process's classes (under the
        journal's exclusive lock, as for inet larkns)."""
        if not self.has_table():
            self.ensure_table()
            return
        listing = self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        cmds = []
        if not any(o.get("chain", {}).get("name") == "link_layer" for o in listing):
            cmds += _link_layer(listing)
        cmds += as_family(class_update(self.classes, as_family(listing, "inet")), FAMILY)
        if cmds:
            self._run(cmds)

    def close(self) -> None:
        self._nl.close()

    def _run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rc, out, err = self._nft.cmd(json.dumps({"nftables": commands}))
        if rc != 0:
            raise NftError(err.strip().splitlines()[0] if err.strip() else f"nft failed (rc {rc})")
        return _parse(out)

    def has_table(self) -> bool:
        rc, out, _err = self._nft.cmd(
            json.dumps({"nftables": [{"list": {"tables": {"family": FAMILY}}}]})
        )
        return rc == 0 and any(o.get("table", {}).get("name") == TABLE for o in _parse(out))

    def ensure_table(self) -> None:
        """Declare the table unless it is there (whole: one transaction)."""
        if self.has_table():
            return
        create = [{"create": {"table": {"family": FAMILY, "name": TABLE}}}]
        classes = as_family(class_declaration(self.classes), FAMILY)
        try:
            self._run(create + declaration()[1:] + classes)
        except NftError:
            if not self.has_table():
                raise

    def delete_table(self) -> bool:
        rc, _out, _err = self._nft.cmd(
            json.dumps({"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]})
        )
        return bool(rc == 0)

    def add_job(
        self,
        job: str,
        port: str,
        mac: str,
        ipv4: ipaddress.IPv4Address | None,
        ipv6: Sequence[ipaddress.IPv6Address],
    ) -> None:
        """The job's counters, map entries and guard chain, in one transaction."""
        self.ensure_table()
        chain = guard_chain(job)
        maps = self._maps(None)
        cmds: list[dict[str, Any]] = [
            {"add": {"counter": {**_T, "name": counter_name(job, k)}}} for k in maps
        ]
        cmds += [
            {"add": {"element": {**_T, "name": m, "elem": [[port, counter_name(job, k)]]}}}
            for k, m in maps.items()
        ]
        cmds.append({"add": {"chain": {**_T, "name": chain}}})
        cmds += [{"add": r} for r in guard_rules(job, mac, ipv4, ipv6)]
        verdict = {"jump": {"target": chain}}
        cmds.append({"add": {"element": {**_T, "name": "guards", "elem": [[port, verdict]]}}})
        cmds.append({"add": {"element": {**_T, "name": "ports", "elem": [port]}}})
        try:
            self._run(cmds)
        except NftError:
            # A killed job of the same name left its objects: start at zero.
            self.remove_job(job, port)
            self._run(cmds)

    def allow(
        self,
        job: str,
        mac: str,
        ipv4: ipaddress.IPv4Address | None,
        ipv6: Sequence[ipaddress.IPv6Address],
    ) -> None:
        """Replace what job `job` may send from (its SLAAC addresses came)."""
        chain = guard_chain(job)
        cmds: list[dict[str, Any]] = [{"flush": {"chain": {**_T, "name": chain}}}]
        cmds += [{"add": r} for r in guard_rules(job, mac, ipv4, ipv6)]
        self._run(cmds)

    def remove_job(self, job: str, port: str | None, classes: Sequence[str] | None = None) -> bool:
        """Remove everything of `job` (counted in `classes`: by default this
        process's); True if anything was there.  One transaction, or object
        by object when part of it is gone."""
        maps = self._maps(classes)
        cmds: list[dict[str, Any]] = []
        if port is not None:
            cmds.append({"delete": {"element": {**_T, "name": "guards", "elem": [port]}}})
            cmds.append({"delete": {"element": {**_T, "name": "ports", "elem": [port]}}})
            cmds += [
                {"delete": {"element": {**_T, "name": m, "elem": [port]}}} for m in maps.values()
            ]
        cmds.append({"delete": {"chain": {**_T, "name": guard_chain(job)}}})
        cmds += [{"delete": {"counter": {**_T, "name": counter_name(job, k)}}} for k in maps]
        try:
            self._run(cmds)
            return True
        except NftError:
            pass
        removed = False
        for c in cmds:
            with contextlib.suppress(NftError):
                self._run([c])
                removed = True
        return removed

    def has_job(self, job: str, classes: Sequence[str] | None = None) -> bool:
        """Whether all of the job's counters exist (here, not in inet larkns)."""
        maps = self._maps(classes)
        try:
            got = self._nl.counters(TABLE, [counter_name(job, k) for k in maps])
        except NftnlError:
            return False
        return len(got) == len(maps)

    def counters(self, job: str, classes: Sequence[str] | None = None) -> dict[str, Count]:
        maps = self._maps(classes)
        try:
            got = self._nl.counters(TABLE, [counter_name(job, k) for k in maps])
        except NftnlError:
            got = {}
        return {
            k: Count(*got.get(counter_name(job, k), (0, 0)))  # packets, bytes
            for k in maps
        }

    def table_classes(self) -> tuple[str, ...]:
        """Every class the table has maps for (for orphans, whose records
        are gone)."""
        if not self.has_table():
            return ()
        listing = self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        return classes_in(as_family(listing, "inet"))

    def jobs(self) -> set[str]:
        """Jobs with a guard chain here (for gc)."""
        if not self.has_table():
            return set()
        listing = self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        return {
            o["chain"]["name"][2:]
            for o in listing
            if "chain" in o and o["chain"]["name"].startswith("g-")
        }
