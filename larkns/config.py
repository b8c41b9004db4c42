"""LARKNS_* knobs -> validated settings.

Knobs come, in order of precedence, from command-line flags, the process
environment (``LARKNS_IPV4_POOL=...``), the HTCondor configuration (read
with the htcondor bindings), and built-in defaults.  Every error
names the knob and says what was expected, so a site admin can fix it from the
message alone.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from larkns.policy import Destinations, Policy

MODES = ("nat", "routed", "bridge", "none")

# 198.19.0.0/16 (RFC 2544 benchmarking space) is routed nowhere and used by no
# site for real hosts, so job addresses never collide with the site's own
# RFC 1918 or CGNAT (100.64/10) space; behind NAT it is never seen outside.
DEFAULT_IPV4_POOL = "198.19.0.0/16"
DEFAULT_STATE_DIR = "/run/larkns"
DEFAULT_LIB_DIR = "/var/lib/larkns"
DEFAULT_NETNS_PREFIX = "larkns-"
DEFAULT_SLAAC_TIMEOUT = 2.0
DEFAULT_UPDATE_INTERVAL = 60.0
DEFAULT_REATTACH_TIMEOUT = 300.0
DEFAULT_SOCKET = "/run/larknsd.sock"
# A quarter of a year of accounting; a job's row is ~0.3 kB, its samples
# 40 bytes each: 100,000 jobs a quarter at one sample a minute of 1 h
# jobs come to ~0.3 GB.
DEFAULT_LEDGER_DAYS = 90.0
# A node's slots bound how many jobs one user has starting at once; more
# networks prepared and not launched than this are an attack on the pools.
DEFAULT_MAX_PREPARED_PER_USER = 64
# Each running job holds one connection to larknsd for as long as it runs:
# more than any one user has jobs on a node.
DEFAULT_MAX_CONNECTIONS_PER_UID = 1024

# A job name becomes part of the host veth name "lk-NAME" (IFNAMSIZ: 15 chars),
# of nft object names and of file names: keep it to a safe alphabet.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,11}")
# Anything under /run/netns with this prefix is taken for larkns's own (gc
# removes it): a few characters at least, so it cannot match everything.
NETNS_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")


class ConfigError(Exception):
    """A knob or argument with a value larkns cannot use."""


class UsageError(Exception):
    """A command line that does not say what to do."""


@dataclass(frozen=True)
class Settings:
    mode: str = "nat"
    # LARKNS_NETWORK_TYPE as a ClassAd expression, evaluated against each job's ad.
    mode_expr: str | None = None
    # The types a job may ask for itself (+LarkNetworkType); none by default.
    allowed_types: tuple[str, ...] = ()
    # Admin-defined traffic classes: (name, prefixes), each counted apart.
    classes: tuple[tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...] = ()
    ipv4_pool: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network(DEFAULT_IPV4_POOL)
    )
    # None means: the per-host ULA /48, made once and kept under lib_dir.
    ipv6_prefix: ipaddress.IPv6Network | None = None
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    lib_dir: Path = Path(DEFAULT_LIB_DIR)
    netns_prefix: str = DEFAULT_NETNS_PREFIX
    slaac_timeout: float = DEFAULT_SLAAC_TIMEOUT
    # How often a job's wrapper publishes its counters into the job ad.
    update_interval: float = DEFAULT_UPDATE_INTERVAL
    # How long a wrapper tries to attach to a restarted larknsd.
    reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT
    # routed mode: prefixes the site routes to this worker.  Each job gets a
    # /64 of the IPv6 one and a /32 of the IPv4 one; either may be absent.
    routed_ipv6_prefix: ipaddress.IPv6Network | None = None
    routed_ipv4_pool: ipaddress.IPv4Network | None = None
    # The uplink on which the worker answers neighbour discovery (and ARP)
    # for routed jobs' addresses, where the site does not route them to it.
    proxy_nd: str | None = None
    # nat mode: ports of the worker forwarded to jobs (TCP and UDP, IPv4 and
    # IPv6), a block of inbound_per_job of them for each job.
    inbound_ports: tuple[int, int] | None = None
    inbound_per_job: int = 4
    # bridge mode: the site network's bridge on this worker, and this node's
    # range of the site's IPv4 subnet (one address per job; none: no IPv4).
    bridge: str | None = None
    bridge_ipv4_pool: ipaddress.IPv4Network | None = None
    # bridge mode's IPv4: "static" (from the pool), "dhcp" (from the site's
    # server, through larkns's own client) or "none"; None: static if a
    # pool is set, else none.
    bridge_ipv4: str | None = None
    dhcp_timeout: float = 5.0
    # IPv4 for jobs on IPv6-only workers (464XLAT): a CLAT in each nat or
    # routed job toward the site's NAT64 prefix.  "auto": when the worker
    # has no IPv4 default route.
    clat: str = "auto"
    # What translates: "bpf" (tc programs on the job's link, no process),
    # "tayga" (a process per job) or "auto" (bpf where it was built and the
    # kernel loads it, else tayga).
    clat_translator: str = "auto"
    nat64_prefix: ipaddress.IPv6Network = field(
        default_factory=lambda: ipaddress.IPv6Network("64:ff9b::/96")
    )
    # larknsd's unix socket (the job-side programs have it from their
    # larkns-job.conf, written by larkns-condor-config from the same knob).
    socket: Path = Path(DEFAULT_SOCKET)
    max_prepared_per_user: int = DEFAULT_MAX_PREPARED_PER_USER
    # larknsd serves at most this many connections of one user at once.
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    # A job's cap, (down, up) bits/s (larkns/shaping.py): the default, or
    # a ClassAd expression giving one per job ("DOWN[/UP]"), and the most a
    # job may have.  None: jobs are not shaped.
    bandwidth: tuple[int, int] | None = None
    bandwidth_expr: str | None = None
    bandwidth_max: tuple[int, int] | None = None
    # The uplink's capacity that jobs share by weight, (down, up) bits/s
    # (larkns/kernel/uplink.py; None: not shared), the uplink (None: the
    # link of the default route), and a job's weight or a ClassAd
    # expression giving it.
    uplink_bandwidth: tuple[int, int] | None = None
    uplink: str | None = None
    weight: float = 1.0
    weight_expr: str | None = None
    # Where jobs may send (larkns/policy.py): the policy's text, or a
    # ClassAd expression giving it per job; the site's named destination
    # sets; the classes of LARKNS_CLASSES that are the site's own.
    policy: str = "open"
    policy_expr: str | None = None
    destinations: tuple[Destinations, ...] = ()
    internal_classes: tuple[str, ...] = ()
    # Where larknsd serves its Prometheus metrics (larkns/daemon/metrics.py):
    # a unix socket's path, or a loopback (address, port); None: not served.
    metrics: Path | tuple[str, int] | None = None
    # The ledger (larkns/ledger.py): None: <lib_dir>/ledger.sqlite; "off":
    # none kept.  Rows older than ledger_days go; ledger_gid, if set, may
    # read it (0640) besides root.
    ledger: Path | str | None = None
    ledger_days: float = DEFAULT_LEDGER_DAYS
    ledger_gid: int | None = None

    @property
    def ledger_path(self) -> Path | None:
        if self.ledger == "off":
            return None
        return self.ledger if isinstance(self.ledger, Path) else self.lib_dir / "ledger.sqlite"

    def check_policies(self) -> None:
        """Refuse policy settings that cannot work together (at start)."""
        names = [n for n, _ in self.classes]
        unknown = [n for n in self.internal_classes if n not in names]
        if unknown:
            raise ConfigError(
                f"LARKNS_INTERNAL_CLASSES: no class {', '.join(unknown)} in LARKNS_CLASSES "
                f"(defined: {', '.join(names) or 'none'})"
            )
        self.job_policy(None)

    def job_policy(self, ad: Any) -> Policy:
        """The destination policy of the job whose ClassAd is `ad` (None:
        no ad, as under `larkns run`): LARKNS_POLICY's."""
        from larkns import policy

        text, what = self.policy, "LARKNS_POLICY"
        if self.policy_expr is not None and ad is not None:
            value = _expression(self.policy_expr).eval(ad)
            if not isinstance(value, str):
                raise ConfigError(
                    f"LARKNS_POLICY: {self.policy_expr} gives {value!r} for this job "
                    "(expected a policy: open, internal-only or closed, with +SET/-SET terms)"
                )
            text, what = value, f"LARKNS_POLICY ({self.policy_expr} for this job)"
        found = policy.parse(text, what)
        policy.check(found, what, self.destinations, self.internal_classes)
        return found

    def job_bandwidth(self, ad: Any) -> tuple[int, int] | None:
        """The cap LARKNS_BANDWIDTH's expression gives the job whose ClassAd
        is `ad` (None: no expression, no ad, or undefined for this job),
        before LARKNS_BANDWIDTH_MAX is applied (shaping.job_cap)."""
        if self.bandwidth_expr is None or ad is None:
            return None
        from larkns import shaping

        value = _expression(self.bandwidth_expr).eval(ad)
        what = f"LARKNS_BANDWIDTH ({self.bandwidth_expr} for this job)"
        if isinstance(value, str):
            return shaping.parse_cap(value, what)
        import classad2

        if value is classad2.Value.Undefined:
            return None
        raise ConfigError(f'{what}: gives {value!r}, expected a rate like "100mbit/20mbit"')

    def job_weight(self, ad: Any) -> float:
        """The weight of the job whose ClassAd is `ad` in the uplink's
        share (None: no ad): LARKNS_WEIGHT's."""
        if self.weight_expr is None or ad is None:
            return self.weight
        from larkns import shaping

        value = _expression(self.weight_expr).eval(ad)
        import classad2

        if value is classad2.Value.Undefined:
            return self.weight
        return shaping.parse_weight(value, f"LARKNS_WEIGHT ({self.weight_expr} for this job)")

    def job_mode(self, ad: Any) -> str:
        """The network type of the job whose ClassAd is `ad` (None: no ad)."""
        mode = self.mode
        if self.mode_expr is not None and ad is not None:
            value = _expression(self.mode_expr).eval(ad)
            if not isinstance(value, str) or value.lower() not in MODES:
                raise ConfigError(
                    f"LARKNS_NETWORK_TYPE: {self.mode_expr} gives {value!r} for this job "
                    f"(expected one of: {', '.join(MODES)})"
                )
            mode = value.lower()
        asked = ad.get("LarkNetworkType") if ad is not None else None
        if asked is not None:
            if not isinstance(asked, str) or asked.lower() not in self.allowed_types:
                allowed = ", ".join(self.allowed_types) or "none"
                raise ConfigError(
                    f"LarkNetworkType: the job asks for {asked!r}; "
                    f"LARKNS_ALLOWED_NETWORK_TYPES allows: {allowed}"
                )
            mode = asked.lower()
        return mode

    def with_overrides(self, knobs: Mapping[str, str]) -> Settings:
        """Return settings with the given LARKNS_* knobs applied (validated)."""
        changes: dict[str, object] = {}
        for knob, raw in knobs.items():
            parse = _PARSERS.get(knob)
            if parse is None:
                continue
            attr, value = parse(knob, raw.strip())
            changes[attr] = value
        out = replace(self, **changes)  # type: ignore[arg-type]
        out._check_overlaps()
        out._check_bandwidth()
        return out

    def _check_bandwidth(self) -> None:
        """A default cap above the maximum would refuse every job."""
        if self.bandwidth is None or self.bandwidth_max is None:
            return
        from larkns import shaping

        why = shaping.above(self.bandwidth, self.bandwidth_max)
        if why:
            raise ConfigError(
                f"LARKNS_BANDWIDTH: {shaping.format_cap(self.bandwidth)} is above "
                f"LARKNS_BANDWIDTH_MAX ({shaping.format_cap(self.bandwidth_max)}): {why}"
            )

    def _check_overlaps(self) -> None:
        """Pools that overlap would give two jobs one address."""
        pools: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network | None]] = [
            ("LARKNS_IPV4_POOL", self.ipv4_pool),
            ("LARKNS_ROUTED_IPV4_POOL", self.routed_ipv4_pool),
            ("LARKNS_BRIDGE_IPV4_POOL", self.bridge_ipv4_pool),
            ("LARKNS_IPV6_PREFIX", self.ipv6_prefix),
            ("LARKNS_ROUTED_IPV6_PREFIX", self.routed_ipv6_prefix),
        ]
        for i, (ka, a) in enumerate(pools):
            for kb, b in pools[i + 1 :]:
                if a is not None and b is not None and a.version == b.version and a.overlaps(b):
                    raise ConfigError(f"{kb}: {b} overlaps {ka} ({a})")


