"""A seal over a job's final counts in its ClassAd, so that a change made to
them afterwards shows.

larknsd publishes a job's counts through its starter's chirp server, and the
job cannot write them (its chirp relay refuses it).  Its owner still can,
outside the job: HTCondor takes every chirp update for the user's own
(PROTECTED_JOB_ATTRS would refuse larknsd's as well), so `condor_qedit` of a
job left in the queue, or a login on the worker with the job's chirp cookie,
changes them.  What larknsd can do is make that visible: with the final
counts it publishes LarkNetworkSeal, an HMAC-SHA256 under a key only root of
the node reads (LARKNS_LIB_DIR/seal.key), over the job's GlobalJobId and the
sealed attributes; `larkns verify` checks a history ad against it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

VERSION = "v1"
ATTRIBUTE = "LarkNetworkSeal"


def key(lib_dir: Path, create: bool = True) -> bytes:
    """The node's seal key (32 random bytes, made once, root's alone)."""
    path = lib_dir / "seal.key"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        lib_dir.mkdir(parents=True, exist_ok=True)
        tmp = lib_dir / f".seal.key.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # another process's, if it made one first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return key(lib_dir, create=False)
    try:
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(data) != 32:
        raise ValueError(f"{path}: not a seal key (32 bytes); remove it to make a new one")
    return data


def _message(job_id: str, attrs: Mapping[str, str]) -> bytes:
    lines = [job_id] + [f"{name}={attrs[name]}" for name in sorted(attrs)]
    return "\n".join(lines).encode()


def seal(secret: bytes, job_id: str, attrs: Mapping[str, str]) -> str:
    """The seal of these attributes (NAME -> the value as published) of job
    `job_id` (its GlobalJobId); it names the attributes it covers."""
    digest = hmac.new(secret, _message(job_id, attrs), hashlib.sha256).hexdigest()
    return f"{VERSION}:{','.join(sorted(attrs))}:{digest}"


def verify(secret: bytes, ad: Mapping[str, str]) -> str | None:
    """None if `ad` (attribute -> value, strings unquoted) carries a seal
    that holds; else why not."""
    found = ad.get(ATTRIBUTE)
    if not found:
        return f"no {ATTRIBUTE}"
    try:
        version, names, digest = found.split(":")
    except ValueError:
        return f"{ATTRIBUTE} is not a seal"
    if version != VERSION:
        return f"{ATTRIBUTE}: unknown version {version!r}"
    job_id = ad.get("GlobalJobId", "")
    attrs = {}
    for name in names.split(","):
        if name not in ad:
            return f"{name} is gone"
        attrs[name] = ad[name]
    good = hmac.new(secret, _message(job_id, attrs), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(good, digest):
        return "the counts are not those larknsd published (changed afterwards)"
    return None
