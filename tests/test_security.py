"""Attacks of a job owner on a real pool, each of which must fail: a fake
starter, a job environment that would steer larkns's own programs, forged
counts, the worker's loopback services, and a job that runs a second time.

The pool and larknsd are set up as a site does (tests/test_condor.py's
`node`: larkns-condor-config, larknsd reading the HTCondor configuration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.condor import USER_UID, Pool
from tests.test_condor import JOB, _wait_status, daemon, node, pool
from tests.test_daemon import Larknsd
from tests.world import PORT, SITE4, World, sh

# The pool's fixtures, a pool of this module's own.
__all__ = ["daemon", "node", "pool"]


def _as_user(world: World, script: str) -> subprocess.CompletedProcess[str]:
    """A Python script run by the pool's submitting user on the worker (as a
    user with a login there would)."""
    return subprocess.run(
        [
            *world.worker_cmd(),
            "setpriv",
            f"--reuid={USER_UID}",
            f"--regid={USER_UID}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            textwrap.dedent(script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def _records(world: World) -> list[str]:
    jobs = world.state_dir / "jobs"
    return sorted(p.name for p in jobs.iterdir()) if jobs.exists() else []


def test_a_process_named_condor_starter_gets_no_network(
    pool: Pool, daemon: Larknsd, world: World
) -> None:
    """A user names a process condor_starter (prctl) and asks, from its child,
    for networks and for a job: all refused, nothing built; real jobs still
    run."""
    before = _records(world)
    out = _as_user(
        world,
        f"""
        import ctypes, json, os, socket, sys
        ctypes.CDLL(None).prctl(15, b"condor_starter", 0, 0, 0)  # PR_SET_NAME
        assert open("/proc/self/comm").read().strip() == "condor_starter"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            answers = []
            for op in ["prepare"] * 50 + ["launch"]:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect({daemon.socket!r})
                msg = {{"v": 1, "op": op, "argv": ["/bin/true"], "path": "/bin/true",
                       "cwd": "/", "env": []}}
                fds = [0, 1, 2] if op == "launch" else []
                socket.send_fds(s, [json.dumps(msg).encode()], fds)
                answers.append(json.loads(s.recv(65536)))
                s.close()
            os.write(w, json.dumps(answers).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(w)
        print(os.read(r, 1 << 20).decode())
        """,
    )
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert len(answers) == 51
    for a in answers:
        assert a["ok"] is False
        assert "is not a job of this node's HTCondor starter" in a["error"]
    assert _records(world) == before
    cluster = pool.submit(JOB.format(script="exit 0", tag="afterfake"))
    assert pool.wait_done(cluster)["ExitCode"] == "0"


def test_the_job_s_environment_steers_nothing_of_larkns(
    pool: Pool, daemon: Larknsd, world: World
) -> None:
    """PYTHONPATH with a `larkns` package of the owner's, LD_PRELOAD with a
    library of the owner's, and LARKNS_SOCKET naming a daemon of the
    owner's: the wrapper and the hook run larkns's own code against the
    node's larknsd, and nothing of the owner's runs in the worker's network."""
    evil = pool.home / "evil"
    pkg = evil / "larkns" / "condor"
    pkg.mkdir(parents=True, exist_ok=True)
    marker = pool.home / "evil.marks"
    code = (
        "import os\n"
        f"open({str(marker)!r}, 'a').write('python ' + os.readlink('/proc/self/ns/net') + "
        "'\\n')\n"
    )
    for f in (evil / "larkns" / "__init__.py", pkg / "__init__.py"):
        f.write_text(code)
    (pkg / "wrapper.py").write_text(code + "def main(*a):\n    os.execvp(a[0][0], a[0])\n")
    src = evil / "preload.c"
    src.write_text(
        textwrap.dedent(f"""\
        #include <stdio.h>
        #include <unistd.h>
        __attribute__((constructor)) static void mark(void) {{
            char ns[64] = "";
            ssize_t n = readlink("/proc/self/ns/net", ns, sizeof ns - 1);
            if (n > 0)
                ns[n] = 0;
            else
                snprintf(ns, sizeof ns, "unknown-%d", (int)getpid());
            FILE *f = fopen("{marker}", "a");
            if (f) {{
                fprintf(f, "preload %s\\n", ns);
                fclose(f);
            }}
        }}
        """)
    )
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(evil / "preload.so"), str(src)], check=True)
    for p in [evil, *evil.rglob("*")]:
        os.chown(p, USER_UID, USER_UID)
    worker_ns = sh("readlink", "/proc/self/ns/net", ns=world.worker).stdout.strip()
    job = JOB.replace(
        "queue",
        f'environment = "PYTHONPATH={evil} PYTHONHOME={evil} LD_PRELOAD={evil}/preload.so '
        f'LARKNS_SOCKET=/tmp/lkt-evil.sock"\n    queue',
    )
    cluster = pool.submit(job.format(script="readlink /proc/self/ns/net", tag="evil"))
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "evil.err").read_text())
    job_ns = (pool.home / "evil.out").read_text().strip()
    assert job_ns != worker_ns and ad["LarkAssignedNetworkType"] == "nat"
    lines = marker.read_text().splitlines() if marker.exists() else []
    # The job itself may load its own library (in its own network); nothing
    # of the owner's may run in the worker's.
    assert not [x for x in lines if x.startswith("python")], lines
    assert all(len(x.split()) >= 2 and x.split()[1] != worker_ns for x in lines), lines


