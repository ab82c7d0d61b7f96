"""Multi-host tests: hosts in network namespaces, a 3-member etcd, one flannelpy daemon per host.

Every test here needs root and the etcd binary; without them they are skipped. The cluster is built once per
module (CI time is limited) and removed, with everything it started, when the module ends.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannelpy.lab.cluster import Cluster

HERE = Path(__file__).parent


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("etcd", "etcdctl", "ip") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (scripts/setup.sh installs them)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.etcd)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module", params=["udp", "vxlan", "host-gw"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three hosts x two containers under /flannel_use/network, 10.10.0.0/16. For udp the config is exactly
    the seed tutorial's ({"Network":"10.10.0.0/16"}: no Backend, so udp)."""
    backend = request.param
    workdir = tmp_path_factory.mktemp(f"cluster-{backend}")
    with Cluster(hosts=3, containers_per_host=2, backend=backend, workdir=workdir) as c:
        yield c
