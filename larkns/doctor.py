"""`larkns doctor`: which kernel features larkns can use on this host.

Every probe runs inside a throwaway network namespace of its own, so the
doctor never changes the host's network.  Production kernels (EL8/EL9) have
more than small VMs (fq, fq_codel, police): probe, never assume.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from larkns.config import Settings
from larkns.kernel import links, netns, sysctl

QDISCS = ("htb", "tbf", "ingress", "fq", "fq_codel", "sfq", "cake", "prio", "netem")


@dataclass(frozen=True)
class Finding:
    what: str
    ok: bool
    detail: str = ""
    needed: bool = True  # False: optional, larkns works without it


def _probe(what: str, fn: Callable[[], str], needed: bool = True) -> Finding:
    try:
        return Finding(what, True, fn(), needed)
    except Exception as e:
        return Finding(what, False, str(e).splitlines()[0] if str(e) else type(e).__name__, needed)


def _nft_probe() -> str:
    from larkns.kernel.nft import Ruleset

    r = Ruleset()
    r.ensure_table()
    r.add_job("doctor", "lk-doctor", masquerade=True)
    r.counters("doctor")
    r.remove_job("doctor", "lk-doctor")
    r.delete_table()
    return "inet table, counter maps, named counters, masquerade, nfnetlink batches"


def findings() -> list[Finding]:
    out: list[Finding] = []
    out.append(
        Finding("root", os.geteuid() == 0, "" if os.geteuid() == 0 else "run as root to probe")
    )
    if os.geteuid() != 0:
        return out
    from larkns import core

    out.append(_probe("C core (clone3, pidfd, setns)", lambda: _core_probe(core)))
    # Not under larkns's own netns prefix: a gc running meanwhile would take it for an orphan.
    name = f"lkdoctor-{secrets.token_hex(3)}"
    try:
        netns.create(name)
    except Exception as e:
        out.append(Finding("network namespaces", False, str(e)))
        return out
    out.append(Finding("network namespaces", True, "unshare + bind mount under /run/netns"))
    try:
        with netns.entered(name):
            out.extend(_inside())
    finally:
        netns.delete(name)
    out.append(_probe("shaping (per-job caps)", _shaping_probe, needed=False))
    out.append(_probe("the uplink shared by weight", _share_probe, needed=False))
    fwd4 = sysctl.read("ipv4/ip_forward") == "1"
    fwd6 = sysctl.read("ipv6/conf/all/forwarding") == "1"
    out.append(
        Finding(
            "forwarding on this host",
            True,
            f"ipv4 {'on' if fwd4 else 'off (larkns turns it on)'}, "
            f"ipv6 {'on' if fwd6 else 'off (larkns turns it on, keeping SLAAC with accept_ra=2)'}",
            needed=False,
        )
    )
    out.append(_probe("kernel tables shared by all jobs", _shared_tables, needed=False))
    return out


def _shared_tables() -> str:
    """What the kernel sizes for all namespaces at once, which larkns reads
    and never changes: the neighbour tables' cap on dynamic entries (larkns
    pins each job's neighbours as permanent entries, exempt from it; a job
    adds only multicast entries, which the kernel reclaims when full) and
    the conntrack table (every flow of every nat job takes an entry)."""
    parts = []
    for family in ("ipv4", "ipv6"):
        try:
            cap = sysctl.read(f"{family}/neigh/default/gc_thresh3")
            parts.append(f"{family} neighbours gc_thresh3 {cap}")
        except OSError:
            parts.append(f"{family} neighbours gc_thresh3 not visible here (host namespace only)")
    try:
        parts.append(f"conntrack max {sysctl.read('netfilter/nf_conntrack_max')} flows")
    except OSError:
        parts.append("conntrack not loaded")
    return "; ".join(parts)


def _shaping_probe() -> str:
    from larkns.kernel import tc

    have = tc.probe(("htb", "tbf", "fq_codel", "sfq", "fq"))
    with netns.throwaway():
        ifb = _probe("ifb", lambda: _ifb_rtnl()).ok
    listed = ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in [*have.items(), ("ifb", ifb)])
    if not (have["htb"] and ifb):
        raise RuntimeError(f"jobs cannot be capped (needs htb and ifb): {listed}")
    return f"HTB with {tc.leaf()} leaves, upload through an IFB ({listed})"


def _share_probe() -> str:
    """The whole of the uplink's share (clsact, eBPF classifiers, HTB on
    IFBs), made and removed in a throwaway namespace, an IFB its uplink."""
    from larkns.kernel import links, uplink
    from larkns.kernel.rtnl import Rtnl

    with netns.throwaway(), Rtnl() as r:
        links.create_ifb(r, "lkd-uplink", 0)
        uplink.ensure(r, "lkd-uplink", (10**8, 10**8))
        uplink.remove(r, "lkd-uplink")
    return "clsact, cls_bpf and HTB on IFBs work (set LARKNS_UPLINK_BANDWIDTH to use it)"


def _ifb_rtnl() -> str:
    from larkns.kernel import links
    from larkns.kernel.rtnl import Rtnl

    with Rtnl() as r:
        links.create_ifb(r, "lkd-ifb", 0)
    return "works"


def _core_probe(core: object) -> str:
    import select

    from larkns import core as c

    pid, pidfd = c.spawn(c.SpawnSpec(path="/bin/true", argv=["true"], env={}))
    try:
        select.select([pidfd], [], [], 5)
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    finally:
        os.close(pidfd)
    return f"spawned pid {pid} through clone3 with a pidfd"


def _inside() -> list[Finding]:
    from pyroute2 import IPRoute

    out: list[Finding] = []
    with IPRoute() as ipr:
        ok = _probe("veth", lambda: _veth(ipr))
        out.append(ok)
        out.append(_probe("nftables", _nft_probe))
        out.append(
            _probe(
                "IPv6",
                lambda: "enabled" if os.path.exists("/proc/sys/net/ipv6") else _raise("disabled"),
            )
        )
        if not ok.ok:
            return out
        idx = ipr.link_lookup(ifname="lkd0")[0]
        for q in QDISCS:
            out.append(_probe(f"qdisc {q}", functools.partial(_qdisc, ipr, idx, q), needed=False))
        out.append(_probe("ifb (upload shaping)", lambda: _ifb(ipr), needed=False))
        with contextlib.suppress(Exception):
            ipr.link("del", index=idx)
    return out


def _raise(msg: str) -> str:
    raise RuntimeError(msg)


def _veth(ipr: object) -> str:
    from pyroute2 import IPRoute

    assert isinstance(ipr, IPRoute)
    ipr.link("add", ifname="lkd0", kind="veth", peer="lkd1")
    return "veth pairs"


_QDISC_ARGS = {
    "htb": ["default", "10"],
    "tbf": ["rate", "10mbit", "burst", "32k", "latency", "50ms"],
    "netem": ["delay", "1ms"],
}


def _qdisc(ipr: object, idx: int, kind: str) -> str:
    # tc(8) rather than pyroute2: its per-qdisc option handling differs from
    # kernel to kernel, and tc's own error says what is missing.
    dev = "lkd0"
    if kind == "ingress":
        add = ["tc", "qdisc", "add", "dev", dev, "ingress"]
        delete = ["tc", "qdisc", "del", "dev", dev, "ingress"]
    else:
        add = [
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "handle",
            "1:",
            kind,
            *_QDISC_ARGS.get(kind, []),
        ]
        delete = ["tc", "qdisc", "del", "dev", dev, "root"]
    proc = subprocess.run(add, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["tc failed"])[0])
    subprocess.run(delete, capture_output=True)
    return "works"


def _ifb(ipr: object) -> str:
    from pyroute2 import IPRoute

    assert isinstance(ipr, IPRoute)
    ipr.link("add", ifname="lkd-ifb", kind="ifb")
    ipr.link("del", ifname="lkd-ifb")
    return "works"


def available_modes(settings: Settings) -> list[str]:
    """The network types this node can give jobs, as configured."""
    modes = ["nat"]
    if settings.routed_ipv6_prefix is not None or settings.routed_ipv4_pool is not None:
        modes.append("routed")
    if settings.bridge is not None:
        modes.append("bridge")
    return [*modes, "none"]


def clat_translator(settings: Settings) -> tuple[str, bool]:
    """Which translator jobs' CLATs get here (LARKNS_CLAT_TRANSLATOR and
    what can be loaded), said in words, and whether it can work."""
    from larkns.kernel import clatbpf

    why = None if settings.clat_translator == "tayga" else clatbpf.unavailable()
    tayga = shutil.which("tayga", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if settings.clat_translator != "tayga" and why is None:
        return "translated in the kernel (eBPF on the job's link, no process per job)", True
    if settings.clat_translator == "bpf":
        return f"but the kernel-side CLAT cannot be used ({why}): jobs are refused", False
    said = "by tayga (a process per job)"
    if why is not None:
        said += f"; the kernel-side CLAT cannot be used: {why}"
    if tayga is None:
        said += "; tayga is not installed: jobs are refused"
    return said, tayga is not None


def modes(settings: Settings) -> list[Finding]:
    """What each network type can do on this node (its uplink, its config),
    as seen from the calling thread's network namespace."""
    from larkns.kernel.iproute import PinnedIPRoute

    out: list[Finding] = []
    with PinnedIPRoute() as ipr:
        v4 = bool(ipr.get_default_routes(family=socket.AF_INET))
        v6 = bool(ipr.get_default_routes(family=socket.AF_INET6))
        uplink = ", ".join(f for f, ok in (("IPv4", v4), ("IPv6", v6)) if ok) or "none"
        clat = settings.clat == "on" or (settings.clat == "auto" and not v4)
        if clat:
            translator, usable = clat_translator(settings)
            ipv4 = (
                f"; jobs get IPv4 through a CLAT toward NAT64 {settings.nat64_prefix}, {translator}"
            )
            ok = usable and v6
        else:
            ipv4 = "" if v4 else "; jobs get IPv4 but it reaches nothing (no IPv4 uplink)"
            ok = v4 or v6
        out.append(
            Finding("mode nat", ok, f"uplink (default routes): {uplink}{ipv4}", needed=False)
        )
        if "routed" in available_modes(settings):
            parts = [str(p) for p in (settings.routed_ipv6_prefix, settings.routed_ipv4_pool) if p]
            detail = "routes " + ", ".join(parts)
            ok = True
            if settings.proxy_nd:
                found = bool(ipr.link_lookup(ifname=settings.proxy_nd))
                ok = found
                detail += f"; proxy ND/ARP on {settings.proxy_nd}" + (
                    "" if found else " (no such link)"
                )
            out.append(Finding("mode routed", ok, detail, needed=False))
        else:
            out.append(
                Finding(
                    "mode routed",
                    False,
                    "not configured (LARKNS_ROUTED_IPV6_PREFIX, LARKNS_ROUTED_IPV4_POOL)",
                    needed=False,
                )
            )
        if settings.bridge is not None:
            bridge = ipr.link_lookup(ifname=settings.bridge)
            is_bridge = bool(bridge) and links.kind(ipr, bridge[0]) == "bridge"
            pool = settings.bridge_ipv4_pool
            out.append(
                Finding(
                    "mode bridge",
                    is_bridge,
                    f"bridge {settings.bridge}"
                    + ("" if is_bridge else " (no such bridge)")
                    + (f", IPv4 from {pool}" if pool else ", no IPv4 pool"),
                    needed=False,
                )
            )
        else:
            out.append(
                Finding("mode bridge", False, "not configured (LARKNS_BRIDGE)", needed=False)
            )
    out.append(Finding("mode none", True, "loopback only", needed=False))
    return out


def main(settings: Settings | None = None) -> int:
    results = findings()
    if os.geteuid() == 0:
        results += modes(settings or Settings())
    width = max(len(f.what) for f in results)
    for f in results:
        mark = "ok  " if f.ok else ("MISSING" if f.needed else "no  ")
        print(f"{mark:<7} {f.what:<{width}}  {f.detail}")
    missing = [f for f in results if f.needed and not f.ok]
    if missing:
        print(f"larkns cannot run here: missing {', '.join(f.what for f in missing)}")
        return 1
    usable = [f.what.removeprefix("mode ") for f in results if f.what.startswith("mode ") and f.ok]
    print(f"larkns can run here (modes: {', '.join(usable)})")
    return 0
