"""Jobs of a real one-node HTCondor pool, each in its own network by larkns.

The pool (tests/condor.py) runs in the simulated worker with larknsd beside
it and larkns's wrapper as its USER_JOB_WRAPPER; jobs are submitted by an
unprivileged user.  These tests need HTCondor: the build in
../shared/htcondor, or an installed one.  Without either they are skipped,
except under CI (CI set), where they are required.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.condor import RESOLVER, USER_UID, Pool, larkns_config, require_htcondor
from tests.jobside import hook_script, wrapper_copy
from tests.test_daemon import Larknsd
from tests.world import PEER, PORT, SITE4, SITE6, WORKER4, WORKER6, World, sh

ROUTED6 = "2001:db8:100::/56"
# An address of the site outside its own prefixes, for the license server.
LICENSE4 = "198.18.1.1"


def node_config(world: World, copy: Path, *args: str, **knobs: str) -> str:
    """What a site installs on a node (larkns-condor-config): the job-side
    programs into `copy`/bin, running the copy of the modules there, and the
    configuration, with every larkns knob in it (the world's and `knobs`):
    larknsd reads them from there alone."""
    sock = f"/tmp/{world.prefix}-larknsd.sock"
    settings = {k: v for k, v in world.env().items() if k.startswith("LARKNS_")}
    settings |= knobs | {"LARKNS_SOCKET": sock}
    return larkns_config(
        f"--entry-dir={copy / 'bin'}",
        "--python=/usr/bin/python3",
        f"--pythonpath={copy}",
        *args,
        *(f"--set={k}={v}" for k, v in settings.items()),
    )


@pytest.fixture(scope="module")
def node(world: World) -> Iterator[tuple[Pool, Larknsd]]:
    require_htcondor()
    copy = wrapper_copy()
    # What a site adds: the wrapper, the hook, the machine ad's cron job and
    # WantIOProxy for every job, so that larknsd can publish through chirp.
    config = node_config(
        world,
        copy,
        "--cron-period=5s",
        # Jobs may ask for "none" themselves (+LarkNetworkType).
        LARKNS_ALLOWED_NETWORK_TYPES="nat,none,routed",
        # The site routes this prefix to the worker (a test adds the route).
        LARKNS_ROUTED_IPV6_PREFIX=ROUTED6,
        # The site's prefixes are a traffic class of their own.
        LARKNS_CLASSES="Site = 198.18.0.0/24, 2001:db8:0:1::/64",
        # Updates every 2 s (not 60) so a test sees one.
        LARKNS_UPDATE_INTERVAL="2",
        # The type as the site decides it from the job's ad.
        LARKNS_NETWORK_TYPE='ifThenElse(LktLoopbackOnly =?= true, "none", "nat")',
        # The "license server" (an address a test gives the site) only for
        # jobs whose ad says they hold a license.
        LARKNS_DESTINATIONS=f"license = {LICENSE4}/32 tcp {PORT}",
        LARKNS_POLICY='ifThenElse(LktLicensed =?= true, "open", "open -license")',
        # A job's cap is what it asks of the node's bandwidth (Mbit/s), a
        # resource the negotiator hands out: MACHINE_RESOURCE_Bandwidth below;
        # or a rate its ad names (LktCap), within LARKNS_BANDWIDTH_MAX too.
        LARKNS_BANDWIDTH="ifThenElse(LktCap =!= undefined, LktCap, "
        "ifThenElse(RequestBandwidth =?= undefined || RequestBandwidth <= 0, "
        'undefined, strcat(RequestBandwidth, "mbit")))',
        LARKNS_BANDWIDTH_MAX="100mbit",
        # Jobs share the uplink by weight; those whose ad says so weigh 3.
        LARKNS_UPLINK_BANDWIDTH="1gbit",
        LARKNS_UPLINK="up0",
        LARKNS_WEIGHT="ifThenElse(LktHeavy =?= true, 3, 1)",
    )
    # 100 Mbit/s for the node to hand out to its jobs.
    config += "MACHINE_RESOURCE_Bandwidth = 100\n"
    p = Pool(world, extra_config=config, start=False)
    try:
        # larknsd knows the node's starter and startd from the pool's
        # configuration, and takes its knobs from there alone.
        d = Larknsd.under_condor(world, p.config, copy)
    except BaseException:
        p.close()
        raise
    try:
        p.start()
        # The job's own files, readable by its user whatever the checkout's modes.
        shutil.copy(PEER, p.home / "peer.py")
        os.chown(p.home / "peer.py", USER_UID, USER_UID)
        yield p, d
    finally:
        p.close()
        err = d.stop()
    assert p.pids() == [], "the pool left processes behind"
    assert d.proc.returncode == 0, err
    # With the pool and the daemon stopped, nothing of larkns is left.
    assert world.wait_no_leftovers() == []
    assert not Path("/tmp/hsperfdata_lktcondor").exists(), "the pool left a JVM probe's files"


@pytest.fixture(scope="module")
def pool(node: tuple[Pool, Larknsd]) -> Pool:
    return node[0]


@pytest.fixture(scope="module")
def daemon(node: tuple[Pool, Larknsd]) -> Larknsd:
    return node[1]


JOB = """\
    executable = /bin/sh
    arguments = "-c '{script}'"
    output = {tag}.out
    error = {tag}.err
    log = {tag}.log
    should_transfer_files = NO
    queue
    """


def test_a_job_submitted_by_a_user_runs_and_keeps_its_exit_code(pool: Pool) -> None:
    cluster = pool.submit(JOB.format(script="echo hello from $(id -un); exit 3", tag="exit"))
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "3", ad
    assert ad["Owner"] == "lktuser"
    assert (pool.home / "exit.out").read_text() == "hello from lktuser\n"


def test_a_job_has_its_own_network_and_reaches_the_site_over_both_families(
    pool: Pool, world: World
) -> None:
    worker_ns = sh("readlink", "/proc/self/ns/net", ns=world.worker).stdout.strip()
    script = (
        "readlink /proc/self/ns/net; "
        f"/usr/bin/python3 peer.py tcp {SITE4} {PORT}; /usr/bin/python3 peer.py tcp {SITE6} {PORT}"
    )
    cluster = pool.submit(JOB.format(script=script, tag="net"))
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "net.err").read_text())
    ns, v4, v6 = (pool.home / "net.out").read_text().splitlines()
    assert ns != worker_ns  # not the starter's network namespace
    assert json.loads(v4)["seen_as"] == WORKER4  # NAT44 on the worker
    assert json.loads(v6)["seen_as"] == WORKER6  # NAT66


# The cgroup tests' job: its first line is its cgroup as it started; then
# it writes MiB (its second argument), burns 3 s of CPU and says "ready",
# and ends when the file named by its first argument appears.
CGROUP_JOB = """\
import os, sys, time
print(open("/proc/self/cgroup").read().strip(), flush=True)
held = b"\\1" * (int(sys.argv[2]) << 20)
t = time.process_time()
while time.process_time() - t < 3:
    pass
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.1)
"""
CGROUP_SUBMIT = JOB.replace("    queue\n", "    request_memory = {memory}\n    queue\n")
# cgroup v2 alone, as sites' systemd mounts it (Debian 12, EL9).  This
# machine's hybrid layout has cpu and memory on v1, where HTCondor's starter
# says "Cgroup cpu,cpuacct// is not writeable, cannot use cgroups" and
# tracks the job's processes without one (../shared/htcondor/FACTS.md).
CGROUP_V2 = pytest.mark.skipif(
    not Path("/sys/fs/cgroup/cgroup.controllers").exists(),
    reason="hybrid cgroups here (cpu and memory on v1): HTCondor's starter makes no "
    "cgroup for a job, so there is none to start it in; the VM tier (python -m "
    "tests.vm: cgroup v2 alone) runs this",
)


def _cgroup_job(pool: Pool, go: Path, mib: int, memory_mb: int) -> int:
    """Submit the cgroup tests' job; its cluster."""
    job = pool.home / "cg.py"
    job.write_text(CGROUP_JOB)
    os.chown(job, USER_UID, USER_UID)
    go.unlink(missing_ok=True)
    return pool.submit(
        CGROUP_SUBMIT.format(
            script=f"exec /usr/bin/python3 cg.py {go} {mib}", tag="cg", memory=memory_mb
        )
    )