def _parse_mode(knob: str, raw: str) -> tuple[str, object]:
    mode = raw.strip('"').lower()
    if mode in MODES:
        return "mode", mode
    # Not a plain type: a ClassAd expression, evaluated per job (job_mode).
    # A bare word is a misspelt type, not an attribute reference.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", raw) and _expression(raw) is not None:
        return "mode_expr", raw
    raise ConfigError(
        f"{knob}: unknown network type {raw!r} "
        f"(expected one of: {', '.join(MODES)}, or a ClassAd expression giving one)"
    )


def _expression(raw: str) -> Any:
    try:
        import classad2
    except ImportError:
        return None
    try:
        return classad2.ExprTree(raw)
    except Exception:
        return None


CLASS_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}")
RESERVED_CLASS_NAMES = ("ipv4", "ipv6", "relayed")


def named_parts(knob: str, raw: str, syntax: str) -> Iterator[tuple[str, str]]:
    """(NAME, what follows "=") of each "NAME = ..." of `raw`, parts split
    by ";"; ConfigError giving `syntax` (what follows "=") for one that is
    not."""
    for part in (p.strip() for p in raw.split(";")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        name = name.strip()
        if not sep or not CLASS_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{knob}: expected NAME = {syntax} (NAME: a letter, then up to 15 "
                f"letters or digits), got {part!r}"
            )
        yield name, rest


def _parse_classes(knob: str, raw: str) -> tuple[str, object]:
    """ "Campus = 198.18.0.0/16, 2001:db8::/32; Cloud = 198.19.0.0/16" """
    classes: list[tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]] = []
    for name, nets in named_parts(knob, raw, "PREFIX, ..."):
        prefixes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in (t.strip() for t in nets.split(",")):
            try:
                prefixes.append(ipaddress.ip_network(text, strict=True))
            except ValueError as e:
                raise ConfigError(f"{knob}: class {name}: {text!r} is not a prefix ({e})") from None
        for i, a in enumerate(prefixes):
            for b in prefixes[i + 1 :]:
                if a.version == b.version and a.overlaps(b):
                    raise ConfigError(f"{knob}: class {name}: {a} and {b} overlap")
        # ClassAd attribute names ignore case: Campus and campus would both
        # be LarkNetworkIncomingCampus; IPv4, IPv6 and Relayed name other
        # attributes of larkns's.
        if name.lower() in (c[0].lower() for c in classes):
            raise ConfigError(f"{knob}: class {name} is defined twice (names ignore case)")
        if name.lower() in RESERVED_CLASS_NAMES:
            raise ConfigError(
                f"{knob}: {name} cannot name a class (LarkNetworkIncoming{name} is another "
                "attribute of the job ad)"
            )
        classes.append((name, tuple(prefixes)))
    return "classes", tuple(classes)


