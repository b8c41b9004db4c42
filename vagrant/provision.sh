#!/usr/bin/env bash
# Makes this machine an HTCondor worker node whose jobs each run in a network
# namespace of their own: HTCondor as a one-node pool (as get.htcondor.org's
# --minicondor makes it), larkns (setup.sh), the larkns configuration
# (larkns-condor-config, as the end-to-end tests make it), and larknsd under
# systemd.  Debian 12 or EL9, as root; run it again and it changes nothing
# more.
#
# HTCondor comes from HTCONDOR when it names a file in this machine (the
# Vagrantfile copies it in from LARKNS_HTCONDOR): a build's tarball
# (condor-*.tar.xz or .tar.gz), a package (.deb, .rpm), or a folder of
# packages.  Without it, from HTCondor's repositories (get.htcondor.org).
set -euo pipefail
LARKNS=${LARKNS:-/opt/larkns}
HTCONDOR=${HTCONDOR:-}
cd "$LARKNS"

# A tarball's HTCondor, laid out as the packages lay it out: the release in
# /opt (RELEASE_DIR), state under /var, configuration in /etc/condor, its
# commands on PATH through /usr/local, condor.service, a `condor` user.
htcondor_from_tarball() {
    local tarball=$1 tmp top prefix missing
    tmp=$(mktemp -d /opt/.htcondor.XXXXXX)
    tar -xaf "$tarball" -C "$tmp"
    top=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'condor-*' -printf '%f\n')
    if [ -z "$top" ] || [ ! -x "$tmp/$top/sbin/condor_master" ]; then
        echo "provision.sh: $tarball holds no condor-*/sbin/condor_master" >&2
        exit 1
    fi
    prefix=/opt/$top
    rm -rf "$prefix"
    mv "$tmp/$top" "$prefix"
    rm -rf "$tmp"
    ln -sfn "$prefix" /opt/htcondor

    # Its runtime libraries (the tarball's BUILD.md, for Debian 12).
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            libcurl4 libgssapi-krb5-2 libkrb5-3 libldap-2.5-0 libpcre2-8-0 libssl3 \
            libstdc++6 libgomp1 libuuid1 libsqlite3-0 libsystemd0 >/dev/null
    fi
    missing=$({ ldd "$prefix"/sbin/* "$prefix"/bin/* 2>/dev/null || true; } | awk '/not found/ {print $1}' | sort -u)
    if [ -n "$missing" ]; then
        echo "provision.sh: HTCondor from $tarball lacks libraries here:" $missing >&2
        exit 1
    fi

    getent passwd condor >/dev/null || useradd --system --user-group \
        --home-dir /var/lib/condor --no-create-home --shell /usr/sbin/nologin condor
    install -d -o condor -g condor -m 0755 /var/lib/condor /var/lib/condor/spool \
        /var/lib/condor/execute /var/log/condor
    install -m 0644 "$prefix/etc/examples/condor-tmpfiles.conf" /etc/tmpfiles.d/condor.conf
    systemd-tmpfiles --create /etc/tmpfiles.d/condor.conf

    install -d /etc/condor/config.d
    cat >/etc/condor/condor_config <<'EOF'
# HTCondor from a tarball (vagrant/provision.sh), where the packages put it.
RELEASE_DIR = /opt/htcondor
LOCAL_DIR = /var
RUN = $(LOCAL_DIR)/run/condor
LOG = $(LOCAL_DIR)/log/condor
LOCK = $(LOCAL_DIR)/lock/condor
SPOOL = $(LOCAL_DIR)/lib/condor/spool
EXECUTE = $(LOCAL_DIR)/lib/condor/execute
LOCAL_CONFIG_FILE =
LOCAL_CONFIG_DIR = /etc/condor/config.d
EOF
    install -m 0644 "$prefix/etc/examples/00-security" /etc/condor/config.d/00-security
    install -m 0644 "$prefix/etc/examples/00-minicondor" /etc/condor/config.d/00-minicondor
    sed "s|/usr/sbin/condor_master|/opt/htcondor/sbin/condor_master|" \
        "$prefix/etc/examples/condor.service" >/etc/systemd/system/condor.service
    systemctl daemon-reload

    # Last: condor_master on PATH is what says HTCondor is installed.
    local f
    for f in /opt/htcondor/bin/* /opt/htcondor/sbin/*; do
        ln -sfn "$f" "/usr/local/$(basename "$(dirname "$f")")/$(basename "$f")"
    done
}

# Packages from this machine: the distribution's package manager installs
# them with what they depend on.
htcondor_from_packages() {
    local pkgs=()
    mapfile -t pkgs < <(find "$(realpath "$1")" -maxdepth 1 -type f \( -name '*.deb' -o -name '*.rpm' \) | sort)
    if [ "${#pkgs[@]}" = 0 ]; then
        echo "provision.sh: no .deb or .rpm in $1" >&2
        exit 1
    fi
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
    else
        dnf install -y -q "${pkgs[@]}" >/dev/null
    fi
    # Without the minicondor package: the same one-node pool.
    if ! ls /etc/condor/config.d/*minicondor* >/dev/null 2>&1; then
        cat >/etc/condor/config.d/00-minicondor <<'EOF'
# A pool of one machine (vagrant/provision.sh; as HTCondor's minicondor).
CONDOR_HOST = $(IP_ADDRESS)
use ROLE: CentralManager
use ROLE: Submit
use ROLE: Execute
SCHEDD_INTERVAL = 5
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_CYCLE_DELAY = 5
STARTER_UPDATE_INTERVAL = 5
SHADOW_QUEUE_UPDATE_INTERVAL = 10
UPDATE_INTERVAL = 5
RUNBENCHMARKS = 0
EOF
    fi
}

if ! command -v condor_master >/dev/null 2>&1; then
    case "$HTCONDOR" in
        "")
            if ! command -v curl >/dev/null 2>&1; then
                if command -v apt-get >/dev/null 2>&1; then
                    apt-get update -qq && apt-get install -y -qq curl >/dev/null
                else
                    dnf install -y -q curl >/dev/null
                fi
            fi
            curl -fsSL https://get.htcondor.org | /bin/bash -s -- --no-dry-run --minicondor
            ;;
        *.tar.xz | *.tar.gz | *.tgz | *.tar) htcondor_from_tarball "$HTCONDOR" ;;
        *) htcondor_from_packages "$HTCONDOR" ;;
    esac
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
