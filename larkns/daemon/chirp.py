"""The job's counts into its ClassAd, through its starter's chirp server, by
a path the job cannot write.

HTCondor's starter serves chirp on 127.0.0.1:PORT of the worker's network
namespace to whoever presents the job's cookie (in .chirp.config of the
scratch dir, which the job can read).  A job of larkns reaches that port only
through larkns's relay in its own namespace; the relay refuses updates of
attributes named Network* or Lark* (what larknsd publishes, and what OSG's
accounting adds up), so those come only from larknsd, which speaks chirp to
the starter itself.  The owner's `condor_qedit` of them is refused by the
schedd (PROTECTED_JOB_ATTRS, in the configuration larkns-condor-config
writes).

The protocol (HTCondor's io_proxy_handler): lines; the first is
`cookie COOKIE`; each request line gets a line with a number, negative for an
error; a word's spaces and backslashes are escaped with a backslash; `write`,
`pwrite`, `swrite` and `putfile` are followed by LENGTH bytes of data.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

LOCALHOST = "127.0.0.1"
LINE_MAX = 1024  # CHIRP_LINE_MAX of the starter: longer requests are refused
NOT_AUTHORIZED = -2  # CHIRP_ERROR_NOT_AUTHORIZED
RESERVED = ("network", "lark")  # attribute prefixes only larknsd may set


class ChirpError(Exception):
    pass


@dataclass(frozen=True)
class ChirpConfig:
    """What .chirp.config says: where the starter's chirp server is, and the
    job's cookie."""

    port: int
    cookie: str

    @classmethod
    def parse(cls, data: bytes) -> ChirpConfig | None:
        fields = data.decode("ascii", errors="replace").split()
        if len(fields) < 3 or fields[0] != LOCALHOST or not fields[1].isdigit():
            return None
        port = int(fields[1])
        cookie = fields[2]
        if not 0 < port < 65536 or not cookie.isprintable():
            return None
        return cls(port, cookie)


def escape(word: str) -> str:
    """A word as chirp reads it (sscanf_chirp: a backslash takes the next
    character as it is)."""
    return "".join("\\" + c if c.isspace() or c == "\\" else c for c in word)


def _word(line: bytes) -> bytes:
    """The first word of `line` as the starter's sscanf_chirp reads "%s"
    after a space in its format: any whitespace (or none) skipped, then up to
    the next whitespace, a backslash taking the next byte as it is."""
    i = 0
    while i < len(line) and line[i : i + 1].isspace():
        i += 1
    out = bytearray()
    while i < len(line) and not line[i : i + 1].isspace():
        if line[i] == 0x5C:  # backslash
            i += 1
            if i == len(line):
                break
        out.append(line[i])
        i += 1
    return bytes(out)


def sets_reserved(line: bytes) -> bool:
    """Whether the starter could read `line` as setting an attribute only
    larknsd may set.  As the starter parses it: a C string (up to a NUL),
    the verb matched as a prefix (its format's space matches no space too),
    attribute names compared without regard to case."""
    line = line.split(b"\0", 1)[0].rstrip(b"\r\n")
    for verb in (b"set_job_attr_delayed", b"set_job_attr"):
        if line.startswith(verb):
            name = _word(line[len(verb) :]).decode("latin-1").lower()
            if name.startswith(RESERVED):
                return True
    return False


def _data_length(line: bytes) -> int:
    """LENGTH of a request followed by data (write, pwrite, swrite,
    putfile), 0 for any other."""
    words = line.split()
    at = {b"write": 2, b"pwrite": 2, b"swrite": 2, b"putfile": 3}.get(words[0] if words else b"")
    if at is None or len(words) <= at:
        return 0
    try:
        return max(0, int(words[at]))
    except ValueError:
        return 0


def publish(config: ChirpConfig, attrs: dict[str, str], timeout: float = 10.0) -> None:
    """Set job ad attributes (NAME -> ClassAd expression) through the
    starter's chirp server, from this thread's network namespace (the
    worker's).  Raises ChirpError or OSError."""
    with socket.create_connection((LOCALHOST, config.port), timeout=timeout) as s:
        f = s.makefile("rwb", buffering=0)
        _ask(f, f"cookie {escape(config.cookie)}")
        for name, expr in attrs.items():
            _ask(f, f"set_job_attr {escape(name)} {escape(expr)}")


def _ask(f: Any, line: str) -> None:
    f.write(line.encode() + b"\n")
    answer = f.readline(64)
    if not answer:
        raise ChirpError("the starter closed the connection")
    try:
        code = int(answer)
    except ValueError:
        raise ChirpError("the starter's answer is not a number") from None
    if code < 0:
        raise ChirpError(f"the starter refused {line.split()[0]} (chirp error {code})")