def _parse_policy(knob: str, raw: str) -> tuple[str, object]:
    from larkns import policy

    words = raw.strip().strip('"').split()
    if words and words[0].lower() in policy.BASES:
        return "policy", policy.parse(raw, knob).text()
    # Not a policy: a ClassAd expression, evaluated per job (job_policy).
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", raw) and _expression(raw) is not None:
        return "policy_expr", raw
    raise ConfigError(
        f"{knob}: expected a policy ({', '.join(policy.BASES)}, then +SET or -SET terms) "
        f"or a ClassAd expression giving one, got {raw!r}"
    )


def _parse_destinations(knob: str, raw: str) -> tuple[str, object]:
    from larkns import policy

    return "destinations", policy.parse_destinations(knob, raw)


def _parse_internal(knob: str, raw: str) -> tuple[str, object]:
    names = tuple(n.strip() for n in raw.replace(",", " ").split() if n.strip())
    bad = [n for n in names if not CLASS_NAME_RE.fullmatch(n)]
    if bad:
        raise ConfigError(f"{knob}: {', '.join(bad)} is no class name")
    return "internal_classes", names


def _parse_allowed(knob: str, raw: str) -> tuple[str, object]:
    types = tuple(t.strip().lower() for t in raw.replace(",", " ").split() if t.strip())
    bad = [t for t in types if t not in MODES]
    if bad:
        raise ConfigError(
            f"{knob}: unknown network type(s) {', '.join(bad)} (expected: {', '.join(MODES)})"
        )
    return "allowed_types", types


