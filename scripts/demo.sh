#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), then runs the main job: a three-host flannel cluster in
# network namespaces on this machine, with a 3-member etcd cluster, ping and iperf3 across hosts.
# Everything it creates is removed on exit, Ctrl-C or failure.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/flannelpy demo "$@"
