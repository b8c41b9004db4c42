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

What this table and `bridge larkns` (bridge.py) do alike is LarknsTable's;
the JSON both are made of is nftexpr.py's.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

from larkns.kernel import nftnl
from larkns.kernel.nftexpr import (
    ACCOUNT_PRIORITY,
    GUARD_PRIORITY,
    Classes,
    Cmd,
    Expr,
    Feature,
    Listing,
    Table,
    Tap,
    class_declaration,
    class_maps,
    class_marker,
    class_names,
    class_update,
    classes_in,
    count_into,
    counter_name,
    counting_objects,
    counting_rules,
    feature_update,
    goto,
    jump,
    match,
    meta,
    parse,
    payload,
    rogue,
    spoofed,
)

# The names bench/ knows them by.
from larkns.kernel.nftexpr import COUNTER_KEYS as COUNTER_KEYS
from larkns.kernel.nftexpr import COUNTER_MAPS as COUNTER_MAPS
from larkns.kernel.nftnl import Nftnl, NftnlError
from larkns.traffic import Count

if TYPE_CHECKING:
    from larkns.policy import Destinations, Policy


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


_Op = TypeVar("_Op")


def remove_all(ops: list[_Op], run: Callable[[list[_Op]], object], error: type[Exception]) -> bool:
    """Run removals `ops` as one transaction; when part of what they remove
    is gone already (a half-built or half-removed job), the kernel refuses
    the whole, so then each on its own.  True if anything was removed.

    A removal refused for any other reason than "already gone" is not
    passed over: an NftError names each, after the others were tried."""
    try:
        run(ops)
        return True
    except error:
        pass
    removed = False
    refused: list[str] = []
    for op in ops:
        try:
            run([op])
            removed = True
        except error as e:
            if not _gone(e):
                refused.append(str(e))
    if refused:
        raise NftError("; ".join(refused))
    return removed