def _parse_ipv4_pool(knob: str, raw: str) -> tuple[str, object]:
    try:
        net = ipaddress.IPv4Network(raw, strict=True)
    except ValueError as e:
        raise ConfigError(
            f"{knob}: expected an IPv4 network like {DEFAULT_IPV4_POOL}, got {raw!r} ({e})"
        ) from None
    if net.prefixlen > 30:
        raise ConfigError(
            f"{knob}: {raw} is too small: each job needs a /31, the pool must be /30 or larger"
        )
    return "ipv4_pool", net


def _parse_ipv6_prefix(knob: str, raw: str) -> tuple[str, object]:
    try:
        net = ipaddress.IPv6Network(raw, strict=True)
    except ValueError as e:
        raise ConfigError(
            f"{knob}: expected an IPv6 prefix like fd12:3456:789a::/48, got {raw!r} ({e})"
        ) from None
    if net.prefixlen > 63:
        raise ConfigError(
            f"{knob}: {raw} is too small: each job needs a /64, the prefix must be /63 or larger"
        )
    return "ipv6_prefix", net


def _parse_routed_ipv6(knob: str, raw: str) -> tuple[str, object]:
    if not raw:
        return "routed_ipv6_prefix", None
    _, net = _parse_ipv6_prefix(knob, raw)
    return "routed_ipv6_prefix", net


