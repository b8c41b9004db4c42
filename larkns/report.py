"""The job report: JSON (a stable interface) and the human summary.

Keys are only ever added, never renamed.  Incoming/outgoing are from the job's
point of view; bytes are L3 (IP header + payload) as nftables counts them on
the host end of the job's veth.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import Any

from larkns.traffic import Count, Traffic

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Outcome:
    """How the command ended."""

    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None  # the command never ran (not found, not executable)

    @property
    def status(self) -> int:
        """larkns's own exit status for this outcome, as `docker run` and `timeout` use."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 125


def _pair(inc: Count, out: Count, attr: str) -> dict[str, int]:
    return {"incoming": getattr(inc, attr), "outgoing": getattr(out, attr)}


def _family(inc: Count, out: Count) -> dict[str, Any]:
    return {"bytes": _pair(inc, out, "bytes"), "packets": _pair(inc, out, "packets")}


def build(
    *,
    name: str,
    mode: str,
    netns: str,
    outcome: Outcome,
    duration_s: float,
    setup_s: float,
    slaac_s: float | None,
    ipv4: str | None,
    ipv6: list[str],
    traffic: Traffic,
    inbound_ports: tuple[int, int] | None = None,
    policy: str | None = None,
    bandwidth: tuple[int, int] | None = None,
    shaper_leaf: str | None = None,
    weight: float | None = None,
    uncounted_s: float = 0.0,
    clat: str | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "name": name,
        "mode": mode,
        "netns": netns,
        "exit_code": outcome.exit_code,
        "signal": outcome.signal,
        "signal_name": signal_name(outcome.signal) if outcome.signal else None,
        "error": outcome.error,
        "exit_status": outcome.status,
        "duration_s": round(duration_s, 6),
        "setup_s": round(setup_s, 6),
        "slaac_s": None if slaac_s is None else round(slaac_s, 6),
        "addresses": {"ipv4": ipv4, "ipv6": ipv6},
        # nat mode with LARKNS_INBOUND_PORTS: the worker's ports (TCP and UDP,
        # IPv4 and IPv6) that reach the job, at the same port numbers.
        "inbound_ports": None
        if inbound_ports is None
        else {"first": inbound_ports[0], "last": inbound_ports[1]},
        # The job's cap in bits/s of link-layer bytes (Ethernet headers
        # included, as HTB counts them; TCP payload gets ~95% of it), and the
        # queue discipline under it; null: not shaped.
        "bandwidth": None
        if bandwidth is None
        else {"down_bps": bandwidth[0], "up_bps": bandwidth[1], "leaf_qdisc": shaper_leaf},
        # The job's weight in the uplink's share (LARKNS_UPLINK_BANDWIDTH,
        # LARKNS_WEIGHT, --weight); null: the uplink is not shared.
        "weight": weight,
        **_family(traffic.incoming, traffic.outgoing),
        "families": {
            "ipv4": _family(traffic.ipv4_in, traffic.ipv4_out),
            "ipv6": _family(traffic.ipv6_in, traffic.ipv6_out),
        },
        # Admin-defined classes (LARKNS_CLASSES): the part of the totals that
        # went to or came from each class's prefixes.
        "classes": {n: _family(inc, out) for n, (inc, out) in traffic.classes.items()},
        # ND, RA/RS and MLD on the job's link: not the job's traffic, shown apart.
        "link_control": _family(traffic.control_in, traffic.control_out),
        # What the job sent that was dropped (a spoofed source address, a
        # router advertisement, a DHCP server reply): not in the totals.
        "dropped": {"packets": traffic.dropped.packets, "bytes": traffic.dropped.bytes},
        # The job's destination policy (LARKNS_POLICY, --policy), and what it
        # refused: not in the totals either.
        "policy": policy or "open",
        "refused": {"packets": traffic.refused.packets, "bytes": traffic.refused.bytes},
        # Seconds of traffic that may be missing from the counts: a flush of
        # the worker's ruleset took the job's counters, and they went on from
        # their last reading (at most a second before it).
        "uncounted_s": round(uncounted_s, 3),
        # The job's IPv4 through a CLAT (IPv6-only worker): its translator
        # ("bpf": in the kernel, "tayga": a process), and the packets the
        # kernel-side one dropped as untranslatable.  None: no CLAT.
        "clat": None
        if clat is None
        else {"translator": clat, "untranslated_packets": traffic.untranslated.packets},
    }


def signal_name(signum: int) -> str:
    """SIGTERM, ..., and SIGRTMIN+N for real-time signals, which have no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"


def write_json(report: dict[str, Any], fd: int) -> None:
    """Write the report to `fd`, a file opened (and truncated) before the job ran."""
    data = (json.dumps(report, indent=2) + "\n").encode()
    os.ftruncate(fd, 0)
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, view[offset:], offset)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def summary(report: dict[str, Any]) -> str:
    if report["error"]:
        how = report["error"]
    elif report["signal"] is not None:
        how = f"killed by {report['signal_name']}"
    else:
        how = f"exited with code {report['exit_code']}"
    lines = [
        f"larkns: job {report['name']} ({report['mode']}) {how} after {report['duration_s']:.2f} s"
    ]
    addrs = report["addresses"]
    shown = ([addrs["ipv4"]] if addrs["ipv4"] else []) + addrs["ipv6"]
    if report["mode"] != "none":
        lines.append(f"larkns:   addresses {', '.join(shown) or '(none)'}")
        for fam in ("ipv4", "ipv6"):
            f = report["families"][fam]
            lines.append(
                f"larkns:   {fam}  in {human_bytes(f['bytes']['incoming'])}"
                f" ({f['packets']['incoming']} pkts)"
                f"  out {human_bytes(f['bytes']['outgoing'])} ({f['packets']['outgoing']} pkts)"
            )
        ports = report["inbound_ports"]
        if ports:
            lines.append(
                f"larkns:   the worker's ports {ports['first']}-{ports['last']} (TCP, UDP) "
                "are forwarded to it"
            )
        cap = report.get("bandwidth")
        if cap:
            lines.append(
                f"larkns:   capped at {cap['down_bps'] / 1e6:g} Mbit/s down, "
                f"{cap['up_bps'] / 1e6:g} Mbit/s up (HTB, {cap['leaf_qdisc']} leaves)"
            )
        if report.get("weight") is not None:
            lines.append(f"larkns:   weight {report['weight']:g} in the uplink's share")
        clat = report.get("clat")
        if clat is not None:
            how = "in the kernel" if clat["translator"] == "bpf" else "by tayga"
            lost = clat["untranslated_packets"]
            lines.append(
                f"larkns:   IPv4 through a CLAT, translated {how}"
                + (f"; {lost} pkts could not be translated and were dropped" if lost else "")
            )
        dropped = report["dropped"]
        if dropped["packets"]:
            lines.append(
                f"larkns:   dropped {dropped['packets']} pkts the job may not send (from "
                "addresses not its own, as a router or DHCP server, or to another job "
                "or the worker's services)"
            )
        refused = report.get("refused") or {"packets": 0}
        if report.get("policy", "open") != "open" or refused["packets"]:
            lines.append(
                f"larkns:   destination policy {report.get('policy')}: refused "
                f"{refused['packets']} pkts"
            )
    else:
        lines.append("larkns:   no network (loopback only)")
    return "\n".join(lines)
