"""The kernel-side CLAT: csrc/clat.bpf.c's two tc programs, loaded once per
larkns process, and each job's entry in their map.

The object file is built at install time (setup.py, with clang); it is read
here without libbpf: its two program sections, and one relocation each, the
load of the map `clat_jobs`, which becomes the fd of a hash map made here.
A job's entry is keyed by its MAC: its CLAT address, the NAT64 prefix, its
link's MTU.

The programs stay in the kernel for as long as a filter on a job's link
holds them, so jobs outlive the process that set them up (larknsd's restart)
with their CLAT working; their entries live in that process's map, which the
programs hold.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import threading
from pathlib import Path

from larkns import core
from larkns.kernel import tc
from larkns.kernel.rtnl import Request

OBJECT = Path(__file__).resolve().parent.parent / "clat.bpf.o"
SECTIONS = {"egress": "tc/egress", "ingress": "tc/ingress"}
MAP_SYMBOL = "clat_jobs"
# A job's entry: clat6[16], prefix[12], mtu (u32, the kernel's byte order).
_VALUE = struct.Struct("=16s12sI")
_KEY_SIZE = 8  # the MAC in the first 6 bytes
# Jobs a process can hold: entries are allocated as they come
# (BPF_F_NO_PREALLOC), so the bound costs nothing until used.
MAX_JOBS = 65536
# Below the uplink share's filters (4c4b) and any a site adds: the job's link
# has no other filter.
PREF = 1

_R_BPF_64_64 = 1
_BPF_PSEUDO_MAP_FD = 1
_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")


class ObjectError(Exception):
    """The object file is missing or not what this code expects."""


def _sections(elf: bytes) -> dict[str, bytes]:
    """name -> contents of each section of ELF64 LE `elf`."""
    h = _ELF_HEADER.unpack_from(elf)
    if h[0][:4] != b"\x7fELF" or h[0][4] != 2 or h[0][5] != 1:
        raise ObjectError("not a 64-bit little-endian ELF object")
    shoff, shentsize, shnum, shstrndx = h[6], h[11], h[12], h[13]
    raw = [_SECTION.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
    names_off = raw[shstrndx][4]
    out: dict[str, bytes] = {}
    for s in raw:
        name_end = elf.index(b"\0", names_off + s[0])
        out[elf[names_off + s[0] : name_end].decode()] = elf[s[4] : s[4] + s[5]]
    return out


def programs(elf: bytes, map_fd: int) -> dict[str, bytes]:
    """The instructions of each program of `elf`, with the loads of
    MAP_SYMBOL made loads of `map_fd`.  Anything else to relocate (another
    map, global data, a call) is refused: the C is written without them."""
    secs = _sections(elf)
    symtab = secs.get(".symtab")
    strtab = secs.get(".strtab")
    if symtab is None or strtab is None:
        raise ObjectError("no symbol table")
    out = {}
    for key, name in SECTIONS.items():
        if name not in secs:
            raise ObjectError(f"no section {name}")
        code = bytearray(secs[name])
        rel = secs.get(f".rel{name}", b"")
        for off in range(0, len(rel), _REL.size):
            r_offset, r_info = _REL.unpack_from(rel, off)
            sym, rtype = r_info >> 32, r_info & 0xFFFFFFFF
            st_name = _SYMBOL.unpack_from(symtab, sym * _SYMBOL.size)[0]
            symbol = strtab[st_name : strtab.index(b"\0", st_name)].decode()
            if rtype != _R_BPF_64_64 or symbol != MAP_SYMBOL or code[r_offset] != 0x18:
                raise ObjectError(f"{name}: unexpected relocation of {symbol!r} (type {rtype})")
            # ld_imm64 dst, map: src_reg = BPF_PSEUDO_MAP_FD, imm = the fd.
            code[r_offset + 1] = (code[r_offset + 1] & 0x0F) | (_BPF_PSEUDO_MAP_FD << 4)
            struct.pack_into("<i", code, r_offset + 4, map_fd)
        out[key] = bytes(code)
    return out


def key(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")).ljust(_KEY_SIZE, b"\0")


def value(clat6: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network, mtu: int) -> bytes:
    return _VALUE.pack(clat6.packed, prefix.network_address.packed[:12], mtu)


class Translator:
    """The programs and the map of one larkns process."""

    def __init__(self) -> None:
        if not OBJECT.exists():
            raise ObjectError(f"{OBJECT} was not built (no clang at install time)")
        elf = OBJECT.read_bytes()
        self.map_fd = core.bpf_map_create(
            core.BPF_MAP_TYPE_HASH,
            _KEY_SIZE,
            _VALUE.size,
            MAX_JOBS,
            core.BPF_F_NO_PREALLOC,
            "larkns_clat",
        )
        self.fds: dict[str, int] = {}
        try:
            for direction, insns in programs(elf, self.map_fd).items():
                self.fds[direction] = core.bpf_prog_load(
                    core.BPF_PROG_TYPE_SCHED_CLS, insns, f"larkns_clat_{direction[:2]}"
                )
        except BaseException:
            self.close()
            raise

    def add(
        self, mac: str, clat6: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network, mtu: int
    ) -> None:
        core.bpf_map_update(self.map_fd, key(mac), value(clat6, prefix, mtu))

    def remove(self, mac: str) -> None:
        core.bpf_map_delete(self.map_fd, key(mac))

    def filters(self, index: int, dev: str) -> list[Request]:
        """What puts the programs on link `index` (in the job's namespace)."""
        return [
            tc.clsact(index, dev),
            tc.bpf_direct(
                index,
                tc.CLSACT_EGRESS,
                PREF,
                self.fds["egress"],
                "larkns_clat",
                f"add the CLAT's egress program to {dev}",
            ),
            tc.bpf_direct(
                index,
                tc.CLSACT_INGRESS,
                PREF,
                self.fds["ingress"],
                "larkns_clat",
                f"add the CLAT's ingress program to {dev}",
            ),
        ]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1


_lock = threading.Lock()
_shared: Translator | None = None
_failed: str | None = None


def shared() -> Translator:
    """The process's programs and map, loaded on first use (4-8 ms here:
    the verifier) and kept for the process's life: the CLATs of all its
    jobs, larknsd's or one `larkns run`'s, use the one pair.  ObjectError
    with the reason, every time, if they cannot be loaded."""
    global _shared, _failed
    with _lock:
        if _shared is None and _failed is None:
            try:
                _shared = Translator()
            except (ObjectError, core.CoreError, OSError) as e:
                _failed = str(e) or type(e).__name__
        if _shared is None:
            raise ObjectError(_failed)
        return _shared


def unavailable() -> str | None:
    """Why the kernel-side CLAT cannot be used here (None: it can): the
    object not built, or the kernel refusing the map or the programs."""
    try:
        shared()
    except ObjectError as e:
        return str(e)
    return None