def _gone(e: Exception) -> bool:
    """Whether a removal failed only because its object is not there: the
    kernel's ENOENT (nfnetlink), or libnftables' message for it."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno == errno.ENOENT
    return "No such file or directory" in str(e)


class LarknsTable:
    """One of larkns's tables in the calling thread's network namespace: what
    the inet and the bridge table do alike.

    A subclass names its table (SPEC), the objects it has without any job
    (_objects) and the parts added since its first version (FEATURES), and
    adds and removes jobs.  Here: declaring the table, bringing it in line
    with this process's traffic classes, and reading a job's counters.
    """

    SPEC: ClassVar[Table]
    FEATURES: ClassVar[tuple[Feature, ...]]
    NFPROTO: ClassVar[int]

    def __init__(self, classes: Classes = ()) -> None:
        self.classes = classes
        # every counter a job set up by this process gets: key -> its map
        self.maps = {**COUNTER_MAPS, **class_maps(class_names(classes))}
        self._markers = [f.marker for f in self.FEATURES]
        self._markers += [class_marker(name, nets) for name, nets in classes]
        self._nft_context: Any = None
        self._nl = Nftnl(self.NFPROTO)
        self._ready = False  # the table was there at our last look

    @property
    def _nft(self) -> Any:
        """libnftables, for declaring and listing the table: loaded at the
        first use (~1.5 ms), which a process that only looks whether the
        table exists never makes."""
        if self._nft_context is None:
            self._nft_context = _load()
        return self._nft_context

    def open(self) -> None:
        """Load libnftables now (NftError if it cannot be)."""
        _ = self._nft

    def exists(self) -> bool:
        """Whether the table is there (one netlink lookup)."""
        try:
            return self._nl.has_table(self.SPEC.name)
        except NftnlError as e:
            raise NftError(str(e)) from None

    def _objects(self) -> list[Expr]:
        """The table's objects before any feature, class or job."""
        raise NotImplementedError

    def close(self) -> None:
        self._nl.close()

    def _run(self, commands: list[Cmd]) -> Listing:
        rc, out, err = self._nft.cmd(json.dumps({"nftables": commands}))
        if rc != 0:
            raise NftError(err.strip().splitlines()[0] if err.strip() else f"nft failed (rc {rc})")
        return parse(out)

    def _listing(self) -> Listing:
        return self._run([self.SPEC.listing()])

    def _maps(self, classes: Sequence[str] | None, refused: bool = False) -> dict[str, str]:
        """A job's counter keys and maps: those of `classes` (the job's, from
        its record), or by default those this process gives a new job."""
        base = self.maps if classes is None else {**COUNTER_MAPS, **class_maps(classes)}
        # what a destination policy refused: only a job with a policy has one
        return {**base, "refused": "refused"} if refused else base

    def has_table(self) -> bool:
        # "list tables" costs the same with 1 or 500 jobs; listing the table
        # itself would return every job's objects.
        rc, out, _err = self._nft.cmd(
            json.dumps({"nftables": [{"list": {"tables": {"family": self.SPEC.family}}}]})
        )
        return rc == 0 and any(o.get("table", {}).get("name") == self.SPEC.name for o in parse(out))

    def delete_table(self) -> bool:
        self._ready = False
        rc, _out, _err = self._nft.cmd(json.dumps({"nftables": [{"delete": self.SPEC.table()}]}))
        return bool(rc == 0)

    def ensure_table(self) -> None:
        """Declare the table, unless present (whole or not at all: one transaction)."""
        if not self.has_table():
            # "create" fails if the table exists: two jobs starting at once on
            # an idle node must not both declare it (its rules would be there
            # twice, and count every packet twice).
            cmds = [{"create": self.SPEC.table()}, *({"add": o} for o in self._objects())]
            # The counting rules come with their feature; class rules after
            # them, as when a class is added to a live table.
            cmds += [c for f in self.FEATURES for c in f.commands([])]
            cmds += class_declaration(self.SPEC, self.classes)
            try:
                self._run(cmds)
            except NftError:
                if not self.has_table():
                    raise
        self._ready = True

    def serves_classes(self) -> bool:
        """Whether the table is as this process needs it: it has every
        feature and counts this process's classes as configured (all their
        markers are there).  One netlink round trip, whatever the number
        of jobs; False if the table is missing."""
        return len(self._nl.counters(self.SPEC.name, self._markers)) == len(self._markers)

    def update_classes(self) -> None:
        """Bring the table in line with this process's features and classes,
        in one transaction, declaring it if missing.

        Lists the whole table (slow with many jobs alive): only for when
        serves_classes() says no, and only with every other process that
        could do the same shut out (the caller holds the journal's exclusive
        lock), since two that add the same class at once would count it twice.
        """
        if not self.has_table():
            self.ensure_table()
            return
        listing = self._listing()
        cmds = feature_update(self.FEATURES, listing)
        cmds += class_update(self.SPEC, self.classes, listing)
        if cmds:
            self._run(cmds)
        self._ready = True

    def table_classes(self) -> tuple[str, ...]:
        """Every class the table has maps for, whichever process added it:
        for a job whose record does not say which it has (lists the whole
        table: slow with many jobs alive)."""
        if not self.has_table():
            return ()
        return classes_in(self._listing())

    def counters(
        self, job: str, classes: Sequence[str] | None = None, refused: bool = False
    ) -> dict[str, Count]:
        """The job's counters by key (out4, in6, cout-NAME, ...), for the job's
        `classes` (by default: this process's), and what its policy refused;
        missing ones read as zero."""
        maps = self._maps(classes, refused)
        got = self._nl.counters(self.SPEC.name, [counter_name(job, k) for k in maps])
        return {k: Count(*got.get(counter_name(job, k), (0, 0))) for k in maps}

    def has_job(
        self, job: str, classes: Sequence[str] | None = None, refused: bool = False
    ) -> bool:
        """Whether all of the job's counters exist."""
        maps = self._maps(classes, refused)
        got = self._nl.counters(self.SPEC.name, [counter_name(job, k) for k in maps])
        return len(got) == len(maps)


# -- inet larkns ------------------------------------------------------------

INET = Table(
    family="inet",
    links="job_links",
    taps=(
        # From the job, forwarded: it may go on beyond the worker.
        Tap("forward", "iifname", None),
        Tap("forward", "oifname", ()),
        Tap("input", "iifname", ()),
        Tap("output", "oifname", ()),
    ),
    versions=(match(meta("nfproto"), "ipv4"), match(meta("nfproto"), "ipv6")),
)
TABLE = INET.name
# NAME-out4, NAME-ctl-in, NAME-cout-Campus, ...: the job's name is group 1.
_COUNTER_NAME = re.compile(
    r"(.+)-(?:out4|out6|in4|in6|ctl-out|ctl-in|drop|refused|cout-\w+|cin-\w+)"
)


# The guard (chain guard, prerouting, before conntrack) is part of every
# table from this marker's version on; a table without it (made by an older
# larkns, its jobs still running) gets it added in place.
GUARD_MARKER = "schema.guard.src"


