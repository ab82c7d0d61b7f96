"""Reliability and security tests (issue 7): etcd faults, daemon restarts, races, lease lifetime, bad data in
etcd, hostile packets and resource bounds, against real daemons in network namespaces and a 3-member etcd.

CI runs the issue's full sizes: test_soak.py (marked `soak`: 10 minutes of traffic through a 30 s frozen
member, a 2-minute etcd outage, 100 route changes and 20 reconnects) is moved to the front of the collection so
that xdist starts it first, on its own worker, while the other workers run the rest of the suite.
FLANNELPY_QUICK=1 shrinks the soak for a local run; FLANNELPY_SOAK=1 lengthens the lease test (60 TTLs).
FLANNELPY_FIGURES=PATH appends the measured figures (traffic gaps, recovery times, memory, fds) as JSON
lines, for docs/operations.md.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
SOAK = os.environ.get("FLANNELPY_SOAK") == "1"
QUICK = os.environ.get("FLANNELPY_QUICK") == "1"
SOAK_FILE = HERE / "test_soak.py"

_figures: list[dict[str, Any]] = []


def _skip_reason(needs_root: bool) -> str | None:
    if needs_root and os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("etcd", "etcdctl", "ip") if shutil.which(t) is None]
    if needs_root and missing:
        return f"needs {', '.join(missing)} (scripts/setup.sh installs them)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The soak first: xdist (--dist loadfile) hands out files in collection order, so the longest file starts
    # at once on a worker of its own; it holds more than two tests, so that worker gets no second file until
    # the soak is over.
    items.sort(key=lambda item: Path(item.fspath) != SOAK_FILE)
    for item in items:
        if HERE not in Path(item.fspath).parents:
            continue
        if item.get_closest_marker("unprivileged") is not None:
            continue
        item.add_marker(pytest.mark.root)
        item.add_marker(pytest.mark.etcd)
        reason = _skip_reason(True)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unprivileged: a reliability test that needs neither root nor etcd")


def record_figure(name: str, value: float | int | str, unit: str = "", **context: Any) -> None:
    """A measured figure for docs/operations.md (printed with -s, written to $FLANNELPY_FIGURES)."""
    entry = {"figure": name, "value": value, "unit": unit, "quick": QUICK, **context}
    _figures.append(entry)
    print(f"FIGURE {json.dumps(entry)}")
    path = os.environ.get("FLANNELPY_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


@pytest.fixture(scope="session")
def figures() -> Iterator[list[dict[str, Any]]]:
    yield _figures


HEALTHZ_PORT = 8473
LEASE_TTL = 15  # test-only --subnet-lease-ttl: renewals every 5 s, so each fault spans a renewal


@pytest.fixture(scope="session")
def udp_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three hosts with one container each, the seed's udp config, a 3-member etcd on the hosts; shared by
    the reliability tests, each of which leaves every daemon and etcd member running."""
    from flannelpy.lab.cluster import Cluster

    with Cluster(hosts=3, containers_per_host=1, workdir=tmp_path_factory.mktemp("udp-cluster"),
                 daemon_args=[f"--healthz-port={HEALTHZ_PORT}", "--log-format=json",
                              f"--subnet-lease-ttl={LEASE_TTL}"]) as cluster:
        cluster.ping_across_hosts(count=1)
        yield cluster
