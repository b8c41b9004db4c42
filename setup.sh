#!/usr/bin/env bash
# Installs what larkns needs (Debian 12 / Ubuntu or EL9, as root) and builds larkns
# with its C core into ./.venv.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-dev python3-nftables nftables netbase \
        gcc libc6-dev libffi-dev iproute2 util-linux procps iputils-ping radvd dnsmasq-base tayga \
        clang libbpf-dev >/dev/null
elif command -v dnf >/dev/null 2>&1; then
    # EL9: Python 3.11 from AppStream, beside the system's 3.9.
    # glibc-static (larkns-entry is linked statically) is in CRB.
    dnf install -y -q dnf-plugins-core >/dev/null && dnf config-manager --set-enabled crb || true
    dnf install -y -q python3.11 python3.11-devel python3-nftables nftables \
        gcc glibc-static libffi-devel iproute util-linux procps-ng iputils radvd dnsmasq >/dev/null
fi

# The user the jobs' CLATs (tayga) run as once their tun device is open: no
# home, no shell, a group of its own.
if ! getent passwd larkns-tayga >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin larkns-tayga
fi

# The newest system Python that is 3.11 or later.
PYTHON=
for v in 3.13 3.12 3.11; do
    if [ -x "/usr/bin/python$v" ]; then PYTHON=/usr/bin/python$v; break; fi
done
if [ -z "$PYTHON" ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PYTHON=/usr/bin/python3
fi
if [ -z "$PYTHON" ]; then
    echo "setup.sh: larkns needs Python 3.11 or later in /usr/bin" >&2
    exit 1
fi

# The nftables binding comes from the distribution (it is not on PyPI) and is
# installed for the distribution's python3: the venv is made from a system
# Python and sees its packages.
"$PYTHON" -m venv --system-site-packages .venv
if ! .venv/bin/python -c 'import nftables' 2>/dev/null; then
    # EL packages it for the system's python3 (3.9) only; it is pure Python
    # over libnftables, so the venv's Python can use the same package.
    purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    for d in /usr/lib/python3*/site-packages/nftables /usr/lib64/python3*/site-packages/nftables \
        /usr/lib/python3/dist-packages/nftables; do
        if [ -d "$d" ]; then ln -sfn "$d" "$purelib/nftables"; break; fi
    done
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,plot]'
.venv/bin/python -c 'import nftables, larkns._core' || {
    echo "setup.sh: larkns is installed but cannot load nftables or its C core" >&2
    exit 1
}
echo "larkns is installed: $(pwd)/.venv/bin/larkns"
