#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), then runs every test tier: unit, integration against a
# real etcd, network-namespace and multi-host e2e tests (the last two need root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -ra "$@"
