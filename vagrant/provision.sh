#!/usr/bin/env bash
# Makes this machine an HTCondor worker node whose jobs each run in a network
# namespace of their own: HTCondor from its official repositories (a one-node
# pool, as get.htcondor.org's --minicondor makes it), larkns (setup.sh), the
# larkns configuration (larkns-condor-config, as the end-to-end tests make
# it), and larknsd under systemd.  Debian 12 or EL9, as root; run it again
# and it changes nothing more.
set -euo pipefail
LARKNS=${LARKNS:-/opt/larkns}
cd "$LARKNS"

if ! command -v curl >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq curl >/dev/null
    else
        dnf install -y -q curl >/dev/null
    fi
fi
if ! command -v condor_master >/dev/null 2>&1; then
    curl -fsSL https://get.htcondor.org | /bin/bash -s -- --no-dry-run --minicondor
fi

./setup.sh

install -m 0644 hooks/larknsd.service /etc/systemd/system/larknsd.service
systemctl daemon-reload
systemctl enable --now larknsd.service
systemctl restart larknsd.service

# The node's HTCondor configuration for larkns, from this installation.
"$LARKNS/.venv/bin/larkns-condor-config" -o /etc/condor/config.d/50-larkns.conf
systemctl enable condor.service
systemctl restart condor.service
echo "provision.sh: HTCondor $(condor_version | head -1 | cut -d' ' -f2) with larkns"