def _guard(_listing: Listing) -> list[Cmd]:
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
    t = INET
    from_job = match(meta("iifname"), "@job_links")
    to_spoofed = jump("spoofed")

    def src(proto: str) -> Expr:
        return {"concat": [meta("iifname"), payload(proto, "saddr")]}

    objs: list[Expr] = [
        t.map("dropped", "ifname", "counter"),
        t.set("job_src4", ["ifname", "ipv4_addr"]),
        t.set("job_src6", ["ifname", "ipv6_addr"]),
        t.base_chain("guard", "prerouting", GUARD_PRIORITY),
        *spoofed(t),
        *(t.rule("guard", from_job, m, to_spoofed) for m in rogue()),
        t.rule("guard", from_job, t.versions[0], match(src("ip"), "@job_src4", "!="), to_spoofed),
        t.rule(
            "guard",
            from_job,
            match(payload("ip6", "saddr"), "::", "!="),
            match(src("ip6"), "@job_src6", "!="),
            to_spoofed,
        ),
        t.counter(GUARD_MARKER),
    ]
    return [{"add": o} for o in objs]


INBOUND_MARKER = "schema.inbound"
INBOUND_PRIORITY = -100  # dstnat


def _inbound(_listing: Listing) -> list[Cmd]:
    """Forwarded ports (nat mode): a new TCP or UDP connection to one of the
    worker's own addresses, on a port of a job's range, goes to that job.
    The maps are keyed by port: each job adds its ports, nothing else."""
    t = INET
    dport = payload("th", "dport")
    local = match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    l4 = match(meta("l4proto"), {"set": ["tcp", "udp"]})
    objs: list[Expr] = [
        t.map("inbound4", "inet_service", "ipv4_addr"),
        t.map("inbound6", "inet_service", "ipv6_addr"),
        t.base_chain("prerouting", "prerouting", INBOUND_PRIORITY, "nat"),
    ]
    for fam, m, version in (("ip", "inbound4", t.versions[0]), ("ip6", "inbound6", t.versions[1])):
        dnat = {"dnat": {"family": fam, "addr": {"map": {"key": dport, "data": f"@{m}"}}}}
        objs.append(t.rule("prerouting", version, local, l4, dnat))
    objs.append(t.counter(INBOUND_MARKER))
    return [{"add": o} for o in objs]


LINK_CONTROL_MARKER = "schema.linkctl"


def _link_control(listing: Listing) -> list[Cmd]:
    """The counting chains' rules, link control first (see
    nftexpr.link_control_rules), as `add` commands.  For a listed table made
    before them (`listing` not empty), the chains are flushed and filled
    again, class rules included, in the same transaction: a packet sees the
    old rules or the new, and the counters keep their values."""
    cmds: list[Cmd] = []
    if listing:
        cmds += [{"flush": INET.chain(c)} for c in INET.chains()]
    cmds += counting_rules(INET, listing)
    cmds.append({"add": INET.counter(LINK_CONTROL_MARKER)})
    return cmds


FENCE_MARKER = "schema.fence"
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


def _fence(_listing: Listing) -> list[Cmd]:
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
    t = INET
    from_job = match(meta("iifname"), "@job_links")
    refuse = goto("refused")
    accept = {"accept": None}
    objs: list[Expr] = [
        # Refused at once (a TCP reset, or ICMP administratively
        # prohibited): the job's connect fails rather than waits.  Not a
        # reset to a link-local address: the kernel routes resets without
        # the interface such an address needs, and it leaves by another
        # link; ICMPv6 errors go back by the one the packet came in by.
        *refusal("refused", "dropped"),
        t.base_chain("fence", "forward", GUARD_PRIORITY),
        t.rule("fence", from_job, match(meta("oifname"), "@job_links"), refuse),
        t.chain("job_input"),
        t.base_chain("fence_in", "input", GUARD_PRIORITY),
        t.rule("fence_in", from_job, goto("job_input")),
        t.rule("job_input", match({"ct": {"key": "state"}}, {"set": ["established", "related"]}),
               accept),
        t.rule("job_input", match(payload("icmp", "type"), {"set": JOB_INPUT_ICMP}), accept),
        t.rule("job_input", match(payload("icmpv6", "type"), {"set": JOB_INPUT_ICMPV6}), accept),
        t.rule("job_input", match(meta("l4proto"), "igmp"), accept),
        t.rule("job_input", match(meta("pkttype"), "host"), refuse),
        t.rule("job_input", {"drop": None}),
        t.counter(FENCE_MARKER),
    ]  # fmt: skip
    return [{"add": o} for o in objs]