def _parse_ipv4_range(attr: str, what: str) -> Parser:
    """An optional IPv4 network ("" for none)."""

    def parse(knob: str, raw: str) -> tuple[str, object]:
        if not raw:
            return attr, None
        try:
            net = ipaddress.IPv4Network(raw, strict=True)
        except ValueError as e:
            raise ConfigError(f"{knob}: expected {what}, got {raw!r} ({e})") from None
        return attr, net

    return parse


def _parse_choice(attr: str, choices: tuple[str, ...]) -> Parser:
    def parse(knob: str, raw: str) -> tuple[str, object]:
        value = raw.lower()
        if value not in choices:
            raise ConfigError(
                f"{knob}: expected {', '.join(choices[:-1])} or {choices[-1]}, got {raw!r}"
            )
        return attr, value

    return parse


def _parse_ifname(attr: str, what: str) -> Parser:
    def parse(knob: str, raw: str) -> tuple[str, object]:
        if not raw:
            return attr, None
        if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", raw):
            raise ConfigError(f"{knob}: expected an interface name ({what}), got {raw!r}")
        return attr, raw

    return parse


def _parse_nat64(knob: str, raw: str) -> tuple[str, object]:
    try:
        net = ipaddress.IPv6Network(raw, strict=True)
    except ValueError as e:
        raise ConfigError(
            f"{knob}: expected an IPv6 /96 like 64:ff9b::/96, got {raw!r} ({e})"
        ) from None
    if net.prefixlen != 96:
        raise ConfigError(
            f"{knob}: {raw} is not a /96 (a NAT64 prefix embeds IPv4 in its last 32 bits)"
        )
    return "nat64_prefix", net


