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
      chain guard    hook prerouting priority -300:  iifname vmap @guards
      chain g-NAME   (per job) what the job may send: its MAC; ARP and IPv4
                     from its address (or 0.0.0.0); IPv6 from its link-local,
                     its SLAAC addresses (or ::); neighbour advertisements
                     only for those; no router advertisements, redirects, DHCP
                     server replies
      chain spoofed: counter name iifname map @dropped; drop
      chain forward  hook forward  priority 300   count, both ends
      chain input    hook input    priority 300   (frames to the worker itself)
      chain output   hook output   priority 300   (frames from the worker)

Counters count L3 bytes, as in inet larkns (bridge hooks see the frame from
its network header on); ARP is not counted, IGMP counts as link control.
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
    class_update,
    classes_in,
    counter_name,
)
from larkns.kernel.nftnl import Nftnl, NftnlError
from larkns.traffic import Count

FAMILY = "bridge"
TABLE = "larkns"
_T = {"family": FAMILY, "table": TABLE}
GUARD_PRIORITY = -300
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
        _rule("guard", {"vmap": {"key": _meta("iifname"), "data": "@guards"}}),
        base_chain(_T, "forward", "forward", ACCOUNT_PRIORITY),
        base_chain(_T, "input", "input", ACCOUNT_PRIORITY),
        base_chain(_T, "output", "output", ACCOUNT_PRIORITY),
    ]
    # Link control: ND, RA/RS and MLD as in inet larkns, and IGMP, which a
    # job on the site's L2 hears from every multicast listener there.
    ctl6 = _match(_payload("icmpv6", "type"), "@link_control")
    igmp = _match(_payload("ip", "protocol"), "igmp")
    for chain, keys in _HALVES.items():
        for ctl in (ctl6, igmp):
            for key in keys:
                m = "ctl_out" if key == "iifname" else "ctl_in"
                objs.append(_rule(chain, ctl, _count_into(key, m)))
            objs.append(_rule(chain, ctl, {"return": None}))
        for proto, v in (("ip", "4"), ("ip6", "6")):
            for key in keys:
                m = ("out" if key == "iifname" else "in") + v
                objs.append(_rule(chain, _match(_meta("protocol"), proto), _count_into(key, m)))
    return [{"add": o} for o in objs]


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
        self._markers = [class_marker(name, nets) for name, nets in classes]
        self._nft = _load()
        self._nl = Nftnl(nftnl.NFPROTO_BRIDGE)

    def _maps(self, classes: Sequence[str] | None) -> dict[str, str]:
        names = class_names(self.classes) if classes is None else classes
        return {**COUNTER_MAPS, **class_maps(names)}

    def serves_classes(self) -> bool:
        """Whether the table counts this process's classes as configured."""
        if not self._markers:
            return True
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
        cmds = class_update(self.classes, as_family(listing, "inet"))
        if cmds:
            self._run(as_family(cmds, FAMILY))

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