def _cgroup(pid: int) -> str:
    """Process `pid`'s cgroup v2 path."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"process {pid} is in no cgroup v2")


def _parent(pid: int) -> int:
    """Process `pid`'s parent; 0 if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return 0


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        pid = _parent(pid)
        out.append(pid)
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@CGROUP_V2
def test_the_job_starts_in_the_cgroup_htcondor_made_for_it_which_counts_it(
    pool: Pool, daemon: Larknsd
) -> None:
    """larknsd (not the starter) forks the job, into the wrapper's cgroup
    (CLONE_INTO_CGROUP): the job is in it from its first instruction, and
    HTCondor's accounting, which reads that cgroup, counts the job's CPU
    and memory, although the job descends from larknsd, not the starter."""
    go = pool.home / "cg.go"
    cluster = _cgroup_job(pool, go, mib=160, memory_mb=512)
    out = pool.home / "cg.out"
    deadline = time.monotonic() + 90
    while not (out.exists() and "ready" in out.read_text()):
        assert time.monotonic() < deadline, f"the job never got ready: {_why(pool, cluster, 'cg')}"
        time.sleep(0.2)
    try:
        # The job (its python, found by its arguments) and its starter.
        (pid,) = [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and _cmdline(int(p))[1:3] == ["cg.py", str(go)]
        ]
        starters = [p for p in pool.pids() if _comm(p) == "condor_starter"]
        # The wrapper, the starter's child (in a mount namespace of the
        # job's own, which HTCondor makes on cgroup v2: not the pool's).
        (wrapper,) = [
            p
            for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if _parent(p) in starters and not _comm(p).startswith("condor_")
        ]
        cgroup, wrapper_cgroup = _cgroup(pid), _cgroup(wrapper)
        larknsd_cgroup = _cgroup(daemon.proc.pid)
        starter_cgroups = [_cgroup(s) for s in starters]
        started_in = out.read_text().splitlines()[0]
        ancestry = _ancestors(pid)
        procs = Path(f"/sys/fs/cgroup{cgroup}/cgroup.procs").read_text().split()
    finally:
        go.touch()
    # Forked by larknsd's keeper, not by the starter...
    assert daemon.proc.pid in ancestry and not set(starters) & set(ancestry), ancestry
    # ...yet in the cgroup the starter made for the wrapper, not larknsd's
    # nor the starter's own, from the start (its first line) and all along.
    assert cgroup == wrapper_cgroup != larknsd_cgroup, (cgroup, wrapper_cgroup, larknsd_cgroup)
    assert cgroup not in starter_cgroups, (cgroup, starter_cgroups)
    assert started_in == f"0::{cgroup}", started_in
    assert str(pid) in procs, procs
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "cg.err").read_text())
    usage = {k: v for k, v in ad.items() if "Cpu" in k or "Memory" in k or "Size" in k}
    # HTCondor's own accounting of that cgroup: the 3 s of CPU and the
    # 160 MiB are the job's; the wrapper only waits (it has a few MiB and
    # no CPU to speak of).  The ad has whole seconds: 2.0 for 2 s burnt,
    # and 162.7 MiB for 160 in the guest.  User and system together: under
    # emulation the kernel once booked the 2 s as 1.0 user and 2.0 system.
    cpu = float(ad["RemoteUserCpu"]) + float(ad.get("RemoteSysCpu", "0"))
    assert cpu >= 2, usage
    assert int(ad["ResidentSetSize_RAW"]) >= 150 * 1024, usage