def _parse_port_range(knob: str, raw: str) -> tuple[str, object]:
    if not raw:
        return "inbound_ports", None
    found = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", raw)
    lo, hi = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    if not found or not 1024 <= lo <= hi <= 65535:
        raise ConfigError(
            f"{knob}: expected a port range FIRST-LAST within 1024-65535 (outside the "
            f"kernel's ip_local_port_range), got {raw!r}"
        )
    return "inbound_ports", (lo, hi)


def _parse_count(attr: str, low: int, high: int, what: str) -> Parser:
    def parse(knob: str, raw: str) -> tuple[str, object]:
        # ASCII digits only: str.isdigit() takes "²", which int() refuses,
        # and int() takes other scripts' digits, which no admin means.
        if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
            raise ConfigError(
                f"{knob}: expected a number of {what} from {low} to {high}, got {raw!r}"
            )
        return attr, int(raw)

    return parse


Parser = Callable[[str, str], tuple[str, object]]


def _parse_bandwidth(attr: str) -> Parser:
    """DOWN[/UP] ("" for none)."""

    def parse(knob: str, raw: str) -> tuple[str, object]:
        if not raw:
            return attr, None
        from larkns.shaping import parse_cap

        return attr, parse_cap(raw, knob)

    return parse


def _parse_default_bandwidth(knob: str, raw: str) -> tuple[str, object]:
    """DOWN[/UP], or a ClassAd expression giving one per job."""
    try:
        return _parse_bandwidth("bandwidth")(knob, raw)
    except ConfigError:
        # A bare word or a rate is a misspelt rate, not an expression.
        if re.fullmatch(r"[A-Za-z0-9_./ -]*", raw) or _expression(raw) is None:
            raise
    return "bandwidth_expr", raw


def _parse_weight(knob: str, raw: str) -> tuple[str, object]:
    """A weight, or a ClassAd expression giving one per job."""
    from larkns.shaping import parse_weight

    if not raw:
        return "weight", 1.0
    expr = _expression(raw)
    if re.fullmatch(r"[0-9.+-]*", raw) or expr is None:
        return "weight", parse_weight(raw, knob)
    import classad2

    # An expression naming no attribute ("1e3", "2 * 2") is checked now.
    if not [ref for ref in classad2.ClassAd().externalRefs(expr) if ref]:
        return "weight", parse_weight(expr.eval(), knob)
    return "weight_expr", raw


def _parse_dir(attr: str) -> Parser:
    def parse(knob: str, raw: str) -> tuple[str, object]:
        if not raw.startswith("/") or "\0" in raw:
            raise ConfigError(f"{knob}: expected an absolute path, got {raw!r}")
        return attr, Path(raw)

    return parse


def _parse_netns_prefix(knob: str, raw: str) -> tuple[str, object]:
    if not NETNS_PREFIX_RE.fullmatch(raw):
        raise ConfigError(f"{knob}: expected 3-32 characters of A-Z a-z 0-9 _ . -, got {raw!r}")
    return "netns_prefix", raw


def _parse_seconds(attr: str, low: float, high: float, low_included: bool = True) -> Parser:
    def parse(knob: str, raw: str) -> tuple[str, object]:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{knob}: expected a number of seconds, got {raw!r}") from None
        if not (low <= value if low_included else low < value) or not value <= high:
            least = f"{low:g}" if low_included else f"more than {low:g}"
            raise ConfigError(f"{knob}: expected {least} to {high:g} seconds, got {raw!r}")
        return attr, value

    return parse


