"""Byte and packet counts of a job, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Count:
    packets: int = 0
    bytes: int = 0

    def __add__(self, other: Count) -> Count:
        return Count(self.packets + other.packets, self.bytes + other.bytes)


@dataclass(frozen=True)
class Traffic:
    """A job's counters, from the job's point of view (in = received)."""

    ipv4_in: Count = field(default_factory=Count)
    ipv4_out: Count = field(default_factory=Count)
    ipv6_in: Count = field(default_factory=Count)
    ipv6_out: Count = field(default_factory=Count)
    # ND, RA/RS and MLD on the job's link: not the job's own traffic.
    control_in: Count = field(default_factory=Count)
    control_out: Count = field(default_factory=Count)
    # What the job sent that larkns dropped: spoofed source addresses, router
    # advertisements, DHCP server replies.  Not in the totals.
    dropped: Count = field(default_factory=Count)
    # What the job's destination policy refused (larkns/policy.py).  Not in
    # the totals either.
    refused: Count = field(default_factory=Count)
    # Packets the job's kernel-side CLAT dropped as untranslatable (IPv4
    # options, ICMP errors from the job, IPv6 to its CLAT address from
    # outside the NAT64 prefix, ...): packets only, not in the totals.
    untranslated: Count = field(default_factory=Count)
    # class name -> (incoming, outgoing), for the admin's traffic classes
    classes: dict[str, tuple[Count, Count]] = field(default_factory=dict)

    @property
    def incoming(self) -> Count:
        return self.ipv4_in + self.ipv6_in

    @property
    def outgoing(self) -> Count:
        return self.ipv4_out + self.ipv6_out