@CGROUP_V2
def test_a_job_over_its_memory_request_is_held_by_the_limit_of_htcondors_cgroup(
    pool: Pool,
) -> None:
    """The memory limit HTCondor sets on the cgroup it made for the job
    binds the processes larknsd started in it: 640 MiB written against a
    request of 128 MB, and the kernel's OOM killer ends the job.  (The
    schedd may run it in the claim of an earlier job of the same user,
    512 MB: its limit is then that claim's.)"""
    go = pool.home / "cg.go"
    cluster = _cgroup_job(pool, go, mib=640, memory_mb=128)
    try:
        ad = _wait_status(pool, cluster, "5", timeout=90)  # held
    finally:
        go.touch()
    reason = ad.get("HoldReason", "")
    assert "Job has gone over cgroup memory limit" in reason, _why(pool, cluster, "cg")
    pool.run("condor_rm", str(cluster), user=True)
    pool.wait_done(cluster)


def _why(pool: Pool, cluster: int, tag: str) -> str:
    """What the pool says of a job that did not get going: its state, its
    files and the end of the starter's log."""
    ad = pool.queue_ad(cluster) or pool.history(cluster)
    keys = ("JobStatus", "HoldReason", "NumJobStarts", "LastVacateReason", "ExitCode")
    said = [f"{k}={ad[k]}" for k in keys if k in ad]
    for ext in ("out", "err"):
        f = pool.home / f"{tag}.{ext}"
        said.append(f"{tag}.{ext}: {f.read_text()[-500:] if f.exists() else '(none)'}")
    for log in sorted((pool.dir / "local" / "log").glob("StarterLog*")):
        said.append(f"{log.name}:\n" + "\n".join(log.read_text().splitlines()[-25:]))
    return "\n".join(said)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


