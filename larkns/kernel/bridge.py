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
      chain prerouting   hook prerouting  priority 300   what a job sends
                     (iifname: link control first, by scope, as in inet larkns)
      chain postrouting  hook postrouting priority 300   what a job receives
                     (oifname)

Each frame is counted once: where it enters the bridge from a job's port,
and where it leaves by one.  The bridge floods a broadcast or multicast
frame to every other port and to the worker itself; each copy passes the
forward (or input) hook, so counting there would bill a job's broadcast
once per port and once more for the worker.  Something the site floods to
several jobs reaches each of them, and is counted for each.  A frame the
fence stops between two jobs' ports was still sent: counted as sent, and
(unicast) as dropped.

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

import ipaddress
from collections.abc import Mapping, Sequence

from larkns.kernel import nftnl
from larkns.kernel.nft import LarknsTable, NftError, remove_all
from larkns.kernel.nftexpr import (
    ACCOUNT_PRIORITY,
    GUARD_PRIORITY,
    Cmd,
    Expr,
    Feature,
    Listing,
    Table,
    Tap,
    counter_name,
    counting_objects,
    counting_rules,
    jump,
    match,
    meta,
    one_or_set,
    payload,
    rogue,
    spoofed,
)
from larkns.traffic import Count

BRIDGE = Table(
    family="bridge",
    links="ports",
    taps=(
        # A frame from a job to the bridge's own MAC ends at the worker (the
        # bridge marks it PACKET_HOST before the prerouting hook).
        Tap("prerouting", "iifname", (match(meta("pkttype"), "host"),)),
        Tap("postrouting", "oifname", ()),
    ),
    # the frame's ethertype (the bridge family has no nfproto of IP)
    versions=(match(meta("protocol"), "ip"), match(meta("protocol"), "ip6")),
    # a job on the site's L2 hears every multicast listener there
    igmp=True,
)


def guard_chain(job: str) -> str:
    return f"g-{job}"


# The link-layer guard and the fence between jobs are part of every table
# from this marker's version on; a table without them (made by an older
# larkns, its jobs still running) gets them in place.
LINK_LAYER_MARKER = "schema.l2"


def _link_layer(_listing: Listing) -> list[Cmd]:
    """What a job may send at the link layer, and what it may not send to
    other jobs, as commands.

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
    t = BRIDGE
    from_job = match(meta("iifname"), "@ports")
    to_job = match(meta("oifname"), "@ports")
    to_spoofed = jump("spoofed")
    reserved = {"&": [payload("ether", "daddr"), "ff:ff:ff:ff:ff:f0"]}
    group = {"&": [payload("ether", "daddr"), "01:00:00:00:00:00"]}
    objs: list[Expr] = [
        t.chain("link_layer"),
        t.rule("link_layer",
               match(payload("ether", "type"), {"set": ["ip", "ip6", "arp"]}, "!="), to_spoofed),
        t.rule("link_layer", match(reserved, "01:80:c2:00:00:00"), to_spoofed),
        t.base_chain("guard_in", "input", GUARD_PRIORITY),
        t.rule("guard_in", from_job, jump("link_layer")),
        t.base_chain("fence", "forward", GUARD_PRIORITY),
        t.rule("fence", from_job, to_job, match(group, "00:00:00:00:00:00"), to_spoofed),
        t.rule("fence", from_job, to_job, {"drop": None}),
        t.counter(LINK_LAYER_MARKER),
    ]  # fmt: skip
    # At the head of the guard chain, before each job's own.
    return [{"add": o} for o in objs] + [{"insert": t.rule("guard", from_job, jump("link_layer"))}]


# Counting at prerouting and postrouting (each frame once) is part of every
# table from this marker's version on; tables made before it counted at
# forward, input and output, and get their counting moved in place.
COUNT_ONCE_MARKER = "schema.l2once"
_OLD_COUNTING = ("forward", "input", "output")


def _counting(listing: Listing) -> list[Cmd]:
    """The counting chains and their rules, as commands.  For a listed table
    that counted at forward, input and output, those chains go and the
    link-control chains are filled again, in the same transaction: a frame
    is counted by the old rules or by the new, and the counters keep their
    values."""
    t = BRIDGE
    chains = {o["chain"]["name"] for o in listing if "chain" in o}
    old = [c for c in _OLD_COUNTING if c in chains]
    cmds: list[Cmd] = [
        {"flush": t.chain(c)} for c in [*old, "control_out", "control_in"] if c in chains
    ]
    cmds += [{"delete": t.chain(c)} for c in old]
    objs = [
        t.base_chain("prerouting", "prerouting", ACCOUNT_PRIORITY),
        t.base_chain("postrouting", "postrouting", ACCOUNT_PRIORITY),
        t.counter(COUNT_ONCE_MARKER),
    ]
    return cmds + [{"add": o} for o in objs] + counting_rules(t, listing)


def guard_rules(
    job: str,
    mac: str,
    ipv4: ipaddress.IPv4Address | None,
    ipv6: Sequence[ipaddress.IPv6Address],
) -> list[Expr]:
    """The rules of job `job`'s guard chain: anything else it sends is spoofed."""
    t = BRIDGE
    chain = guard_chain(job)
    to_spoofed = jump("spoofed")
    v4 = ["0.0.0.0"] + ([str(ipv4)] if ipv4 else [])
    v6 = [str(a) for a in ipv6]
    # The ND target, at byte 8 of the ICMPv6 header, as a 128-bit integer.
    targets = [hex(int(a)) for a in ipv6]
    target = {"payload": {"base": "th", "offset": 64, "len": 128}}
    return [
        t.rule(chain, match(payload("ether", "saddr"), mac, "!="), to_spoofed),
        t.rule(chain, match(payload("arp", "saddr ether"), mac, "!="), to_spoofed),
        t.rule(chain, match(payload("arp", "saddr ip"), one_or_set(v4), "!="), to_spoofed),
        t.rule(chain, match(payload("ip", "saddr"), one_or_set(v4), "!="), to_spoofed),
        *(t.rule(chain, m, to_spoofed) for m in rogue()),
        t.rule(chain, match(payload("ip6", "saddr"), one_or_set(["::", *v6]), "!="), to_spoofed),
        t.rule(
            chain,
            match(payload("icmpv6", "type"), "nd-neighbor-advert"),
            match(target, one_or_set(targets), "!="),
            to_spoofed,
        ),
    ]