def _parse_metrics(knob: str, raw: str) -> tuple[str, object]:
    """ "" (off), "unix:/PATH", "PORT", "ADDRESS:PORT" or "[IPV6]:PORT".

    Only loopback or a unix socket: the metrics name every job's owner and
    what it sent, and an HTTP endpoint has no way to tell who asks."""
    if not raw:
        return "metrics", None
    if raw.startswith("unix:"):
        path = raw[len("unix:") :]
        if not path.startswith("/") or "\0" in path or path.endswith("/"):
            raise ConfigError(f"{knob}: expected unix:/ABSOLUTE/PATH, got {raw!r}")
        return "metrics", Path(path)
    found = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([0-9]{1,5})|([0-9]{1,5})", raw)
    expected = (
        f"expected unix:/PATH, PORT, 127.0.0.1:PORT or [::1]:PORT (a loopback address: "
        f"the metrics name jobs' owners, and nothing authenticates who reads them), got {raw!r}"
    )
    if not found:
        raise ConfigError(f"{knob}: {expected}")
    host = found.group(1) or found.group(2) or "127.0.0.1"
    port = int(found.group(3) or found.group(4))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{knob}: {expected}") from None
    if not address.is_loopback or not 1 <= port <= 65535:
        raise ConfigError(f"{knob}: {expected}")
    return "metrics", (str(address), port)


def _parse_ledger(knob: str, raw: str) -> tuple[str, object]:
    if raw.lower() in ("off", "none", "false", "no", "0"):
        return "ledger", "off"
    if not raw:
        return "ledger", None
    if not raw.startswith("/") or "\0" in raw or raw.endswith("/"):
        raise ConfigError(f"{knob}: expected the ledger file's absolute path, or off; got {raw!r}")
    return "ledger", Path(raw)


def _parse_days(knob: str, raw: str) -> tuple[str, object]:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 36500:
        raise ConfigError(f"{knob}: expected a number of days above 0 and up to 36500, got {raw!r}")
    return "ledger_days", value


def _parse_group(knob: str, raw: str) -> tuple[str, object]:
    if not raw:
        return "ledger_gid", None
    import grp

    try:
        numeric = raw.isascii() and raw.isdigit()
        return "ledger_gid", grp.getgrgid(int(raw)).gr_gid if numeric else grp.getgrnam(raw).gr_gid
    except (KeyError, ValueError):
        raise ConfigError(f"{knob}: no such group {raw!r}") from None


_PARSERS: dict[str, Parser] = {
    "LARKNS_NETWORK_TYPE": _parse_mode,
    "LARKNS_ALLOWED_NETWORK_TYPES": _parse_allowed,
    "LARKNS_CLASSES": _parse_classes,
    "LARKNS_IPV4_POOL": _parse_ipv4_pool,
    "LARKNS_IPV6_PREFIX": _parse_ipv6_prefix,
    "LARKNS_STATE_DIR": _parse_dir("state_dir"),
    "LARKNS_SOCKET": _parse_dir("socket"),
    "LARKNS_MAX_PREPARED_PER_USER": _parse_count("max_prepared_per_user", 1, 100000, "networks"),
    "LARKNS_LIB_DIR": _parse_dir("lib_dir"),
    "LARKNS_NETNS_PREFIX": _parse_netns_prefix,
    "LARKNS_SLAAC_TIMEOUT": _parse_seconds("slaac_timeout", 0, 60),
    "LARKNS_UPDATE_INTERVAL": _parse_seconds("update_interval", 0, 86400, low_included=False),
    "LARKNS_REATTACH_TIMEOUT": _parse_seconds("reattach_timeout", 0, 86400, low_included=False),
    "LARKNS_ROUTED_IPV6_PREFIX": _parse_routed_ipv6,
    "LARKNS_ROUTED_IPV4_POOL": _parse_ipv4_range(
        "routed_ipv4_pool", "an IPv4 network routed to this worker"
    ),
    "LARKNS_PROXY_ND": _parse_ifname("proxy_nd", "the uplink"),
    "LARKNS_BRIDGE": _parse_ifname("bridge", "the site network's bridge"),
    "LARKNS_BRIDGE_IPV4_POOL": _parse_ipv4_range(
        "bridge_ipv4_pool", "this node's range of the site's IPv4 subnet"
    ),
    "LARKNS_BRIDGE_IPV4": _parse_choice("bridge_ipv4", ("static", "dhcp", "none")),
    "LARKNS_CLAT": _parse_choice("clat", ("auto", "on", "off")),
    "LARKNS_CLAT_TRANSLATOR": _parse_choice("clat_translator", ("auto", "bpf", "tayga")),
    "LARKNS_NAT64_PREFIX": _parse_nat64,
    "LARKNS_DHCP_TIMEOUT": _parse_seconds("dhcp_timeout", 0, 120, low_included=False),
    "LARKNS_INBOUND_PORTS": _parse_port_range,
    "LARKNS_INBOUND_PORTS_PER_JOB": _parse_count("inbound_per_job", 1, 1024, "ports"),
    "LARKNS_MAX_CONNECTIONS_PER_UID": _parse_count(
        "max_connections_per_uid", 1, 1 << 20, "connections"
    ),
    "LARKNS_BANDWIDTH": _parse_default_bandwidth,
    "LARKNS_BANDWIDTH_MAX": _parse_bandwidth("bandwidth_max"),
    "LARKNS_UPLINK_BANDWIDTH": _parse_bandwidth("uplink_bandwidth"),
    "LARKNS_UPLINK": _parse_ifname("uplink", "the uplink jobs share"),
    "LARKNS_WEIGHT": _parse_weight,
    "LARKNS_POLICY": _parse_policy,
    "LARKNS_DESTINATIONS": _parse_destinations,
    "LARKNS_INTERNAL_CLASSES": _parse_internal,
    "LARKNS_METRICS": _parse_metrics,
    "LARKNS_LEDGER": _parse_ledger,
    "LARKNS_LEDGER_DAYS": _parse_days,
    "LARKNS_LEDGER_GROUP": _parse_group,
}
KNOBS = tuple(_PARSERS)


