#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), then runs every test tier: unit, integration against a
# real etcd, network-namespace and multi-host e2e tests (the last two need root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
# Three workers, whole files each (module-scoped clusters are built once per worker). The 10-minute
# reliability soak (tests/reliability/test_soak.py, collected first; --no-loadscope-reorder keeps that order)
# starts at once on a worker of its own and is mostly idle; the other two workers run the rest of the suite
# meanwhile (most tests wait on daemons, etcd and the network rather than on the CPU). Deselect the soak
# for a quick local run with: scripts/test.sh -m 'not soak'
exec .venv/bin/python -m pytest -q -ra -n 3 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
