#!/usr/bin/env bash
# The end-to-end check of a node that provision.sh made:
#  1. a job submitted by an ordinary user to the node's own pool runs in a
#     network namespace of its own, and its bytes are in its ad;
#  2. the repository's HTCondor and daemon tests pass against the installed
#     HTCondor (CI set: none of them may skip).
set -euo pipefail
LARKNS=${LARKNS:-/opt/larkns}
USER_NAME=lkvuser
id "$USER_NAME" >/dev/null 2>&1 || useradd --create-home "$USER_NAME"
home=$(getent passwd "$USER_NAME" | cut -d: -f6)
target=$(hostname -I | cut -d' ' -f1)

# Wait for the pool (after a restart) to have a slot.
for _ in $(seq 60); do
    [ -n "$(condor_status -af Name 2>/dev/null)" ] && break
    sleep 2
done

cat >"$home/lkv.sub" <<SUB
executable = /bin/sh
arguments = "-c 'readlink /proc/self/ns/net; ip -o link | cut -d: -f2; ping -c 3 -i 0.2 $target'"
output = lkv.out
error = lkv.err
log = lkv.log
should_transfer_files = NO
queue
SUB
chown "$USER_NAME" "$home/lkv.sub"
rm -f "$home"/lkv.{out,err,log}
cluster=$(su - "$USER_NAME" -c "condor_submit -terse lkv.sub" | cut -d. -f1)
su - "$USER_NAME" -c "condor_wait -wait 600 lkv.log $cluster" >/dev/null
# The schedd writes the history a moment after the job's log says it ended.
ad=
for _ in $(seq 30); do
    ad=$(condor_history "$cluster" -limit 1 \
        -af ExitCode LarkAssignedNetworkType NetworkOutgoing NetworkIncoming 2>/dev/null || true)
    [ -n "$ad" ] && break
    sleep 1
done
read -r code type out in <<<"$ad"
links=$(grep -cE '^ (lo|eth0)(@|$)' "$home/lkv.out" || true)
echo "e2e-check: job $cluster: exit $code, type $type, out $out B, in $in B"
if [ "$code" != 0 ] || [ "$type" != nat ] || [ "${out:-0}" -lt 252 ] || [ "${in:-0}" -lt 252 ]; then
    echo "e2e-check: FAILED (expected exit 0, nat, >= 3 pings each way)" >&2
    cat "$home/lkv.out" "$home/lkv.err" >&2
    exit 1
fi
if [ "$(head -1 "$home/lkv.out")" = "$(readlink /proc/self/ns/net)" ]; then
    echo "e2e-check: FAILED: the job ran in the node's network namespace" >&2
    exit 1
fi
if [ "$links" != 2 ]; then
    echo "e2e-check: FAILED: the job did not see just lo and eth0" >&2
    exit 1
fi

cd "$LARKNS"
CI=1 .venv/bin/python -m pytest -q tests/test_condor.py tests/test_condor_master.py \
    tests/test_daemon.py tests/test_site_config.py
echo "e2e-check: passed"