def test_the_jobs_bytes_show_in_the_queue_while_it_runs_and_in_history_after(pool: Pool) -> None:
    n, size, reply = 30, 1000, 400
    script = f"/usr/bin/python3 peer.py udp {SITE4} {PORT} {n} {size} {reply} && sleep 8"
    cluster = pool.submit(JOB.format(script=script, tag="bytes"))
    # While it runs: the wrapper's periodic update (every 2 s here).
    deadline = time.monotonic() + 60
    running: dict[str, str] = {}
    while time.monotonic() < deadline:
        running = pool.queue_ad(cluster)
        if int(running.get("NetworkOutgoing", "0")) > 0:
            break
        time.sleep(0.5)
    assert int(running.get("NetworkOutgoing", "0")) == n * (28 + size), running
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "bytes.err").read_text())
    # Exact: UDP, L3 bytes (20 + 8 header bytes per datagram), IPv4 only.
    assert int(ad["NetworkOutgoing"]) == n * (28 + size)
    assert int(ad["NetworkIncoming"]) == n * (28 + reply)
    # The per-class attributes: all of it was with the site
    assert int(ad["LarkNetworkOutgoingSite"]) == n * (28 + size)
    assert int(ad["LarkNetworkIncomingSite"]) == n * (28 + reply)
    # Accounting that adds up every numeric attribute whose name starts with
    # "Network" (OSG's Gratia probe) gets the job's total, none of it twice.
    network = {k: int(v) for k, v in ad.items() if k.startswith("Network") and v.isdigit()}
    assert sum(network.values()) == n * (28 + size) + n * (28 + reply), network
    assert int(ad["LarkNetworkOutgoingIPv6"]) == 0
    assert ad["LarkAssignedNetworkType"] == "nat"
    assert ad["LarkIPv4Address"].startswith("198.19.")
    assert ad["WantIOProxy"] == "true"


def test_a_restart_of_larknsd_leaves_a_running_job_undisturbed(pool: Pool, daemon: Larknsd) -> None:
    """larknsd is killed and started anew while the job runs: the job runs on
    in its network, and its ad counts all its bytes, before and after."""
    n, size, reply = 10, 1000, 400
    send = f"/usr/bin/python3 peer.py udp {SITE4} {PORT} {n} {size} {reply}"
    go = pool.home / "restart.go"
    script = (
        f"{send} && echo pid=$$ && while [ ! -e {go} ]; do sleep 0.1; done && {send} && echo pid=$$"
    )
    cluster = pool.submit(JOB.format(script=script, tag="restart"))
    out = pool.home / "restart.out"
    deadline = time.monotonic() + 60
    while not (out.exists() and "pid=" in out.read_text()):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    err = daemon.restart(signal.SIGKILL)
    go.touch()
    try:
        ad = pool.wait_done(cluster)
    finally:
        go.unlink()
    assert ad["ExitCode"] == "0", (ad, err, (pool.home / "restart.err").read_text())
    first, second = [x for x in out.read_text().split() if x.startswith("pid=")]
    assert first == second  # one and the same job
    assert int(ad["NetworkOutgoing"]) == 2 * n * (28 + size)
    assert int(ad["NetworkIncoming"]) == 2 * n * (28 + reply)
    assert "attached to larknsd again" in (pool.home / "restart.err").read_text()