def test_a_job_cannot_write_its_own_counts(pool: Pool, daemon: Larknsd, world: World) -> None:
    """Through the chirp relay, a job asks its starter to set its network
    counts (as condor_chirp does, and in the forms the starter's parser also
    takes): refused; other attributes still pass; history holds what
    larknsd counted, sealed, and the relayed bytes are in it."""
    chirp = f"{pool.release}/libexec/condor_chirp"
    n, size, reply = 10, 500, 200
    forge = textwrap.dedent("""\
        import os, socket, sys
        cfg = open(os.environ["_CONDOR_CHIRP_CONFIG"]).read().split()
        s = socket.create_connection(("127.0.0.1", int(cfg[1])))
        f = s.makefile("rwb", buffering=0)
        def ask(line):
            f.write(line + b"\\n")
            return f.readline().strip()
        assert ask(b"cookie " + cfg[2].encode()) == b"0"
        for line in (b"set_job_attrNetworkIncoming 0", b"set_job_attr networkoutgoing 0",
                     b"set_job_attr Net\\\\workIncoming 0", b"set_job_attr LarkNetworkSeal 1"):
            print(line.decode(), ask(line).decode())
        print("LktAllowed", ask(b"set_job_attr LktAllowed 7").decode())
        """)
    (pool.home / "forge.py").write_text(forge)
    os.chown(pool.home / "forge.py", USER_UID, USER_UID)
    script = (
        f"/usr/bin/python3 peer.py udp {SITE4} {PORT} {n} {size} {reply} && "
        f"{chirp} set_job_attr NetworkIncoming 0; echo chirp=$?; "
        f"{chirp} set_job_attr NetworkOutgoing 1; echo chirp=$?; "
        f"/usr/bin/python3 forge.py"
    )
    cluster = pool.submit(JOB.format(script=script, tag="forge"))
    ad = pool.wait_done(cluster)
    out = (pool.home / "forge.out").read_text()
    assert ad["ExitCode"] == "0", (ad, (pool.home / "forge.err").read_text())
    assert out.count("chirp=0") == 0 and out.count("chirp=") == 2, out
    for line in out.splitlines()[-5:-1]:
        assert line.endswith(" -2"), out  # not authorized
    assert out.splitlines()[-1] == "LktAllowed 0", out
    assert ad["LktAllowed"] == "7"
    relayed_out = int(ad["LarkNetworkOutgoingRelayed"])
    relayed_in = int(ad["LarkNetworkIncomingRelayed"])
    assert relayed_out > 0 and relayed_in > 0  # the job's own chirp traffic
    assert int(ad["NetworkOutgoing"]) == n * (28 + size) + relayed_out
    assert int(ad["NetworkIncoming"]) == n * (28 + reply) + relayed_in
    assert int(ad["LarkNetworkOutgoingIPv4"]) == n * (28 + size)
    verify = _verify(pool, daemon, cluster)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _verify(pool: Pool, daemon: Larknsd, cluster: int) -> subprocess.CompletedProcess[str]:
    text = pool.run("condor_history", "-l", str(cluster)).stdout
    return subprocess.run(
        [str(Path(sys.executable).parent / "larkns"), "verify"],
        input=text,
        capture_output=True,
        text=True,
        env=daemon.env,
        timeout=30,
    )


def test_counts_changed_by_the_owner_after_the_job_show_as_forged(
    pool: Pool, daemon: Larknsd
) -> None:
    """HTCondor lets the owner condor_qedit a job left in the queue, and no
    configuration can refuse that and still take larknsd's chirp updates:
    the seal makes the change show."""
    job = JOB.replace("queue", "leave_in_queue = LktLetGo =!= true\n    queue")
    send = f"/usr/bin/python3 peer.py udp {SITE4} {PORT} 3 100 100"
    cluster = pool.submit(job.format(script=send, tag="qedit"))
    _wait_status(pool, cluster, "4")  # completed, still in the queue
    pool.run("condor_qedit", str(cluster), "NetworkOutgoing", "1", user=True)
    pool.run("condor_qedit", str(cluster), "LktLetGo", "true", user=True)
    ad = pool.wait_done(cluster)
    assert ad["NetworkOutgoing"] == "1"
    verify = _verify(pool, daemon, cluster)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "changed afterwards" in verify.stdout


