#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), then runs every test tier: unit, integration against a
# real etcd, network-namespace and multi-host e2e tests (the last two need root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
# Two workers, whole files each (module-scoped clusters are built once per worker): most tests wait on
# daemons, etcd and the network rather than on the CPU, so this halves the wall time on 2 cores.
exec .venv/bin/python -m pytest -q -ra -n 2 --dist loadfile "$@"