class BridgeRuleset(LarknsTable):
    """The `bridge larkns` table in the calling thread's network namespace.

    The admin's traffic classes are counted as in inet larkns (the same
    sets, maps, rules and markers, in this table)."""

    SPEC = BRIDGE
    FEATURES = (
        Feature(LINK_LAYER_MARKER, "link_layer", _link_layer),
        Feature(COUNT_ONCE_MARKER, "postrouting", _counting),
    )
    NFPROTO = nftnl.NFPROTO_BRIDGE

    def _objects(self) -> list[Expr]:
        t = BRIDGE
        return [
            t.set("ports", "ifname"),
            *counting_objects(t),
            t.map("guards", "ifname", "verdict"),
            *spoofed(t),
            t.base_chain("guard", "prerouting", GUARD_PRIORITY),
            # each job's frames to its own guard chain (after the link
            # layer's rule, which goes to the head)
            t.rule("guard", {"vmap": {"key": meta("iifname"), "data": "@guards"}}),
        ]

    def add_job(
        self,
        job: str,
        port: str,
        mac: str,
        ipv4: ipaddress.IPv4Address | None,
        ipv6: Sequence[ipaddress.IPv6Address],
        start: Mapping[str, Count] | None = None,
    ) -> None:
        """The job's counters (going on from `start`, put back after a
        flush), map entries and guard chain, in one transaction."""
        self.ensure_table()
        t = BRIDGE
        chain = guard_chain(job)
        begin = start or {}
        cmds: list[Cmd] = []
        for k in self.maps:
            counter = t.counter(counter_name(job, k))
            c = begin.get(k)
            if c is not None:
                counter["counter"] |= {"packets": c.packets, "bytes": c.bytes}
            cmds.append({"add": counter})
        cmds += [
            {"add": t.element(m, [[port, counter_name(job, k)]])} for k, m in self.maps.items()
        ]
        cmds.append({"add": t.chain(chain)})
        cmds += [{"add": r} for r in guard_rules(job, mac, ipv4, ipv6)]
        cmds.append({"add": t.element("guards", [[port, jump(chain)]])})
        cmds.append({"add": t.element("ports", [port])})
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
        cmds: list[Cmd] = [{"flush": BRIDGE.chain(guard_chain(job))}]
        cmds += [{"add": r} for r in guard_rules(job, mac, ipv4, ipv6)]
        self._run(cmds)

    def remove_job(self, job: str, port: str | None, classes: Sequence[str] | None = None) -> bool:
        """Remove everything of `job` (counted in `classes`: by default this
        process's); True if anything was there (remove_all)."""
        t = BRIDGE
        maps = self._maps(classes)
        cmds: list[Cmd] = []
        if port is not None:
            cmds += [{"delete": t.element(s, [port])} for s in ("guards", "ports")]
            cmds += [{"delete": t.element(m, [port])} for m in maps.values()]
        cmds.append({"delete": t.chain(guard_chain(job))})
        cmds += [{"delete": t.counter(counter_name(job, k))} for k in maps]
        return remove_all(cmds, self._run, NftError)

    def jobs(self) -> set[str]:
        """Jobs with a guard chain here (for gc)."""
        if not self.has_table():
            return set()
        return {
            o["chain"]["name"][2:]
            for o in self._listing()
            if "chain" in o and o["chain"]["name"].startswith("g-")
        }