def test_the_network_type_comes_from_the_starter_s_job_ad_not_the_owner_s_file(
    pool: Pool,
) -> None:
    """The site decides the type from the job's ad (here: LktLoopbackOnly
    gives "none").  A job that says so in its submit file gets it; one whose
    owner transfers a .job.ad of their own, which replaces the starter's in
    the scratch dir, does not: larknsd reads the ad the starter gives the
    PREPARE_JOB hook."""
    forged = pool.home / ".job.ad"
    forged.write_text('LktLoopbackOnly = true\nOwner = "someone-else"\n')
    os.chown(forged, USER_UID, USER_UID)
    script = "ip -o link | wc -l; grep -c LktLoopbackOnly .job.ad"
    plain = JOB.replace("should_transfer_files = NO", "should_transfer_files = YES")
    forging = plain.replace("queue", "transfer_input_files = .job.ad\n    queue")
    genuine = plain.replace("queue", "+LktLoopbackOnly = true\n    queue")
    a = pool.submit(forging.format(script=script, tag="forging"))
    b = pool.submit(genuine.format(script=script, tag="genuine"))
    ad_a, ad_b = pool.wait_done(a), pool.wait_done(b)
    assert ad_a["ExitCode"] == "0" and ad_b["ExitCode"] == "0", (ad_a, ad_b)
    # The forged file was in place (the job sees it), yet the job got nat.
    assert (pool.home / "forging.out").read_text().split() == ["2", "1"]
    assert ad_a["LarkAssignedNetworkType"] == "nat" and ad_a["Owner"] == "lktuser"
    assert ad_b["LarkAssignedNetworkType"] == "none"


