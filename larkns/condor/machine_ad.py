"""Startd cron job: what larkns offers on this node, for the machine ad.

    LarkAvailable = true            larknsd answers
    LarkNetworkTypes = "nat,none"   the modes a job can have
    LarkNetworkType = "nat"         the default
    LarkHasIPv4 = true              jobs reach the site over IPv4
    LarkHasIPv6 = true              ... and IPv6
    LarkNetworkPolicies = true      destination policies can be applied
    LarkDestinationSets = "license" the site's sets a policy may name
    LarkNetworkShaping = true       jobs can be capped (HTB and IFB)
    LarkUplinkBandwidthDown = 10000000000   what jobs share of the uplink,
    LarkUplinkBandwidthUp = 10000000000     bits/s (when it is shared)

so that jobs can require them (requirements = LarkHasIPv6).  Runs as the
condor user: standard library only.
"""

from __future__ import annotations

from larkns.daemon import protocol


def _bool(v: object) -> str:
    return "true" if v else "false"


def main(sock_path: str) -> int:
    try:
        info = protocol.ask(sock_path, {"op": "info"}, timeout=30)
    except (OSError, protocol.ProtocolError):
        info = None
    if not info or not info.get("ok"):
        print("LarkAvailable = false")
        return 0
    print("LarkAvailable = true")
    print(f'LarkNetworkTypes = "{",".join(info.get("modes", []))}"')
    print(f'LarkNetworkType = "{info.get("default_mode", "")}"')
    print(f"LarkHasIPv4 = {_bool(info.get('ipv4'))}")
    print(f"LarkHasIPv6 = {_bool(info.get('ipv6'))}")
    print(f"LarkNetworkPolicies = {_bool(info.get('policies'))}")
    print(f'LarkDestinationSets = "{",".join(info.get("destination_sets", []))}"')
    print(f"LarkNetworkShaping = {_bool(info.get('shaping'))}")
    uplink = info.get("uplink_bandwidth")
    if isinstance(uplink, list) and len(uplink) == 2 and all(isinstance(v, int) for v in uplink):
        print(f"LarkUplinkBandwidthDown = {uplink[0]}")
        print(f"LarkUplinkBandwidthUp = {uplink[1]}")
    return 0