class RequestFilter:
    """What a job sends to its starter's chirp server, request by request:
    requests to set attributes larknsd publishes are answered here with "not
    authorized" and never reach the starter; all else passes as it was.
    Chirp clients wait for each answer before the next request, so an answer
    made here keeps its place.

    The data after a write is passed on unread, where the starter reads it as
    data.  Should the starter not have taken the request (a malformed one),
    it reads that data as requests instead: so every line of what is passed
    on is checked too, and one that would set such an attribute drops the
    connection (ChirpError) before it is sent."""

    def __init__(self) -> None:
        self._buf = b""  # not yet passed on: an incomplete request line
        self._data_left = 0  # bytes of a request's data still to pass on
        self._line = b""  # the current line of what was passed on (its start)
        self._line_long = False
        self.refused = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """(bytes for the starter, answers for the job)."""
        to_server = bytearray()
        to_client = bytearray()
        self._buf += data
        while self._buf:
            if self._data_left:
                part = self._buf[: self._data_left]
                to_server += part
                self._data_left -= len(part)
                self._buf = self._buf[len(part) :]
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > LINE_MAX:
                    raise ChirpError("a chirp request line over the limit")
                break
            line, self._buf = self._buf[: end + 1], self._buf[end + 1 :]
            if sets_reserved(line):
                self.refused += 1
                to_client += f"{NOT_AUTHORIZED}\n".encode()
                continue
            self._data_left = _data_length(line)
            to_server += line
        self._check(bytes(to_server))
        return bytes(to_server), bytes(to_client)

    def _check(self, passed: bytes) -> None:
        """Every line of what is passed on, as the starter would read it if
        it took none of it for data."""
        for i, piece in enumerate(passed.split(b"\n")):
            if i > 0:
                if not self._line_long and sets_reserved(self._line):
                    raise ChirpError("a request to set a reserved attribute inside data")
                self._line, self._line_long = b"", False
            if not self._line_long:
                self._line += piece
                if len(self._line) > LINE_MAX + 1:
                    # Longer than the starter takes as a request.
                    self._line, self._line_long = b"", True


def attributes(traffic: dict[str, Any]) -> dict[str, str]:
    """The job ad attributes for a job's counters (bytes)."""
    out = {
        "NetworkIncoming": str(traffic["bytes"]["incoming"]),
        "NetworkOutgoing": str(traffic["bytes"]["outgoing"]),
    }
    for fam, label in (("ipv4", "IPv4"), ("ipv6", "IPv6")):
        f = traffic["families"][fam]["bytes"]
        out[f"LarkNetworkIncoming{label}"] = str(f["incoming"])
        out[f"LarkNetworkOutgoing{label}"] = str(f["outgoing"])
    relayed = traffic.get("relayed")
    if relayed is not None:
        # chirp and DNS carried by larkns's relays between the job's loopback
        # and the worker's: part of NetworkIncoming/NetworkOutgoing.
        out["LarkNetworkIncomingRelayed"] = str(relayed["bytes"]["incoming"])
        out["LarkNetworkOutgoingRelayed"] = str(relayed["bytes"]["outgoing"])
    dropped = traffic.get("dropped")
    if dropped is not None:
        # Packets the job sent that larkns dropped (spoofed sources, rogue
        # router advertisements or DHCP replies).
        out["LarkNetworkDroppedPackets"] = str(dropped["packets"])
    uncounted = traffic.get("uncounted_s")
    if uncounted:
        # Seconds of the job's traffic that may be missing from its counts (a
        # flush of the worker's ruleset took its counters; they went on from
        # their last reading).
        out["LarkNetworkUncountedSeconds"] = str(uncounted)
    untranslated = traffic.get("untranslated")
    if untranslated is not None:
        # Packets the job's kernel-side CLAT could not translate and dropped.
        out["LarkNetworkUntranslatedPackets"] = str(untranslated["packets"])
    refused = traffic.get("refused")
    if refused is not None:
        # Packets the job's destination policy refused (LARKNS_POLICY).
        out["LarkNetworkRefusedPackets"] = str(refused["packets"])
    # Per class: under larkns's own prefix, as everything but the totals.
    # Accounting adds up every numeric attribute whose name starts with
    # "Network" into a job's network total (OSG's Gratia probe does), and a
    # class's bytes are already in NetworkIncoming/NetworkOutgoing: only
    # those two may start so.
    for name, c in traffic.get("classes", {}).items():
        out[f"LarkNetworkIncoming{name}"] = str(c["bytes"]["incoming"])
        out[f"LarkNetworkOutgoing{name}"] = str(c["bytes"]["outgoing"])
    return out


def quote(s: str) -> str:
    """A ClassAd string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
