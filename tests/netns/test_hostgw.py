"""host-gw backend on three hosts in network namespaces (root): routes as flanneld's, traffic, reconcile.

Each host runs a HostGwBackend inside its namespace; leases are fed by hand with apply(), as the
daemon's lease watch would. Routes are read back with `ip -j route`, as an operator would check them.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from structlog.testing import capture_logs

from flannelpy.backend.hostgw import HostGwBackend
from flannelpy.config import parse_config
from flannelpy.errors import FlannelError
from flannelpy.lab.topology import Topology
from flannelpy.subnet.lease import Lease, LeaseAttrs
from tests.netns.kernel_lab import (
    NETWORK,
    Node,
    Nodes,
    external_iface,
    ping,
    resynced,
    routes,
    sh,
    subnet_of,
    three_hosts,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def cfg(**backend: Any) -> Any:
    return parse_config(json.dumps({"Network": NETWORK, "Backend": {"Type": "host-gw", **backend}}))


def route_to(peer: Node) -> str:
    return f"{peer.lease.subnet} via {peer.lease.attrs.public_ip} dev eth0"


@pytest.fixture
def lab() -> Iterator[Topology]:
    yield from three_hosts(container_mtu=1500)


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    async with Nodes(HostGwBackend, cfg()) as started:
        yield started


# ---- tests ----


async def test_routes_match_flanneld_and_containers_talk(lab: Topology, nodes: Nodes) -> None:
    n1, n2, n3 = [await nodes.start(h) for h in lab.hosts.values()]
    await nodes.mesh()
    assert n1.lease.attrs.backend_type == "host-gw" and n1.lease.attrs.backend_data is None
    assert n1.backend.mtu == 1500
    for node, peers in ((n1, (n2, n3)), (n2, (n1, n3)), (n3, (n1, n2))):
        table = routes(node.ns)
        assert {route_to(p) for p in peers} <= table
        assert not any(r.startswith(str(node.lease.subnet)) and "eth0" in r for r in table)
    assert ping(n1.container_ns, n2.container_ip)
    assert ping(n2.container_ns, n3.container_ip)
    assert ping(n3.container_ns, n1.container_ip)


async def test_refuses_to_start_when_public_ip_is_not_on_the_interface(lab: Topology) -> None:
    h1 = lab.hosts["h1"]
    backend = HostGwBackend(cfg(), external_iface(h1, public_ip=IPv4Address("198.51.100.7")), netns=h1.netns)
    try:
        with pytest.raises(FlannelError) as err:
            await backend.lease_attrs()
        msg = str(err.value)
        assert "198.51.100.7" in msg and "eth0" in msg and "10.99.0.1/24" in msg
        assert "--public-ip" in msg
        with pytest.raises(FlannelError):
            await backend.start(Lease(subnet_of(h1), LeaseAttrs(IPv4Address("198.51.100.7"), None, "host-gw")))
    finally:
        await backend.stop()


async def test_host_leaving_and_rejoining(lab: Topology, nodes: Nodes) -> None:
    n1, n2, n3 = [await nodes.start(h) for h in lab.hosts.values()]
    await nodes.mesh()
    assert ping(n1.container_ns, n3.container_ip)
    for n in (n1, n2):
        await n.backend.apply([], [n3.lease])
        assert route_to(n3) not in routes(n.ns)
    assert not ping(n1.container_ns, n3.container_ip)
    assert ping(n1.container_ns, n2.container_ip)
    for n in (n1, n2):
        await n.backend.apply([n3.lease], [])
    assert ping(n1.container_ns, n3.container_ip)


async def test_routes_left_by_the_vxlan_backend_make_way(lab: Topology, nodes: Nodes) -> None:
    """h1 ran the vxlan backend, stopped (its kernel state stays, as flanneld's) and now runs host-gw."""
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    n2 = await nodes.start(h2)
    sh(h1.netns, "ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth0", "local",
       str(h1.address), "dstport", "0")
    sh(h1.netns, "ip", "link", "set", "flannel.1", "up")
    net = n2.lease.subnet
    sh(h1.netns, "ip", "route", "add", str(net), "via", str(net.network_address), "dev", "flannel.1", "onlink")
    n1 = await nodes.start(h1)
    await nodes.mesh()
    table = routes(n1.ns)
    assert route_to(n2) in table and f"{net} via {net.network_address} dev flannel.1 onlink" not in table
    assert ping(n1.container_ns, n2.container_ip)


async def test_deleted_route_comes_back_within_one_resync(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"], run=True)
    n2 = await nodes.start(lab.hosts["h2"], run=True)
    await nodes.mesh()
    sh(n1.ns, "ip", "route", "del", str(n2.lease.subnet))
    assert route_to(n2) not in routes(n1.ns)
    await resynced(n1.backend)
    assert route_to(n2) in routes(n1.ns)
    # Pointed elsewhere by hand: corrected.
    sh(n1.ns, "ip", "route", "replace", str(n2.lease.subnet), "via", "10.99.0.3", "dev", "eth0")
    await resynced(n1.backend)
    assert route_to(n2) in routes(n1.ns)
    assert f"{n2.lease.subnet} via 10.99.0.3 dev eth0" not in routes(n1.ns)
    assert ping(n1.container_ns, n2.container_ip)


async def test_stale_route_removed_foreign_routes_untouched(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    n2 = await nodes.start(lab.hosts["h2"])
    await nodes.mesh()
    sh(n1.ns, "ip", "route", "add", "10.5.9.0/24", "via", "10.99.0.9", "dev", "eth0")  # vanished lease
    foreign = {
        "172.16.5.0/24 via 10.99.0.2 dev eth0",  # outside the Network
        "10.5.78.0/24 dev docker0",  # another device
        "10.5.79.0/25 via 10.99.0.2 dev eth0",  # not a lease-sized route: not one we would install
    }
    sh(n1.ns, "ip", "route", "add", "172.16.5.0/24", "via", "10.99.0.2", "dev", "eth0")
    sh(n1.ns, "ip", "route", "add", "10.5.78.0/24", "dev", "docker0")
    sh(n1.ns, "ip", "route", "add", "10.5.79.0/25", "via", "10.99.0.2", "dev", "eth0")
    done = await n1.backend.reconcile()
    assert [str(r.dst) for r in done.del_routes] == ["10.5.9.0/24"]
    table = routes(n1.ns)
    assert "10.5.9.0/24 via 10.99.0.9 dev eth0" not in table
    assert foreign <= table
    assert "10.5.1.0/24 dev docker0" in table
    assert route_to(n2) in table

    # A lease whose subnet another device already routes: that route is not clobbered, the conflict
    # is reported once.
    clash = Lease(IPv4Network("10.5.78.0/24"), LeaseAttrs(IPv4Address("10.99.0.3"), backend_type="host-gw"))
    with capture_logs() as logs:
        await n1.backend.apply([clash], [])
        await n1.backend.reconcile()
    assert "10.5.78.0/24 dev docker0" in routes(n1.ns)
    assert "10.5.78.0/24 via 10.99.0.3 dev eth0" not in routes(n1.ns)
    errors = [e for e in logs if e["event"] == "Could not program kernel entry"]
    assert len(errors) == 1 and "10.5.78.0/24" in errors[0]["failure"]
    await n1.backend.apply([], [clash])

    # A restarted daemon keeps live routes until it has the lease snapshot, then drops vanished ones.
    await n1.backend.stop()
    nodes.nodes.remove(n1)
    sh(n1.ns, "ip", "route", "add", "10.5.9.0/24", "via", "10.99.0.9", "dev", "eth0")
    n1b = await nodes.start(lab.hosts["h1"])
    assert {route_to(n2), "10.5.9.0/24 via 10.99.0.9 dev eth0"} <= routes(n1b.ns)
    await n1b.backend.apply([n2.lease], [])
    assert "10.5.9.0/24 via 10.99.0.9 dev eth0" not in routes(n1b.ns)
    assert route_to(n2) in routes(n1b.ns)


async def test_mismatched_backend_and_unreachable_peer_not_routed(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    n2 = await nodes.start(lab.hosts["h2"])
    vxlan = Lease(IPv4Network("10.5.40.0/24"), LeaseAttrs(IPv4Address("10.99.0.3"), backend_type="vxlan",
                                                        backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:03"}))
    udp = Lease(IPv4Network("10.5.41.0/24"), LeaseAttrs(IPv4Address("10.99.0.3")))
    far = Lease(IPv4Network("10.5.42.0/24"), LeaseAttrs(IPv4Address("192.0.2.7"), backend_type="host-gw"))
    with capture_logs() as logs:
        await n1.backend.apply([n2.lease, vxlan, udp, far], [])
        await n1.backend.reconcile()
        await n1.backend.reconcile()
    table = routes(n1.ns)
    assert route_to(n2) in table
    for lease in (vxlan, udp, far):
        assert not any(r.startswith(str(lease.subnet)) for r in table)
    reports = [e for e in logs if e["event"] == "Lease not routed"]
    # Each reported once, however many reconciles ran.
    assert sorted(e["subnet"] for e in reports) == ["10.5.40.0/24", "10.5.41.0/24", "10.5.42.0/24"]
    far_report = next(e for e in reports if e["subnet"] == "10.5.42.0/24")
    assert "directly connected" in far_report["reason"] and far_report["public_ip"] == "192.0.2.7"
    assert n1.backend.leases_not_routed == 3  # flannel_leases_not_routed
    await n1.backend.apply([], [vxlan, udp])
    assert n1.backend.leases_not_routed == 1  # at once, not at the next full reconcile
    await n1.backend.reconcile()
    assert n1.backend.leases_not_routed == 1


async def test_a_peer_behind_an_on_link_route_is_routed_as_the_kernel_allows(lab: Topology, nodes: Nodes) -> None:
    # No address of h1 lies in 10.98.0.0/24, but the kernel takes a gateway there on eth0 (flanneld adds it).
    n1 = await nodes.start(lab.hosts["h1"])
    h3 = lab.hosts["h3"]
    sh(h3.netns, "ip", "addr", "add", "10.98.0.3/24", "dev", "eth0")
    sh(n1.ns, "ip", "route", "add", "10.98.0.0/24", "dev", "eth0")
    peer = Lease(subnet_of(h3), LeaseAttrs(IPv4Address("10.98.0.3"), backend_type="host-gw"))
    with capture_logs() as logs:
        await n1.backend.apply([peer], [])
        await n1.backend.reconcile()
    assert f"{peer.subnet} via 10.98.0.3 dev eth0" in routes(n1.ns)
    assert not [e for e in logs if e["event"] == "Lease not routed"]
    sh(n1.ns, "ip", "route", "del", "10.98.0.0/24", "dev", "eth0")  # now it is not reachable any more
    with capture_logs() as logs:
        await n1.backend.reconcile()
    assert not any(r.startswith(str(peer.subnet)) for r in routes(n1.ns))
    assert [e["public_ip"] for e in logs if e["event"] == "Lease not routed"] == ["10.98.0.3"]


async def test_many_unreachable_peers_are_logged_ten_by_ten_then_summed_up(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    far = [Lease(IPv4Network(f"10.5.{100 + i}.0/24"), LeaseAttrs(IPv4Address(f"192.0.2.{1 + i}"),
                                                                backend_type="host-gw"))
           for i in range(25)]
    with capture_logs() as logs:
        await n1.backend.apply(far, [])
        await n1.backend.reconcile()
    table = routes(n1.ns)
    assert not any(r.startswith(f"{lease.subnet} ") for lease in far for r in table)
    one_by_one = [e for e in logs if e["event"] == "Lease not routed"]
    summary = [e for e in logs if e["event"] == "More leases not routed"]
    assert len(one_by_one) == 10 and all("directly connected" in e["reason"] for e in one_by_one)
    assert len(summary) == 1 and summary[0]["count"] == 15
    assert list(summary[0]["reasons"].values()) == [15]


async def test_two_thousand_leases_are_all_routed_and_a_refused_one_is_named(lab: Topology, nodes: Nodes) -> None:
    """Routes go to the kernel in batches: every one arrives, and a refusal in the middle of a batch is
    reported for its own subnet without stopping the others."""
    h1 = lab.hosts["h1"]
    sh(h1.netns, "ip", "addr", "add", "10.98.0.1/16", "dev", "eth0")  # room for 2,000 distinct public IPs
    config = parse_config(json.dumps({"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "host-gw"}}))
    n1 = await nodes.start(h1, config)
    peers = [Lease(IPv4Network(f"10.{16 + i // 256}.{i % 256}.0/24"),
                   LeaseAttrs(IPv4Address(f"10.98.{1 + i // 250}.{1 + i % 250}"), backend_type="host-gw"))
             for i in range(2000)]
    clash = peers[1234].subnet
    sh(h1.netns, "ip", "route", "add", str(clash), "dev", "docker0")  # someone else's route to that subnet
    with capture_logs() as logs:
        await n1.backend.apply(peers, [])
    table = routes(h1.netns)
    assert {f"{p.subnet} via {p.attrs.public_ip} dev eth0" for p in peers if p.subnet != clash} <= table
    assert f"{clash} dev docker0" in table
    errors = [e["failure"] for e in logs if e["event"] == "Could not program kernel entry"]
    assert len(errors) == 1 and errors[0].startswith(f"add route {clash} via ") and "another route" in errors[0]
    counts = n1.backend.counters()
    assert counts["routes_added"] == 1999 and counts["program_failures"] == 1  # the refused one is not "added"
    # teardown removes the 1,999 routes of ours, in batches too, and nothing else
    await n1.backend.teardown()
    table = routes(h1.netns)
    assert not any(" via 10.98." in r for r in table)
    assert f"{clash} dev docker0" in table