def test_a_job_killed_by_a_signal_shows_that_signal(pool: Pool) -> None:
    cluster = pool.submit(JOB.format(script="kill -KILL $$", tag="sig"))
    ad = pool.wait_done(cluster)
    assert ad.get("ExitBySignal") == "true", ad
    assert ad.get("ExitSignal") == "9", ad


def test_condor_rm_ends_a_running_job_and_its_network(pool: Pool, world: World) -> None:
    cluster = pool.submit(JOB.format(script="echo started; exec sleep 300", tag="rm"))
    out = pool.home / "rm.out"
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().strip() == "started"):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    jobs = world.state_dir / "jobs"
    assert jobs.exists() and list(jobs.iterdir()), "no job network while the job runs"
    pool.run("condor_rm", str(cluster), user=True)
    ad = pool.wait_done(cluster, timeout=60)
    assert ad["JobStatus"] == "3", ad  # removed
    deadline = time.monotonic() + 20
    while jobs.exists() and list(jobs.iterdir()):
        assert time.monotonic() < deadline, "the job's network outlived condor_rm"
        time.sleep(0.2)


def test_condor_chirp_inside_the_job_reaches_its_starter(pool: Pool) -> None:
    chirp = f"{pool.release}/libexec/condor_chirp"
    cluster = pool.submit(JOB.format(script=f"{chirp} set_job_attr LktFromJob 42", tag="chirp"))
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "chirp.err").read_text())
    assert ad.get("LktFromJob") == "42"


def test_a_job_whose_network_cannot_be_built_is_held_with_the_reason(
    pool: Pool, daemon: Larknsd
) -> None:
    # The hook is read at each job start: point it at a larknsd that is not
    # there for this one job.
    hook_script(daemon.copy, "/tmp/lkt-no-larknsd.sock")
    try:
        cluster = pool.submit(JOB.format(script="echo ran", tag="held"))
        deadline = time.monotonic() + 60
        ad: dict[str, str] = {}
        while time.monotonic() < deadline:
            ad = pool.queue_ad(cluster)
            if ad.get("JobStatus") == "5":
                break
            time.sleep(0.5)
    finally:
        hook_script(daemon.copy, daemon.socket)
    assert ad.get("JobStatus") == "5", ad  # held, not run without its network
    assert "larkns: cannot reach larknsd" in ad.get("HoldReason", ""), ad
    assert (
        not (pool.home / "held.out").exists() or "ran" not in (pool.home / "held.out").read_text()
    )
    pool.run("condor_rm", str(cluster), user=True)


