"""`larkns report --from-history`: the pool's jobs from condor_history (each
schedd's, through the htcondor2 bindings), as ledger rows, so that one
report covers jobs of every node (each node's ledger knows its own alone)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from larkns.config import ConfigError
from larkns.ledger import JobEnd

if TYPE_CHECKING:
    from larkns.ledger_report import Progress

# What larknsd writes into a job's ad (larkns/daemon/chirp.py) and the
# job's identity and times.
PROJECTION = [
    "GlobalJobId",
    "ClusterId",
    "ProcId",
    "Owner",
    "AcctGroup",
    "JobCurrentStartDate",
    "JobStartDate",
    "CompletionDate",
    "EnteredCurrentStatus",
    "RemoteWallClockTime",
    "ExitCode",
    "ExitBySignal",
    "ExitSignal",
    "LarkAssignedNetworkType",
    "LarkIPv4Address",
    "LarkIPv6Addresses",
    "LarkNetworkCapDown",
    "LarkNetworkCapUp",
    "NetworkIncoming",
    "NetworkOutgoing",
    "LarkNetworkIncomingIPv4",
    "LarkNetworkOutgoingIPv4",
    "LarkNetworkIncomingIPv6",
    "LarkNetworkOutgoingIPv6",
    "LarkNetworkDroppedPackets",
    "LarkNetworkRefusedPackets",
]

# Per-class counts: Lark's NetworkIncoming<Class>, or LarkNetworkIncoming<Class>
# (which OSG's Gratia probe does not add into a job's total); not the
# per-family and relayed ones, which share the prefix.
_CLASS = re.compile(r"(?:Lark)?Network(Incoming|Outgoing)([A-Za-z0-9_]+)")
_NOT_CLASSES = {"IPv4", "IPv6", "Relayed"}


def _int(ad: Any, attr: str) -> int:
    v = ad.get(attr)
    try:
        return int(v) if v is not None else 0
    except (TypeError, ValueError):
        return 0


def _str(ad: Any, attr: str) -> str | None:
    v = ad.get(attr)
    return v if isinstance(v, str) and v else None


def job(ad: Any) -> JobEnd:
    """A history ad as the ledger keeps a job (packets: not in the ad, 0)."""
    ended = float(_int(ad, "CompletionDate") or _int(ad, "EnteredCurrentStatus"))
    started = float(
        _int(ad, "JobCurrentStartDate")
        or _int(ad, "JobStartDate")
        or ended - _int(ad, "RemoteWallClockTime")
    )
    classes: dict[str, dict[str, Any]] = {}
    for attr in ad.keys():  # noqa: SIM118 (a ClassAd is no dict)
        m = _CLASS.fullmatch(attr)
        if m and m[2] not in _NOT_CLASSES:
            c = classes.setdefault(m[2], {"bytes": {"incoming": 0, "outgoing": 0}})
            c["bytes"][m[1].lower()] = _int(ad, attr)

    def fam(label: str) -> dict[str, Any]:
        return {
            "bytes": {
                "incoming": _int(ad, f"LarkNetworkIncoming{label}"),
                "outgoing": _int(ad, f"LarkNetworkOutgoing{label}"),
            }
        }

    traffic = {
        "bytes": {"incoming": _int(ad, "NetworkIncoming"), "outgoing": _int(ad, "NetworkOutgoing")},
        "families": {"ipv4": fam("IPv4"), "ipv6": fam("IPv6")},
        "classes": classes,
        "dropped": {"packets": _int(ad, "LarkNetworkDroppedPackets")},
        "refused": {"packets": _int(ad, "LarkNetworkRefusedPackets")},
    }
    cluster, proc = ad.get("ClusterId"), ad.get("ProcId")
    signalled = ad.get("ExitBySignal") is True
    down, up = _int(ad, "LarkNetworkCapDown"), _int(ad, "LarkNetworkCapUp")
    gid = _str(ad, "GlobalJobId")
    return JobEnd(
        name=gid or f"{cluster}.{proc}",
        started=started,
        ended=ended,
        source="history",
        type=_str(ad, "LarkAssignedNetworkType") or "-",
        traffic=traffic,
        global_job_id=gid,
        job_id=None if cluster is None else f"{cluster}.{proc}",
        owner=_str(ad, "Owner"),
        acct_group=_str(ad, "AcctGroup"),
        ipv4=_str(ad, "LarkIPv4Address"),
        ipv6=tuple(a for a in (_str(ad, "LarkIPv6Addresses") or "").split(",") if a),
        cap=(down, up) if down or up else None,
        exit_code=None if signalled else ad.get("ExitCode"),
        signal=_int(ad, "ExitSignal") if signalled else None,
    )


def constraint(since: float | None, until: float | None) -> str:
    """Jobs larkns counted (their ads have NetworkIncoming) that ended within."""
    terms = ["NetworkIncoming isnt undefined"]
    if since is not None:
        terms.append(f"CompletionDate >= {int(since)}")
    if until is not None:
        terms.append(f"CompletionDate < {until:.3f}")
    return " && ".join(terms)


def jobs(
    since: float | None,
    until: float | None,
    all_attributes: bool = False,
    progress: Callable[[str, int], Progress] | None = None,
) -> Iterator[JobEnd]:
    """Every schedd's finished jobs (the collector's list of them; the local
    schedd when there is no collector to ask)."""
    try:
        import htcondor2
    except ImportError:
        raise ConfigError(
            "--from-history: needs the htcondor bindings (pip install htcondor)"
        ) from None
    try:
        try:
            ads = htcondor2.Collector().locateAll(htcondor2.DaemonTypes.Schedd)
            schedds = [htcondor2.Schedd(ad) for ad in ads]
        except Exception:
            schedds = [htcondor2.Schedd()]
        for schedd in schedds:
            found = schedd.history(
                constraint(since, until), [] if all_attributes else PROJECTION, match=-1
            )
            bar = (
                progress(
                    "condor_history",
                    len(found),
                )
                if progress
                else None
            )
            try:
                for i, ad in enumerate(found, 1):
                    yield job(ad)
                    if bar is not None:
                        bar.update(i)
            finally:
                if bar is not None:
                    bar.close()
    except ConfigError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--from-history: cannot read the pool's history: {first}") from None
