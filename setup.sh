#!/usr/bin/env bash
# Installs what larkns needs (Debian 12 / Ubuntu, as root) and builds larkns
# with its C core into ./.venv.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-dev python3-nftables nftables \
        gcc libc6-dev libffi-dev iproute2 util-linux procps iputils-ping >/dev/null
fi

# The nftables binding comes from the distribution (it is not on PyPI) and is
# installed for the distribution's python3 only: the venv must be made from
# /usr/bin/python3 and see its packages.
/usr/bin/python3 -m venv --system-site-packages .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import nftables, larkns._core' || {
    echo "setup.sh: larkns is installed but cannot load nftables or its C core" >&2
    exit 1
}
echo "larkns is installed: $(pwd)/.venv/bin/larkns"