def test_a_loopback_resolver_of_the_node_answers_inside_the_job(pool: Pool, world: World) -> None:
    # The worker's resolver, as systemd-resolved would be: on 127.0.0.53.
    dns = subprocess.Popen(
        world.worker_cmd(
            sys.executable, str(Path(PEER).parent / "fakedns.py"), RESOLVER, "198.18.0.99"
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert dns.stdout is not None and dns.stdout.readline().strip() == "ready"
        cluster = pool.submit(JOB.format(script="getent hosts lkt-service.test", tag="dns"))
        ad = pool.wait_done(cluster)
        assert ad["ExitCode"] == "0", (ad, (pool.home / "dns.err").read_text())
        assert (pool.home / "dns.out").read_text().split() == ["198.18.0.99", "lkt-service.test"]
    finally:
        dns.kill()
        dns.wait()
        if dns.stdout:
            dns.stdout.close()


def test_the_machine_ad_says_what_the_node_offers(pool: Pool) -> None:
    # A test before points the job-side programs at no larknsd for a while:
    # the cron job (every 5 s) then says false until it runs again.
    deadline = time.monotonic() + 90
    ad: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = pool.run("condor_status", "-l", check=False).stdout
        ad = {k: v for k, v in (line.partition(" = ")[::2] for line in out.splitlines())}
        if ad.get("LarkAvailable") == "true":
            break
        time.sleep(1)
    assert ad.get("LarkAvailable") == "true", ad
    assert ad.get("LarkNetworkTypes") == '"nat,routed,none"'
    assert ad.get("LarkHasIPv4") == "true" and ad.get("LarkHasIPv6") == "true"
    assert ad.get("LarkNetworkPolicies") == "true"
    assert ad.get("LarkDestinationSets") == '"license"'
    assert ad.get("LarkNetworkShaping") == "true"
    assert ad.get("LarkUplinkBandwidthDown") == ad.get("LarkUplinkBandwidthUp") == "1000000000"
    # and a job can require it
    cluster = pool.submit(
        JOB.replace("queue", "requirements = LarkHasIPv6\n    queue").format(
            script="true", tag="req"
        )
    )
    assert pool.wait_done(cluster)["ExitCode"] == "0"


def _wait_status(pool: Pool, cluster: int, status: str, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    ad: dict[str, str] = {}
    while time.monotonic() < deadline:
        ad = pool.queue_ad(cluster)
        if ad.get("JobStatus") == status:
            return ad
        time.sleep(0.3)
    raise AssertionError(f"job {cluster} never reached status {status}: {ad}")


def _ticks(pool: Pool, tag: str) -> int:
    out = pool.home / f"{tag}.out"
    return len(out.read_text().split()) if out.exists() else 0


def test_suspend_and_continue_stop_and_resume_the_job(pool: Pool) -> None:
    cluster = pool.submit(JOB.format(script="while true; do echo t; sleep 0.2; done", tag="susp"))
    deadline = time.monotonic() + 60
    while _ticks(pool, "susp") < 3:
        assert time.monotonic() < deadline, "the job never ticked"
        time.sleep(0.2)
    pool.run("condor_suspend", str(cluster), user=True)
    _wait_status(pool, cluster, "7")  # suspended
    time.sleep(1)
    frozen = _ticks(pool, "susp")
    time.sleep(1.5)
    assert _ticks(pool, "susp") == frozen, "the job kept running while suspended"
    pool.run("condor_continue", str(cluster), user=True)
    deadline = time.monotonic() + 30
    while _ticks(pool, "susp") <= frozen:
        assert time.monotonic() < deadline, "the job did not resume"
        time.sleep(0.2)
    pool.run("condor_rm", str(cluster), user=True)
    pool.wait_done(cluster)


def test_hold_and_release_rerun_the_job_in_a_fresh_network(pool: Pool, world: World) -> None:
    cluster = pool.submit(JOB.format(script="echo run; sleep 300", tag="hold"))
    _wait_status(pool, cluster, "2")
    pool.run("condor_hold", str(cluster), user=True)
    _wait_status(pool, cluster, "5")
    jobs = world.state_dir / "jobs"
    deadline = time.monotonic() + 20
    while jobs.exists() and list(jobs.iterdir()):
        assert time.monotonic() < deadline, "a held job kept its network"
        time.sleep(0.2)
    pool.run("condor_release", str(cluster), user=True)
    _wait_status(pool, cluster, "2")
    pool.run("condor_rm", str(cluster), user=True)
    pool.wait_done(cluster)


def _held(pool: Pool, cluster: int) -> dict[str, str]:
    return _wait_status(pool, cluster, "5")


def test_a_job_may_ask_for_no_network_when_the_site_allows_it(pool: Pool) -> None:
    job = JOB.replace("queue", '+LarkNetworkType = "none"\n    queue')
    cluster = pool.submit(job.format(script="ip -o link | cut -d: -f2", tag="none"))
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "none.err").read_text())
    assert (pool.home / "none.out").read_text().split() == ["lo"]
    assert ad["LarkAssignedNetworkType"] == "none"


def test_a_job_may_ask_for_a_routed_network_and_the_site_sees_it_as_itself(
    pool: Pool, world: World
) -> None:
    sh("ip", "-6", "route", "add", ROUTED6, "via", WORKER6, ns=world.site)
    try:
        job = JOB.replace("queue", '+LarkNetworkType = "routed"\n    queue')
        script = f"/usr/bin/python3 peer.py udp {SITE6} {PORT} 2 10 60"
        cluster = pool.submit(job.format(script=script, tag="routed"))
        ad = pool.wait_done(cluster)
    finally:
        sh("ip", "-6", "route", "del", ROUTED6, ns=world.site, check=False)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "routed.err").read_text())
    assert ad["LarkAssignedNetworkType"] == "routed"
    seen = json.loads((pool.home / "routed.out").read_text())["seen_as"]
    # No NAT: the site sees the job's own address, of the routed prefix.
    assert ipaddress.IPv6Address(seen) in ipaddress.IPv6Network(ROUTED6)
    assert seen in ad["LarkIPv6Addresses"]