@pytest.fixture()
def root_service(world: World) -> Iterator[int]:
    """A root-only service on the worker's 127.0.0.1 (its port)."""
    srv = subprocess.Popen(
        [
            *world.worker_cmd(),
            sys.executable,
            "-c",
            "import socket\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(8)\n"
            "print(s.getsockname()[1], flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.sendall(b'ROOT-SECRET' * 1000); c.close()\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None
        yield int(srv.stdout.readline())
    finally:
        srv.kill()
        srv.wait()


def test_a_job_reaches_no_loopback_service_of_the_worker_but_its_starter(
    pool: Pool, root_service: int
) -> None:
    probe = (
        "import socket, sys\n"
        "try:\n"
        f"    s = socket.create_connection(('127.0.0.1', {root_service}), timeout=3)\n"
        "    print('GOT', s.recv(100))\n"
        "except OSError as e:\n"
        "    print('refused', e)\n"
    )
    (pool.home / "probe.py").write_text(probe)
    os.chown(pool.home / "probe.py", USER_UID, USER_UID)
    cluster = pool.submit(JOB.format(script="/usr/bin/python3 probe.py", tag="probe"))
    ad = pool.wait_done(cluster)
    out = (pool.home / "probe.out").read_text()
    assert ad["ExitCode"] == "0", ad
    assert out.startswith("refused") and "ROOT-SECRET" not in out, out


@pytest.mark.parametrize("interrupt", ["hold", "vacate", "restart-startd"])
def test_a_job_that_runs_again_gets_a_fresh_network_and_the_counts_of_its_new_run(
    pool: Pool, world: World, interrupt: str
) -> None:
    """An everyday second start (hold and release, a vacate, the startd
    restarted under the job): what larkns reported of the first run is not
    read back as what the job asks for, and the ad ends with the counts of
    the run that finished."""
    n, size, reply = 4, 300, 100
    tag = f"again-{interrupt}"
    flag = pool.home / f"{tag}.first"
    flag.unlink(missing_ok=True)
    send = f"/usr/bin/python3 peer.py udp {SITE4} {PORT} {n} {size} {reply}"
    # The first run sends and waits to be interrupted; the second sends and ends.
    script = f"if [ -e {flag} ]; then {send}; else touch {flag}; {send}; sleep 300; fi"
    cluster = pool.submit(JOB.format(script=script, tag=tag))
    _wait_status(pool, cluster, "2")
    deadline = time.monotonic() + 60
    while int(pool.queue_ad(cluster).get("NetworkOutgoing", "0")) == 0:
        assert time.monotonic() < deadline, "the first run's counts never came"
        time.sleep(0.5)
    first = pool.queue_ad(cluster)
    assert "LarkNetworkType" not in first  # a report is no request
    assert first["LarkAssignedNetworkType"] == "nat"
    if interrupt == "hold":
        pool.run("condor_hold", str(cluster), user=True)
        _wait_status(pool, cluster, "5")
        pool.run("condor_release", str(cluster), user=True)
    elif interrupt == "vacate":
        pool.run("condor_vacate_job", str(cluster), user=True)
    else:
        pool.run("condor_restart", "-startd")
    ad = pool.wait_done(cluster, timeout=180)
    assert ad["ExitCode"] == "0", (ad, (pool.home / f"{tag}.err").read_text())
    assert int(ad["NumJobStarts"]) >= 2
    assert "HoldReason" not in ad or ad.get("JobStatus") == "4", ad
    assert int(ad["NetworkOutgoing"]) == n * (28 + size)  # this run's, not the sum
    assert int(ad["NetworkIncoming"]) == n * (28 + reply)


def test_larknsd_takes_its_socket_and_knobs_from_the_htcondor_configuration(
    daemon: Larknsd,
) -> None:
    assert not [k for k in daemon.env if k.startswith("LARKNS_")]
    assert Path(daemon.socket).is_socket()
    with open(f"/proc/{daemon.proc.pid}/environ", "rb") as f:
        assert b"LARKNS_SOCKET" not in f.read()


def test_the_job_cannot_take_control_of_its_wrapper(pool: Pool) -> None:
    """The wrapper runs as the job's owner in the worker's network; the job
    (the same user) must not be able to trace it, or read or write its
    memory, to act there as it."""
    probe = textwrap.dedent("""\
        import ctypes, os
        me = os.getuid()
        wrappers = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if open(f"/proc/{pid}/comm").read().strip() == "larkns-wrapper" and \\
                        os.stat(f"/proc/{pid}").st_uid == me:
                    wrappers.append(int(pid))
            except OSError:
                pass
        print("wrappers", len(wrappers))
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in wrappers:
            print("ptrace", libc.ptrace(16, pid, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH
            for f in ("mem", "environ"):
                try:
                    open(f"/proc/{pid}/{f}", "rb").read(1)
                    print(f, "open")
                except OSError as e:
                    print(f, "refused", e.errno)
        """)
    (pool.home / "trace.py").write_text(probe)
    os.chown(pool.home / "trace.py", USER_UID, USER_UID)
    cluster = pool.submit(JOB.format(script="/usr/bin/python3 trace.py", tag="trace"))
    ad = pool.wait_done(cluster)
    out = (pool.home / "trace.out").read_text().splitlines()
    assert ad["ExitCode"] == "0", (ad, (pool.home / "trace.err").read_text())
    assert out[0] == "wrappers 1", out
    assert out[1].startswith("ptrace -1 "), out
    assert out[2].startswith("mem refused") and out[3].startswith("environ refused"), out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_job_cannot_spend_larknsd_s_descriptors_through_its_relay(
    pool: Pool, daemon: Larknsd
) -> None:
    """A job opens 200 connections to its chirp relay and keeps them: larknsd
    carries 32 (each holds two of its descriptors), turns the rest away, and
    serves another job meanwhile."""
    hog = textwrap.dedent(f"""\
        import os, socket, time
        port = int(open(os.environ["_CONDOR_CHIRP_CONFIG"]).read().split()[1])
        held, alive = [], 0
        for _ in range(200):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        time.sleep(1)
        for s in held:
            s.setblocking(False)
            try:
                if s.recv(1):
                    alive += 1
            except BlockingIOError:
                alive += 1  # open, nothing to read: carried
            except OSError:
                pass  # reset: turned away
        print(alive, flush=True)
        open("{pool.home}/hog.ready", "w").close()
        time.sleep(20)
        """)
    (pool.home / "hog.py").write_text(hog)
    os.chown(pool.home / "hog.py", USER_UID, USER_UID)
    ready = pool.home / "hog.ready"
    ready.unlink(missing_ok=True)
    before = _fds(daemon.proc.pid)
    cluster = pool.submit(JOB.format(script="/usr/bin/python3 hog.py", tag="hog"))
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert time.monotonic() < deadline, "the job did not open its connections"
        time.sleep(0.5)
    during = _fds(daemon.proc.pid)
    other = pool.submit(JOB.format(script="exit 7", tag="beside"))
    assert pool.wait_done(other)["ExitCode"] == "7"
    ad = pool.wait_done(cluster)
    carried = int((pool.home / "hog.out").read_text())
    assert ad["ExitCode"] == "0", ad
    assert carried == 32, carried
    # Two per carried connection, and the job's own (its connection, keeper,
    # relays' listeners: ~20): not two for each of the 200.
    assert during - before <= 2 * 32 + 32, (before, during)
