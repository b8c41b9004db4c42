"""Destination policies: where a job may send.

A policy is a base and terms that name the site's destination sets
(LARKNS_DESTINATIONS):

    open                    anything (the default: no rule, no cost)
    internal-only           only the prefixes of LARKNS_INTERNAL_CLASSES
    closed                  nothing beyond the job's link
    ... +SET                also SET's destinations
    ... -SET                never SET's destinations (before any +SET)

e.g. "open -license" (all but the license server), "internal-only +license".
A site chooses a job's policy with LARKNS_POLICY, a policy or a ClassAd
expression over the job ad that gives one (per owner, per accounting
group).  What a policy refuses is refused at once (a TCP reset, ICMP
administratively prohibited), and counted.  Replies within connections
the job did not start (its forwarded ports) are let through.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from larkns.config import ConfigError, named_parts

BASES = ("open", "internal-only", "closed")
PROTOCOLS = ("tcp", "udp")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Destinations:
    """A named set of destinations: prefixes, and optionally one protocol
    and a range of its ports."""

    name: str
    nets: tuple[Net, ...]
    protocol: str | None = None
    ports: tuple[int, int] | None = None

    def text(self) -> str:
        out = ", ".join(str(n) for n in self.nets)
        if self.protocol:
            out += f" {self.protocol}"
        if self.ports:
            first, last = self.ports
            out += f" {first}" if first == last else f" {first}-{last}"
        return f"{self.name} = {out}"


@dataclass(frozen=True)
class Policy:
    base: str = "open"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @property
    def unrestricted(self) -> bool:
        """Open with no terms: nothing to apply."""
        return self.base == "open" and not self.allow and not self.deny

    def text(self) -> str:
        return " ".join([self.base, *(f"-{d}" for d in self.deny), *(f"+{a}" for a in self.allow)])


OPEN = Policy()
_TERM = re.compile(r"([+-])([A-Za-z][A-Za-z0-9]{0,15})")


def parse(text: str, what: str) -> Policy:
    """A policy's text; ConfigError naming `what` (a knob, a flag) if it
    does not parse.  Set names are checked against the site's sets by
    check()."""
    words = text.strip().strip('"').split()
    if not words or words[0].lower() not in BASES:
        raise ConfigError(
            f"{what}: expected a policy ({', '.join(BASES)}, then +SET or -SET terms), got {text!r}"
        )
    allow: list[str] = []
    deny: list[str] = []
    for word in words[1:]:
        m = _TERM.fullmatch(word)
        if m is None:
            raise ConfigError(f"{what}: {word!r} is not +SET or -SET (a set's name)")
        sign, name = m.groups()
        (allow if sign == "+" else deny).append(name)
    both = set(allow) & set(deny)
    if both:
        raise ConfigError(f"{what}: {', '.join(sorted(both))} both allowed and denied")
    return Policy(words[0].lower(), tuple(dict.fromkeys(allow)), tuple(dict.fromkeys(deny)))


def check(
    policy: Policy,
    what: str,
    destinations: tuple[Destinations, ...],
    internal: tuple[str, ...],
) -> None:
    """Refuse a policy whose sets the site does not define, or that is
    internal-only on a site that says nothing is internal."""
    known = {d.name for d in destinations}
    unknown = [n for n in (*policy.deny, *policy.allow) if n not in known]
    if unknown:
        raise ConfigError(
            f"{what}: no destination set {', '.join(unknown)} in LARKNS_DESTINATIONS "
            f"(defined: {', '.join(sorted(known)) or 'none'})"
        )
    if policy.base == "internal-only" and not internal:
        raise ConfigError(
            f"{what}: internal-only needs LARKNS_INTERNAL_CLASSES (which of "
            "LARKNS_CLASSES are the site's own)"
        )


def parse_destinations(knob: str, raw: str) -> tuple[Destinations, ...]:
    """ "license = 198.18.5.10/32, 2001:db8:5::10/128 tcp 27000-27010; dns = 198.18.0.53 udp 53" """
    out: list[Destinations] = []
    for name, rest in named_parts(knob, raw, "PREFIX, ... [tcp|udp [PORT[-PORT]]]"):
        words = rest.replace(",", " ").split()
        protocol: str | None = None
        ports: tuple[int, int] | None = None
        for i, w in enumerate(words):
            if w.lower() in PROTOCOLS:
                protocol = w.lower()
                tail = words[i + 1 :]
                words = words[:i]
                if len(tail) > 1:
                    raise ConfigError(f"{knob}: set {name}: one port range after {w}")
                if tail:
                    ports = _ports(knob, name, tail[0])
                break
        if not words:
            raise ConfigError(f"{knob}: set {name}: no prefix")
        nets: list[Net] = []
        for text in words:
            try:
                nets.append(ipaddress.ip_network(text, strict=True))
            except ValueError as e:
                raise ConfigError(f"{knob}: set {name}: {text!r} is not a prefix ({e})") from None
        if name in (d.name for d in out):
            raise ConfigError(f"{knob}: set {name} is defined twice")
        out.append(Destinations(name, tuple(nets), protocol, ports))
    return tuple(out)


def _ports(knob: str, name: str, text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ConfigError(f"{knob}: set {name}: {text!r} is not PORT or PORT-PORT") from None
    if not 1 <= lo <= hi <= 65535:
        raise ConfigError(f"{knob}: set {name}: ports {text!r} are not within 1-65535")
    return (lo, hi)
