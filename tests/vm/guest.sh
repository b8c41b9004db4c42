#!/bin/bash
# Runs inside the guest (larkns-vm.service), from the run's share at /mnt/run:
# installs larkns from a copy of the checkout the way the README says
# (./setup.sh), prints `larkns doctor`, runs the chosen tests, and leaves
# their results in the share.  The guest powers off after it.
set -u
R=/mnt/run
exec >>"$R/guest.log" 2>&1
# Each phase's end, for the host's timings (it stamps the line when it sees it).
mark() { echo "LARKNS-VM $* uptime=$(cut -d' ' -f1 /proc/uptime)"; }
mark booted "kernel=$(uname -r)"

set -a
# shellcheck disable=SC1091
[ -f "$R/env" ] && . "$R/env"
set +a

# The registries' TLS as the host sees it (a site may put its own CA in front).
cp "$R/ca.crt" /etc/ssl/certs/ca-certificates.crt
export PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
# No bytecode compiled at install (pip install --no-compile; as a variable
# it is PIP_COMPILE=0, since pip reads PIP_NO_COMPILE=1 as compile=1):
# compiling every installed module is CPU, slow under emulation (setup.sh
# took 154-207 s with it off, 295-342 s on), and what the tests import
# compiles as they go.
export PIP_COMPILE=0

# The checkout, copied (the share is read-only; setup.sh builds in place), at
# /work/larkns so that the tests find ../shared/htcondor as on the host.
mkdir -p /mnt/project /work/larkns /work/shared/htcondor
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro project /mnt/project || {
    echo "the checkout's share did not mount"; echo 1 >"$R/rc"; exit 1; }
if [ -f "$R/files" ]; then
    tar -C /mnt/project --null --verbatim-files-from -T "$R/files" -cf - | tar -C /work/larkns -xf -
else
    tar -C /mnt/project --exclude=./.venv --exclude=./.git -cf - . | tar -C /work/larkns -xf -
fi
mount -t 9p -o trans=virtio,version=9p2000.L,ro htcondor /work/shared/htcondor 2>/dev/null \
    && echo "HTCondor: $(ls /work/shared/htcondor | grep -m1 'tar.xz$')"
cd /work/larkns || exit 1
mark copied

if ! ./setup.sh; then
    echo "setup.sh failed in the guest"; echo 1 >"$R/rc"; exit 1
fi
mark installed

.venv/bin/larkns doctor | tee "$R/doctor.txt"
mark doctor

mapfile -t ARGS <"$R/pytest-args"
LKT_VM_GUEST=1 .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=25 \
    --junitxml="$R/junit.xml" "${ARGS[@]}"
rc=$?
echo "$rc" >"$R/rc"
mark tests-done "rc=$rc"
