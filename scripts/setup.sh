#!/usr/bin/env bash
# Installs everything flannelpy needs on a fresh Debian machine (as root): system packages, then a
# virtualenv in .venv with the project, its test extras and its compiled fast path. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for bin in etcd etcdctl ip iperf3 tcpdump iptables-restore ping openssl; do
    command -v "$bin" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends etcd-server etcd-client iproute2 iperf3 tcpdump iptables procps iputils-ping openssl
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip setuptools wheel 'Cython==3.1.8'
# The extensions are built once, in the tree, where the tests and the daemon import them from.
FLANNELPY_NO_EXT=1 .venv/bin/pip install -q -e '.[test,bench]'
.venv/bin/python setup.py -q build_ext --inplace --parallel 2
