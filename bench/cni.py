"""The CNI reference point: a job's network through the CNI bridge plugin.

What a container runtime runs per job: `ip netns add`, the bridge plugin's
ADD (with host-local IPAM, IPv4 + IPv6, masquerade), the command in the
namespace, DEL, `ip netns del`: each a process, timed from here.  The plugin
makes its bridge and rules in the calling thread's network namespace: run it
inside a World's worker, never on the host's network.  Needs the CNI plugins
(Debian: containernetworking-plugins, in /usr/lib/cni; or /opt/cni/bin).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")


def plugin_dir() -> str | None:
    """Where the bridge and host-local plugins are, or None."""
    for d in PLUGIN_DIRS:
        if all(os.access(f"{d}/{p}", os.X_OK) for p in ("bridge", "host-local")):
            return d
    return None


class CniJobs:
    """Jobs on one CNI bridge network; `prefix` names every object made."""

    def __init__(self, prefix: str, ipv4: str, ipv6: str) -> None:
        found = plugin_dir()
        if found is None:
            raise RuntimeError(
                "no CNI plugins in " + " or ".join(PLUGIN_DIRS) + " "
                "(Debian/Ubuntu: apt-get install containernetworking-plugins)"
            )
        self.path = found
        self.prefix = prefix
        self.data_dir = Path(f"/run/{prefix}-cni")
        self.config = json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": f"{prefix}-cni",
                "type": "bridge",
                "bridge": f"{prefix[:8]}-br",
                "isGateway": True,
                "ipMasq": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": ipv4}], [{"subnet": ipv6}]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                    # Leases in the benchmark's own directory, never in
                    # /var/lib/cni.
                    "dataDir": str(self.data_dir),
                },
            }
        )

    def netns(self, job: str) -> str:
        return f"{self.prefix}-cni-{job}"

    def _plugin(self, command: str, job: str) -> None:
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": f"{self.prefix}-{job}",
            "CNI_NETNS": f"/run/netns/{self.netns(job)}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": self.path,
        }
        proc = subprocess.run(
            [f"{self.path}/bridge"], input=self.config, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            why = proc.stdout.strip() or proc.stderr.strip()
            raise RuntimeError(f"CNI bridge {command}: {why}")

    def run(self, job: str, *cmd: str) -> tuple[float, float]:
        """Set up, run `cmd` in the job's namespace, tear down: (seconds for
        the whole, seconds of the plugin's ADD and DEL alone)."""
        ns = self.netns(job)
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "add", ns], check=True)
        t1 = time.perf_counter()
        self._plugin("ADD", job)
        t2 = time.perf_counter()
        subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", *cmd], check=True)
        t3 = time.perf_counter()
        self._plugin("DEL", job)
        t4 = time.perf_counter()
        subprocess.run(["ip", "netns", "del", ns], check=True)
        return time.perf_counter() - t0, (t2 - t1) + (t4 - t3)

    def close(self) -> None:
        """Remove the bridge's leases directory (the bridge, its rules and the
        jobs' namespaces go with the World's worker)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