def test_the_license_server_admits_a_licensed_job_and_refuses_another_at_once(
    pool: Pool, world: World
) -> None:
    """LARKNS_POLICY over the job ad: open for a job that says it holds a
    license, "open -license" for the others, whose connect is refused at
    once and counted in the job ad."""
    sh("ip", "addr", "replace", f"{LICENSE4}/32", "dev", "lo", ns=world.site)
    try:
        script = f"/usr/bin/python3 peer.py tcp {LICENSE4} {PORT}"
        licensed = JOB.replace("queue", "+LktLicensed = true\n    queue")
        ok = pool.submit(licensed.format(script=script, tag="licensed"))
        barred = pool.submit(JOB.format(script=script, tag="barred"))
        ok_ad = pool.wait_done(ok)
        barred_ad = pool.wait_done(barred)
    finally:
        sh("ip", "addr", "del", f"{LICENSE4}/32", "dev", "lo", ns=world.site, check=False)
    assert ok_ad["ExitCode"] == "0", (ok_ad, (pool.home / "licensed.err").read_text())
    assert ok_ad["LarkNetworkPolicy"] == "open"
    assert barred_ad["ExitCode"] != "0"
    assert "Connection refused" in (pool.home / "barred.err").read_text()
    assert barred_ad["LarkNetworkPolicy"] == "open -license"
    assert int(barred_ad["LarkNetworkRefusedPackets"]) >= 1, barred_ad
    assert int(ok_ad.get("LarkNetworkRefusedPackets", "0")) == 0


def test_a_job_asking_for_a_type_the_site_does_not_allow_is_held(pool: Pool) -> None:
    job = JOB.replace("queue", '+LarkNetworkType = "bridge"\n    queue')
    cluster = pool.submit(job.format(script="echo ran", tag="bad"))
    ad = _held(pool, cluster)
    assert "LarkNetworkType: the job asks for 'bridge'" in ad.get("HoldReason", ""), ad
    pool.run("condor_rm", str(cluster), user=True)


def test_a_pool_jobs_mount_namespace_holds_no_network_namespace(pool: Pool) -> None:
    # The pool's /run/netns holds the test world's namespaces; a job's copy
    # of it, a peer, would receive every later job's (N squared mounts).
    script = "grep -c /run/netns/ /proc/self/mountinfo; exit 0"
    cluster = pool.submit(JOB.format(script=script, tag="mounts"))
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", ad
    assert (pool.home / "mounts.out").read_text().strip() == "0"


def test_a_job_whose_cap_is_above_the_maximum_is_held_never_run_unshaped(pool: Pool) -> None:
    job = JOB.replace("queue", '+LktCap = "500mbit"\n    queue')
    cluster = pool.submit(job.format(script="echo ran", tag="overcap"))
    ad = _held(pool, cluster)
    reason = ad.get("HoldReason", "")
    assert "500mbit/500mbit is above LARKNS_BANDWIDTH_MAX (100mbit/100mbit)" in reason, ad
    pool.run("condor_rm", str(cluster), user=True)


