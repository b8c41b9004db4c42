"""larkns-condor-config: the HTCondor configuration a site installs, and the
job-side programs it names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from larkns import config

TOOL = str(Path(sys.executable).parent / "larkns-condor-config")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOOL, *args], capture_output=True, text=True, timeout=30, env=env)


def test_the_configuration_names_this_installation_s_programs(tmp_path: Path) -> None:
    entry = tmp_path / "libexec"
    out = run(
        "--bindir=/opt/lk/bin",
        f"--entry-dir={entry}",
        "--set",
        "LARKNS_CLASSES = Campus = 198.18.0.0/15",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"USER_JOB_WRAPPER = {entry}/larkns-wrapper" in lines
    assert f"LARKNS_HOOK_PREPARE_JOB = {entry}/larkns-prepare-job" in lines
    assert f"STARTD_CRON_LARKNS_EXECUTABLE = {entry}/larkns-machine-ad" in lines
    assert "   SET WantIOProxy true" in lines
    assert "LARKNS_CLASSES = Campus = 198.18.0.0/15" in lines
    # larknsd under systemd by default: the master's lines are comments.
    assert "# DAEMON_LIST = $(DAEMON_LIST) LARKNSD" in lines
    master = run("--bindir=/opt/lk/bin", "--under-master", "--no-install").stdout.splitlines()
    assert "DAEMON_LIST = $(DAEMON_LIST) LARKNSD" in master
    assert "LARKNSD = /opt/lk/bin/larknsd" in master


def test_the_job_side_programs_are_static_root_s_and_know_the_socket(tmp_path: Path) -> None:
    entry = tmp_path / "libexec"
    out = run(
        f"--entry-dir={entry}",
        "--python=/usr/bin/python3",
        "--set=LARKNS_SOCKET=/run/lkt-site.sock",
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in entry.iterdir()) == [
        "larkns-job.conf",
        "larkns-machine-ad",
        "larkns-prepare-job",
        "larkns-wrapper",
    ]
    for p in entry.iterdir():
        st = p.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, p
    conf = (entry / "larkns-job.conf").read_text().splitlines()
    assert "python=/usr/bin/python3" in conf
    assert "socket=/run/lkt-site.sock" in conf
    # No dynamic loader, so nothing of LD_PRELOAD's runs before its first line.
    elf = (entry / "larkns-wrapper").read_bytes()
    assert b"/ld-linux" not in elf[:4096] and b".interp" not in elf


def test_a_directory_others_may_write_to_is_refused(tmp_path: Path) -> None:
    entry = tmp_path / "shared"
    entry.mkdir(mode=0o777)
    entry.chmod(0o777)
    out = run(f"--entry-dir={entry}")
    assert out.returncode == 2 and "writable by root only" in out.stderr
    assert list(entry.iterdir()) == []


def test_by_default_the_programs_go_beside_the_installation() -> None:
    out = run("--no-install")
    prefix = Path(TOOL).resolve().parent.parent
    assert f"USER_JOB_WRAPPER = {prefix / 'libexec' / 'larkns' / 'larkns-wrapper'}" in out.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "LARKNS_CLASES=x"], "LARKNS_CLASES is no larkns knob"),
        (["--set", "novalue"], "expected NAME=VALUE"),
        (["--set", "LARKNS_SOCKET=relative.sock"], "LARKNS_SOCKET: expected an absolute path"),
        (["--set", "LARKNS_IPV4_POOL=10.0.0.0/33"], "LARKNS_IPV4_POOL"),
        (["--entry-dir", "relative/w"], "expected an absolute path"),
        (["--cron-period", "often"], "--cron-period"),
    ],
)
def test_bad_arguments_get_a_one_line_error(args: list[str], words: str) -> None:
    out = run("--no-install", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_file_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "50-larkns.conf"
    target.write_text("old\n")
    assert run("--no-install", "-o", str(target)).returncode == 0
    assert target.read_text().startswith("# larkns:")
    assert [p.name for p in tmp_path.iterdir()] == ["50-larkns.conf"]


def test_every_knob_it_writes_is_what_larkns_then_reads(tmp_path: Path) -> None:
    """Each knob set through larkns-condor-config reaches larkns's settings
    through the HTCondor configuration alone (no LARKNS_* in the
    environment), as larknsd under condor_master or systemd reads it."""
    values = {
        "LARKNS_NETWORK_TYPE": "routed",
        "LARKNS_ALLOWED_NETWORK_TYPES": "nat, none",
        "LARKNS_CLASSES": "Campus = 198.18.0.0/15",
        "LARKNS_IPV4_POOL": "198.18.64.0/20",
        "LARKNS_IPV6_PREFIX": "fd00:1:2::/48",
        "LARKNS_STATE_DIR": "/run/lkt-state",
        "LARKNS_SOCKET": "/run/lkt-site.sock",
        "LARKNS_MAX_PREPARED_PER_USER": "7",
        "LARKNS_LIB_DIR": "/var/lib/lkt",
        "LARKNS_NETNS_PREFIX": "lktns-",
        "LARKNS_SLAAC_TIMEOUT": "3",
        "LARKNS_UPDATE_INTERVAL": "30",
        "LARKNS_REATTACH_TIMEOUT": "40",
        "LARKNS_ROUTED_IPV6_PREFIX": "2001:db8:100::/56",
        "LARKNS_ROUTED_IPV4_POOL": "198.18.128.0/24",
        "LARKNS_PROXY_ND": "up0",
        "LARKNS_BRIDGE": "lktbr0",
        "LARKNS_BRIDGE_IPV4_POOL": "198.18.200.0/24",
        "LARKNS_BRIDGE_IPV4": "dhcp",
        "LARKNS_CLAT": "on",
        "LARKNS_CLAT_TRANSLATOR": "tayga",
        "LARKNS_NAT64_PREFIX": "2001:db8:64::/96",
        "LARKNS_DHCP_TIMEOUT": "9",
        "LARKNS_INBOUND_PORTS": "40000-40999",
        "LARKNS_INBOUND_PORTS_PER_JOB": "8",
        "LARKNS_MAX_CONNECTIONS_PER_UID": "99",
        "LARKNS_BANDWIDTH": "100mbit/20mbit",
        "LARKNS_BANDWIDTH_MAX": "1gbit",
        "LARKNS_UPLINK_BANDWIDTH": "10gbit/5gbit",
        "LARKNS_UPLINK": "up0",
        "LARKNS_WEIGHT": 'ifThenElse(AcctGroup =?= "cms", 3, 1)',
        "LARKNS_METRICS": "127.0.0.1:9377",
        "LARKNS_LEDGER": "/var/lib/lkt/ledger.db",
        "LARKNS_LEDGER_DAYS": "30",
        "LARKNS_LEDGER_GROUP": "root",
        "LARKNS_POLICY": 'ifThenElse(Owner == "alice", "open", "internal-only -lic")',
        "LARKNS_DESTINATIONS": "lic = 198.18.5.10/32 tcp 27000-27010",
        "LARKNS_INTERNAL_CLASSES": "Campus",
    }
    assert set(values) == set(config.KNOBS), "a knob is missing from this test"
    text = run("--no-install", *(f"--set={k}={v}" for k, v in values.items())).stdout
    cfg = tmp_path / "condor_config"
    cfg.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LARKNS_", "_CONDOR_"))}
    env["CONDOR_CONFIG"] = str(cfg)
    probe = (
        "from larkns import config; s = config.load(); "
        "print(repr((s.mode, s.allowed_types, s.classes[0][0], str(s.ipv4_pool), "
        "str(s.ipv6_prefix), str(s.state_dir), str(s.socket), s.max_prepared_per_user, "
        "str(s.lib_dir), s.netns_prefix, s.slaac_timeout, s.update_interval, "
        "s.reattach_timeout, str(s.routed_ipv6_prefix), str(s.routed_ipv4_pool), s.proxy_nd, "
        "s.bridge, str(s.bridge_ipv4_pool), s.bridge_ipv4, s.clat, str(s.nat64_prefix), "
        "s.dhcp_timeout, s.inbound_ports, s.inbound_per_job, s.max_connections_per_uid, "
        "s.bandwidth, s.bandwidth_max, s.uplink_bandwidth, s.uplink, s.weight_expr, "
        "s.metrics, str(s.ledger), s.ledger_days, s.ledger_gid, "
        "s.policy_expr, s.destinations[0].text(), s.internal_classes)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(
        (
            "routed",
            ("nat", "none"),
            "Campus",
            "198.18.64.0/20",
            "fd00:1:2::/48",
            "/run/lkt-state",
            "/run/lkt-site.sock",
            7,
            "/var/lib/lkt",
            "lktns-",
            3.0,
            30.0,
            40.0,
            "2001:db8:100::/56",
            "198.18.128.0/24",
            "up0",
            "lktbr0",
            "198.18.200.0/24",
            "dhcp",
            "on",
            "2001:db8:64::/96",
            9.0,
            (40000, 40999),
            8,
            99,
            (100_000_000, 20_000_000),
            (1_000_000_000, 1_000_000_000),
            (10_000_000_000, 5_000_000_000),
            "up0",
            'ifThenElse(AcctGroup =?= "cms", 3, 1)',
            ("127.0.0.1", 9377),
            "/var/lib/lkt/ledger.db",
            30.0,
            0,
            'ifThenElse(Owner == "alice", "open", "internal-only -lic")',
            "lic = 198.18.5.10/32 tcp 27000-27010",
            ("Campus",),
        )
    )
