"""What larknsd trusts about a caller, and how it reads the files a job owner
controls (no kernel objects: plain processes and files)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from larkns.daemon import chirp, identity
from larkns.daemon.identity import CondorDaemons, Refused
from larkns.daemon.server import job_ad

USER = 64511


@pytest.fixture()
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    os.chown(d, USER, USER)
    return d


def _read(d: Path, name: str, limit: int = 1 << 20) -> bytes:
    """What root reads of a job's scratch-dir file (.chirp.config) for it."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return identity.read_user_file(fd, name, {USER}, limit)
    finally:
        os.close(fd)


def test_a_fifo_in_the_scratch_dir_is_refused_at_once(scratch: Path) -> None:
    os.mkfifo(scratch / ".chirp.config")
    t0 = time.monotonic()
    with pytest.raises(Refused, match="not a regular file"):
        _read(scratch, ".chirp.config")
    assert time.monotonic() - t0 < 5  # no thread left hanging on it


def test_a_symlink_to_a_secret_is_not_followed_and_nothing_of_it_is_told(scratch: Path) -> None:
    secret = scratch.parent / "secret"
    secret.write_text("TOPSECRET-LINE\n")
    secret.chmod(0o600)
    (scratch / ".chirp.config").symlink_to(secret)
    with pytest.raises(Refused) as e:
        _read(scratch, ".chirp.config")
    assert "TOPSECRET" not in str(e.value) and "\n" not in str(e.value)


def test_an_endless_or_huge_or_foreign_file_is_refused(scratch: Path) -> None:
    f = scratch / ".chirp.config"
    f.symlink_to("/dev/zero")
    with pytest.raises(Refused):
        _read(scratch, ".chirp.config")
    f.unlink()
    f.write_bytes(b"A = 1\n" * 400_000)  # 2.4 MB
    os.chown(f, USER, USER)
    with pytest.raises(Refused, match="larger than"):
        _read(scratch, ".chirp.config")
    f.write_text("127.0.0.1 9 cookie\n")
    os.chown(f, USER + 1, USER + 1)  # another user's file
    with pytest.raises(Refused, match="not the job's"):
        _read(scratch, ".chirp.config")
    os.chown(f, USER, USER)
    assert _read(scratch, ".chirp.config") == b"127.0.0.1 9 cookie\n"


def test_the_job_ad_is_the_one_the_starter_gave_the_hook() -> None:
    ad = job_ad('Owner = "alice"\nGlobalJobId = "ap#1.0#1"\n')
    assert ad["Owner"] == "alice"
    for bad in (None, "", 5, "[[["):
        with pytest.raises(Refused, match="ad:"):
            job_ad(bad)


def test_a_process_named_condor_starter_is_not_a_starter() -> None:
    """comm is the user's to set (prctl, or a copy of any binary under that
    name): the starter is known by its executable's inode, its uid and its
    parent, the startd."""
    tmp_path = Path(tempfile.mkdtemp(prefix="lktid-", dir="/tmp"))
    tmp_path.chmod(0o755)
    # A copy of Python under the starter's name, configured as the node's
    # starter: its inode is the configured one.
    fake = tmp_path / "condor_starter"
    fake.write_bytes(Path(os.path.realpath("/usr/bin/python3")).read_bytes())
    fake.chmod(0o755)
    startd = tmp_path / "condor_startd"
    startd.write_bytes(b"")
    daemons = CondorDaemons(starter=(str(fake),), startd=(str(startd),), entries=(str(fake),))
    # A user runs it: it forks the would-be wrapper.
    parent = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={USER}",
            f"--regid={USER}",
            "--clear-groups",
            "--",
            str(fake),
            "-c",
            "import os, time\npid = os.fork()\nif pid == 0: time.sleep(60)\n"
            "print(pid, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        with identity.Held.open(child) as p:
            assert identity.verify_starter(p, daemons) is None
    finally:
        parent.kill()
        parent.wait()
        shutil.rmtree(tmp_path)


def test_a_caller_gone_before_it_is_served_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import socket; s = socket.socket(socket.AF_UNIX, "
            f"socket.SOCK_SEQPACKET); s.connect({path!r})",
        ]
    )
    conn, _ = srv.accept()
    child.wait()
    try:
        with pytest.raises(Refused, match="gone"):
            identity.identify(conn, CondorDaemons())
    finally:
        conn.close()
        srv.close()


@pytest.mark.parametrize(
    "line",
    [
        b"set_job_attr NetworkIncoming 0\n",
        b"set_job_attr networkincoming 0\n",
        b'set_job_attr  LarkNetworkType "x"\n',
        b"set_job_attrNetworkOutgoing 0\n",  # the starter's format matches without a space
        b"set_job_attr Net\\work\\Incoming 0\n",  # its escapes
        b"set_job_attr_delayed NetworkIncoming 0\n",
        b"set_job_attr_delayedLarkX 1\n",
    ],
)
def test_the_chirp_relay_refuses_what_only_larknsd_may_set(line: bytes) -> None:
    f = chirp.RequestFilter()
    to_server, answer = f.feed(b"cookie abc\n" + line + b"get_job_attr Owner\n")
    assert to_server == b"cookie abc\nget_job_attr Owner\n"
    assert answer == b"-2\n" and f.refused == 1


def test_the_chirp_relay_passes_other_requests_and_write_data_as_they_are() -> None:
    f = chirp.RequestFilter()
    data = b"set_job_attr_on_my_mind\n" + bytes(range(256))
    req = b"set_job_attr ChirpProgress 5\nwrite 3 %d\n" % len(data) + data + b"close 3\n"
    out = b""
    for i in range(0, len(req), 7):  # in pieces, as TCP may deliver it
        to_server, answer = f.feed(req[i : i + 7])
        assert answer == b""
        out += to_server
    assert out == req


def test_data_the_starter_would_read_as_requests_drops_the_connection() -> None:
    """A write the starter does not take (a malformed one) leaves its data to
    be read as requests: a forged update hidden there must not pass."""
    f = chirp.RequestFilter()
    with pytest.raises(chirp.ChirpError):
        f.feed(b"write abc 40\nset_job_attr NetworkIncoming 0\n")