def condor_params(names: tuple[str, ...]) -> dict[str, str]:
    """These knobs of the HTCondor configuration ($CONDOR_CONFIG or
    /etc/condor/condor_config), read with the htcondor bindings; none if
    either is missing."""
    if not (os.environ.get("CONDOR_CONFIG") or os.path.exists("/etc/condor/condor_config")):
        return {}
    try:
        import htcondor2
    except ImportError:
        return {}
    try:
        found = {k: htcondor2.param.get(k) for k in names}
        return {k: str(v) for k, v in found.items() if v is not None}
    except Exception as e:
        raise ConfigError(f"cannot read the HTCondor configuration: {e}") from None


def condor_knobs() -> dict[str, str]:
    """The LARKNS_* knobs of the HTCondor configuration."""
    return condor_params(KNOBS)


def load(
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
    condor: bool = True,
) -> Settings:
    """Settings from defaults, then the HTCondor configuration, then the
    environment's LARKNS_* knobs, then flags."""
    env = os.environ if environ is None else environ
    settings = Settings()
    if condor and environ is None:
        settings = settings.with_overrides(condor_knobs())
    settings = settings.with_overrides({k: v for k, v in env.items() if k in _PARSERS})
    return settings.with_overrides(flags or {})


def check_name(name: str, what: str = "--name") -> str:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{what}: {name!r} is not a valid job name "
            "(1-12 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit)"
        )
    return name


def host_ula_prefix(lib_dir: Path) -> ipaddress.IPv6Network:
    """The host's own ULA /48 (RFC 4193), made at random once and then kept."""
    path = lib_dir / "ula-prefix"
    try:
        return ipaddress.IPv6Network(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise ConfigError(
            f"{path}: not an IPv6 prefix ({e}); remove it to make a new one"
        ) from None
    global_id = os.urandom(5)  # secrets.token_bytes, without importing secrets (~4 ms)
    prefix = ipaddress.IPv6Network((b"\xfd" + global_id + bytes(10), 48))
    lib_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".ula-prefix.{os.getpid()}.tmp")
    tmp.write_text(f"{prefix}\n")
    # link() fails if another process made one first: then theirs is kept.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return ipaddress.IPv6Network(path.read_text().strip())