def refusal(chain: str, counters: str) -> list[Expr]:
    """Chain `chain`: count into the job's counter of map `counters`, and
    refuse at once (a TCP reset, or ICMP administratively prohibited): the
    job's connect fails rather than waits.  Not a reset to a link-local
    address: the kernel routes resets without the interface such an address
    needs, and it leaves by another link; ICMPv6 errors go back by the one
    the packet came in by."""
    t = INET
    tcp = match(meta("l4proto"), "tcp")
    return [
        t.chain(chain),
        t.rule(chain, count_into("iifname", counters)),
        t.rule(chain, tcp, t.versions[0], {"reject": {"type": "tcp reset"}}),
        t.rule(
            chain,
            tcp,
            match(payload("ip6", "daddr"), {"prefix": {"addr": "fe80::", "len": 10}}, "!="),
            {"reject": {"type": "tcp reset"}},
        ),
        t.rule(chain, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
    ]


POLICY_MARKER = "schema.policy"
# After the fence (jobs to jobs), before conntrack's own hooks matter: a
# policy is looked at for every packet a job sends beyond the worker.
POLICY_PRIORITY = GUARD_PRIORITY + 50
POLICY_PREFIX = "policy."


def _policy(_listing: Listing) -> list[Cmd]:
    """Destination policies (larkns/policy.py): a job with one has an
    element in map `policies` that jumps to its policy's chain, and a
    counter of what the policy refused.  A job without one (open) has
    neither, and its packets one failed lookup."""
    t = INET
    objs: list[Expr] = [
        t.map("policies", "ifname", "verdict"),
        t.map("refused", "ifname", "counter"),
        *refusal("policy_refused", "refused"),
        t.base_chain("policy", "forward", POLICY_PRIORITY),
        t.rule("policy", {"vmap": {"key": meta("iifname"), "data": "@policies"}}),
        t.counter(POLICY_MARKER),
    ]
    return [{"add": o} for o in objs]


def policy_chain(fingerprint: str) -> str:
    return f"pol_{fingerprint}"


def policy_objects(
    fingerprint: str,
    policy: Policy,
    sets: dict[str, Destinations],
    internal: Sequence[tuple[str, Sequence[int]]],
) -> list[Cmd]:
    """A policy's chain, the destination sets it names, and its marker:
    `create` for what must not be there yet (two processes adding the same
    policy at once: the second fails, and finds it made)."""
    t = INET
    chain = policy_chain(fingerprint)
    cmds: list[Cmd] = []

    def matches(d: Destinations) -> list[tuple[list[Expr], Expr]]:
        """Per IP version of `d`: its set's declaration, and the matches."""
        out = []
        for version, proto, kind in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
            nets = [n for n in d.nets if n.version == version]
            if not nets:
                continue
            name = f"dst_{d.name}_{_digest(d.text())[:8]}_{version}"
            cmds.append({"add": t.set(name, kind, ["interval"])})
            elems = [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in nets]
            cmds.append({"add": t.element(name, elems)})
            m = [match(payload(proto, "daddr"), f"@{name}")]
            if d.protocol is not None:
                m.append(match(meta("l4proto"), d.protocol))
                if d.ports is not None:
                    lo, hi = d.ports
                    ports: Any = lo if lo == hi else {"range": [lo, hi]}
                    m.append(match(payload("th", "dport"), ports))
            out.append((m, t.versions[0] if version == 4 else t.versions[1]))
        return out

    rules: list[Expr] = [
        t.rule(
            chain,
            match({"ct": {"key": "state"}}, {"set": ["established", "related"]}),
            {"accept": None},
        )
    ]
    for name in policy.deny:
        for m, is_version in matches(sets[name]):
            rules.append(t.rule(chain, is_version, *m, goto("policy_refused")))
    for name in policy.allow:
        for m, is_version in matches(sets[name]):
            rules.append(t.rule(chain, is_version, *m, {"accept": None}))
    if policy.base == "internal-only":
        for cls, versions in internal:
            for version in versions:
                proto = "ip" if version == 4 else "ip6"
                rules.append(
                    t.rule(chain, match(payload(proto, "daddr"), f"@cls_{cls}_{version}"),
                           {"accept": None})
                )  # fmt: skip
    if policy.base != "open":
        rules.append(t.rule(chain, goto("policy_refused")))
    cmds.append({"create": t.chain(chain)})
    cmds += [{"add": r} for r in rules]
    cmds.append({"create": t.counter(POLICY_PREFIX + fingerprint)})
    return cmds


def policy_fingerprint(
    policy: Policy, sets: dict[str, Destinations], internal: Sequence[str]
) -> str:
    """What a policy's chain is named after: its text, the sets it names as
    they are defined, the internal classes; anything else is another chain."""
    named = [sets[n].text() for n in (*policy.deny, *policy.allow)]
    return _digest("|".join([policy.text(), *named, *internal]))[:12]


def _digest(text: str) -> str:
    import hashlib  # only for policies and classes: OpenSSL's _hashlib costs ~2.5 ms

    return hashlib.sha256(text.encode()).hexdigest()


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


class Ruleset(LarknsTable):
    """The `inet larkns` table in the calling thread's network namespace."""

    SPEC = INET
    FEATURES = (
        Feature(GUARD_MARKER, "guard", _guard),
        Feature(INBOUND_MARKER, "prerouting", _inbound),
        Feature(LINK_CONTROL_MARKER, "control_out", _link_control),
        Feature(FENCE_MARKER, "fence", _fence),
        Feature(POLICY_MARKER, "policy", _policy),
    )
    NFPROTO = nftnl.NFPROTO_INET

    def _objects(self) -> list[Expr]:
        t = INET
        return [
            *counting_objects(t),
            t.set("job_links", "ifname"),
            t.set("masquerade_from", "ifname"),
            t.base_chain("forward", "forward", ACCOUNT_PRIORITY),
            t.base_chain("input", "input", ACCOUNT_PRIORITY),
            t.base_chain("output", "output", ACCOUNT_PRIORITY),
            t.base_chain("postrouting", "postrouting", 100, "nat"),
            t.rule(
                "postrouting",
                match(meta("iifname"), "@masquerade_from"),
                match(meta("oifname"), "@job_links", "!="),
                {"masquerade": None},
            ),
        ]

    def add_job(
        self,
        job: str,
        link: str,
        masquerade: bool,
        inbound: Inbound | None = None,
        sources: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        policy: str | None = None,
        start: Mapping[str, Count] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        """Counters and map entries of one job, in one transaction; with
        `inbound`, its forwarded ports; with `policy` (a fingerprint, whose
        chain add_policy made), its destination policy; with `start`, the
        counters go on from those values (put back after a flush).

        The table must serve this process's classes (serves_classes, or
        update_classes under the journal's exclusive lock); a table that is
        missing is declared with them.
        """
        key = nftnl.ifname_key(link)
        maps = self._maps(classes, refused=policy is not None)
        begin = start or {}
        ops = []
        for k in maps:
            c = begin.get(k, Count())
            ops.append(nftnl.add_counter(TABLE, counter_name(job, k), c.packets, c.bytes))
        ops += [nftnl.add_element(TABLE, m, key, counter_name(job, k)) for k, m in maps.items()]
        if policy is not None:
            ops.append(nftnl.add_element(TABLE, "policies", key, jump=policy_chain(policy)))
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
                self.remove_job(
                    job,
                    link,
                    self.table_classes(),
                    inbound=inbound,
                    sources=sources,
                    policy=policy is not None,
                )
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

    def has_policy(self, fingerprint: str) -> bool:
        """Whether the chain of the policy with this fingerprint is in the
        table (its marker: one netlink round trip)."""
        name = POLICY_PREFIX + fingerprint
        return name in self._nl.counters(TABLE, [name])

    def add_policy(
        self,
        fingerprint: str,
        policy: Policy,
        sets: dict[str, Destinations],
        internal: Sequence[tuple[str, Sequence[int]]],
    ) -> None:
        """Add a policy's chain and sets (under the journal's exclusive lock,
        with the table serving this process's classes, whose sets an
        internal-only policy uses)."""
        if not self._ready:
            self.ensure_table()
        self._run(policy_objects(fingerprint, policy, sets, internal))

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
        policy: bool = False,
    ) -> bool:
        """Remove everything of `job`, whose counters cover `classes` (by
        default: this process's), and its policy's entry and counter if it
        has one; True if anything was there (remove_all)."""
        maps = self._maps(classes, refused=policy)
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
            if policy:
                ops.append(nftnl.delete_element(TABLE, "policies", key))
        ops += [nftnl.delete_counter(TABLE, counter_name(job, k)) for k in maps]
        return remove_all(ops, self._nl.batch, NftnlError)

    def job_objects(self) -> TableJobs:
        """What jobs own in the table, for gc."""
        if not self.has_table():
            return TableJobs(set(), set(), (), {})
        listing = self._listing()
        classes = classes_in(listing)
        jobs: set[str] = set()
        links: set[str] = set()
        sources: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        maps = set(self._maps(classes, refused=True).values())
        maps |= {"job_links", "masquerade_from", "policies"}
        for obj in listing:
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