def test_request_bandwidth_in_a_submit_file_becomes_the_job_s_cap_and_is_not_overcommitted(
    pool: Pool, world: World
) -> None:
    """The node's bandwidth is a machine resource: a job asking for 30 Mbit/s
    runs capped at 30 (HTB on its veth, download, and on its IFB, upload);
    two jobs asking for 60 each of the node's 100 never run at once."""
    capped = JOB.replace("queue", "request_bandwidth = 30\n    +LktHeavy = true\n    queue")
    cluster = pool.submit(capped.format(script="sleep 6", tag="capped"))
    _wait_status(pool, cluster, "2")
    deadline = time.monotonic() + 20
    classes = ""
    while time.monotonic() < deadline and "rate 30Mbit" not in classes:
        ifbs = sh("ip", "-o", "link", "show", "type", "ifb", ns=world.worker).stdout
        names = [line.split(": ")[1] for line in ifbs.splitlines()]
        # check=False: an IFB listed may be gone by the time it is read (a
        # finished job's, parked or removed by larknsd meanwhile).
        classes = "".join(
            sh("tc", "class", "show", "dev", n, ns=world.worker, check=False).stdout for n in names
        )
        time.sleep(0.2)
    assert "rate 30Mbit ceil 30Mbit" in classes, classes
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0"
    # The job's ad says the cap it had (bits/s, both ways).
    assert ad["LarkNetworkCapDown"] == ad["LarkNetworkCapUp"] == "30000000", ad
    # ... and its weight in the uplink's share, from its ad (LARKNS_WEIGHT)
    assert ad["LarkNetworkWeight"] == "3", ad

    greedy = JOB.replace("queue", "request_bandwidth = 60\n    queue")
    first = pool.submit(greedy.format(script="sleep 4", tag="greedy1"))
    second = pool.submit(greedy.format(script="sleep 4", tag="greedy2"))
    ads = [pool.wait_done(first), pool.wait_done(second)]
    assert all(ad["ExitCode"] == "0" for ad in ads), ads
    (s1, e1), (s2, e2) = ((int(a["JobCurrentStartDate"]), int(a["CompletionDate"])) for a in ads)
    assert s2 >= e1 or s1 >= e2, ads  # one after the other


def test_a_job_of_the_pool_leaves_a_ledger_row_as_its_ad_counts_it(
    pool: Pool, world: World
) -> None:
    """The node's ledger keeps the job with its identity from its ad, and the
    bytes its ad says; `larkns report --from-history` finds it in the pool's
    history with the same bytes."""
    from larkns.ledger import Ledger
    from tests.world import larkns_bin

    n, size, reply = 8, 700, 300
    script = f"/usr/bin/python3 peer.py udp {SITE4} {PORT} {n} {size} {reply}"
    cluster = pool.submit(JOB.format(script=script, tag="ledger"))
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "0", (ad, (pool.home / "ledger.err").read_text())
    with Ledger(world.lib_dir / "ledger.sqlite", create=False) as db:
        (row,) = db.jobs("global_job_id = ?", (ad["GlobalJobId"],))
    assert (row["job_id"], row["owner"], row["source"]) == (f"{cluster}.0", "lktuser", "condor")
    assert row["bytes_out"] == int(ad["NetworkOutgoing"]) == n * (28 + size)
    assert row["bytes_in"] == int(ad["NetworkIncoming"])
    site_out = ad.get("LarkNetworkOutgoingSite", ad.get("NetworkOutgoingSite"))
    assert row["classes"]["Site"]["bytes_out"] == int(site_out or -1)
    assert (row["exit_code"], row["type"]) == (0, "nat")
    out = pool.run(larkns_bin(), "report", "--from-history", "--by", "job", "--format", "json")
    found = {r["key"]: r for r in json.loads(out.stdout)["rows"]}
    assert found[ad["GlobalJobId"]]["bytes_out"] == row["bytes_out"]
    assert found[ad["GlobalJobId"]]["bytes_in"] == row["bytes_in"]
