"""vxlan backend on three hosts in network namespaces (root): kernel state as flanneld's, traffic, reconcile.

Each host runs a VxlanBackend inside its namespace; leases are fed by hand with apply(), as the daemon's
lease watch would. Kernel state is read back with `ip -j` / `bridge -j`, as an operator would check it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flannelpy.backend.vxlan import VxlanBackend
from flannelpy.config import parse_config
from flannelpy.errors import FlannelError
from flannelpy.lab.topology import Topology
from flannelpy.subnet.lease import Lease, LeaseAttrs
from tests.netns.kernel_lab import NETWORK, Node, Nodes, js, ping, resynced, routes, sh, subnet_of, three_hosts

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

DEV = "flannel.1"


def cfg(**backend: Any) -> Any:
    return parse_config(json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan", **backend}}))


def neighbours(netns: str) -> set[str]:
    return {f"{n['dst']} lladdr {n['lladdr']} {' '.join(n['state'])}"
            for n in js(netns, "ip", "-j", "neigh", "show", "dev", DEV) if "lladdr" in n}


def fdb(netns: str) -> set[str]:
    return {f"{e['mac']} dst {e['dst']} {' '.join(e['flags'])} {e['state']}"
            for e in js(netns, "bridge", "-j", "fdb", "show", "dev", DEV) if "dst" in e}


@pytest.fixture
def lab() -> Iterator[Topology]:
    yield from three_hosts(container_mtu=1450)


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    async with Nodes(VxlanBackend, cfg()) as started:
        yield started


def vxlan_entries(peer: Node) -> tuple[str, str, str]:
    """The three entries flanneld programs on another host for `peer`."""
    net = peer.lease.subnet
    mac = peer.lease.attrs.backend_data["VtepMAC"]  # type: ignore[index]
    return (
        f"{net} via {net.network_address} dev {DEV} onlink",
        f"{net.network_address} lladdr {mac} PERMANENT",
        f"{mac} dst {peer.lease.attrs.public_ip} self permanent",
    )


# ---- tests ----


async def test_kernel_state_matches_flanneld_and_containers_talk(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    n2 = await nodes.start(lab.hosts["h2"])
    n3 = await nodes.start(lab.hosts["h3"])
    await nodes.mesh()

    # The lease carries the device's MAC and the VNI.
    attrs = n1.lease.attrs
    assert attrs.backend_type == "vxlan"
    link = js(n1.ns, "ip", "-j", "-d", "link", "show", DEV)[0]
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": link["address"]}
    # Device exactly as flanneld makes it.
    info = link["linkinfo"]
    assert info["info_kind"] == "vxlan"
    data = info["info_data"]
    assert data["id"] == 1
    assert data["local"] == "10.99.0.1"
    assert data["link"] == "eth0"
    assert data["port"] == 8472
    assert data["learning"] is False
    assert link["mtu"] == 1450
    assert "UP" in link["flags"]
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in js(n1.ns, "ip", "-4", "-j", "addr", "show", DEV)[0]["addr_info"]]
    assert addrs == ["10.5.1.0/32"]
    assert n1.backend.mtu == 1450

    for node, peers in ((n1, (n2, n3)), (n2, (n1, n3)), (n3, (n1, n2))):
        want = [vxlan_entries(p) for p in peers]
        assert {w[0] for w in want} <= routes(node.ns)
        assert neighbours(node.ns) == {w[1] for w in want}
        assert fdb(node.ns) == {w[2] for w in want}
        # Nothing for its own subnet on the VTEP.
        assert not any(r.startswith(str(node.lease.subnet)) and DEV in r for r in routes(node.ns))

    # Container to container, across hosts, both ways.
    assert ping(n1.container_ns, n2.container_ip)
    assert ping(n1.container_ns, n3.container_ip)
    assert ping(n3.container_ns, n2.container_ip)


async def test_host_leaving_removes_its_entries(lab: Topology, nodes: Nodes) -> None:
    n1, n2, n3 = [await nodes.start(h) for h in lab.hosts.values()]
    await nodes.mesh()
    assert ping(n1.container_ns, n3.container_ip)

    for n in (n1, n2):
        await n.backend.apply([], [n3.lease])
    route, neigh, entry = vxlan_entries(n3)
    for n in (n1, n2):
        assert route not in routes(n.ns)
        assert neigh not in neighbours(n.ns)
        assert entry not in fdb(n.ns)
    assert not ping(n1.container_ns, n3.container_ip)
    assert ping(n1.container_ns, n2.container_ip)  # the others are untouched

    # It comes back (e.g. the host rejoins with a new VTEP MAC after a reboot).
    await n3.backend.teardown()
    n3b = await nodes.start(lab.hosts["h3"])
    assert n3b.lease.attrs.backend_data != n3.lease.attrs.backend_data
    for n in (n1, n2):
        await n.backend.apply([n3b.lease], [])
    await n3b.backend.apply([n1.lease, n2.lease], [])
    assert vxlan_entries(n3b)[2] in fdb(n1.ns)
    assert ping(n1.container_ns, n3.container_ip)


async def test_changed_lease_updates_entries_in_place(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    n2 = await nodes.start(lab.hosts["h2"])
    await nodes.mesh()
    old = vxlan_entries(n2)
    # h2's VTEP is recreated (new MAC) and its lease re-announced: a PUT, no DELETE in between.
    await n2.backend.teardown()
    n2b = await nodes.start(lab.hosts["h2"])
    await n2b.backend.apply([n1.lease], [])
    await n1.backend.apply([n2b.lease], [])
    new = vxlan_entries(n2b)
    assert new[1] != old[1]
    assert neighbours(n1.ns) == {new[1]}
    assert fdb(n1.ns) == {new[2]}
    assert new[0] in routes(n1.ns)
    assert ping(n1.container_ns, n2b.container_ip)


async def test_deleted_entries_come_back_within_one_resync(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"], run=True)
    n2 = await nodes.start(lab.hosts["h2"], run=True)
    await nodes.mesh()
    route, neigh, entry = vxlan_entries(n2)
    net = n2.lease.subnet

    sh(n1.ns, "ip", "route", "del", str(net), "dev", DEV)
    sh(n1.ns, "ip", "neigh", "del", str(net.network_address), "dev", DEV)
    sh(n1.ns, "bridge", "fdb", "del", entry.split()[0], "dev", DEV, "dst", str(n2.lease.attrs.public_ip))
    assert route not in routes(n1.ns)
    await resynced(n1.backend)
    assert route in routes(n1.ns)
    assert neigh in neighbours(n1.ns)
    assert entry in fdb(n1.ns)
    assert ping(n1.container_ns, n2.container_ip)

    # A neighbour changed by hand to a wrong MAC is corrected too.
    sh(n1.ns, "ip", "neigh", "replace", str(net.network_address), "lladdr", "02:00:00:00:00:99",
       "dev", DEV, "nud", "permanent")
    await resynced(n1.backend)
    assert neighbours(n1.ns) == {neigh}

    # Its MAC changed by hand: restored to the lease's VtepMAC.
    sh(n1.ns, "ip", "link", "set", DEV, "address", "02:00:00:00:00:77")
    await resynced(n1.backend)
    link = js(n1.ns, "ip", "-j", "link", "show", DEV)[0]
    assert link["address"] == n1.lease.attrs.backend_data["VtepMAC"]  # type: ignore[index]

    # The whole device deleted by hand: recreated with the MAC the lease announces.
    sh(n1.ns, "ip", "link", "del", DEV)
    await resynced(n1.backend)
    link = js(n1.ns, "ip", "-j", "link", "show", DEV)[0]
    assert link["address"] == n1.lease.attrs.backend_data["VtepMAC"]  # type: ignore[index]
    assert route in routes(n1.ns)
    assert ping(n1.container_ns, n2.container_ip)
    # A device that is fine is left alone: resyncs do not re-create it.
    await resynced(n1.backend)
    assert js(n1.ns, "ip", "-j", "link", "show", DEV)[0]["ifindex"] == link["ifindex"]

    # Re-created by hand with another VNI: replaced like an incompatible device at start.
    sh(n1.ns, "ip", "link", "del", DEV)
    sh(n1.ns, "ip", "link", "add", DEV, "type", "vxlan", "id", "9", "dev", "eth0", "local", "10.99.0.1",
       "dstport", "0")
    await resynced(n1.backend)
    assert js(n1.ns, "ip", "-j", "-d", "link", "show", DEV)[0]["linkinfo"]["info_data"]["id"] == 1
    assert route in routes(n1.ns)
    assert ping(n1.container_ns, n2.container_ip)


async def test_stale_entries_removed_and_foreign_routes_untouched(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    n2 = await nodes.start(lab.hosts["h2"])
    await nodes.mesh()
    # Left behind for a host whose lease vanished (flannel issue #2554).
    sh(n1.ns, "ip", "route", "add", "10.5.9.0/24", "via", "10.5.9.0", "dev", DEV, "onlink")
    sh(n1.ns, "ip", "neigh", "add", "10.5.9.0", "lladdr", "02:00:00:00:09:09", "dev", DEV, "nud", "permanent")
    sh(n1.ns, "bridge", "fdb", "add", "02:00:00:00:09:09", "dev", DEV, "dst", "10.99.0.9", "self", "permanent")
    # Not ours: outside the Network (even on our device), or on another device.
    foreign = {
        "172.16.5.0/24 via 10.5.2.0 dev flannel.1 onlink",
        "10.5.77.0/24 via 10.99.0.2 dev eth0",
        "10.5.78.0/24 dev docker0",
    }
    sh(n1.ns, "ip", "route", "add", "172.16.5.0/24", "via", "10.5.2.0", "dev", DEV, "onlink")
    sh(n1.ns, "ip", "route", "add", "10.5.77.0/24", "via", "10.99.0.2", "dev", "eth0")
    sh(n1.ns, "ip", "route", "add", "10.5.78.0/24", "dev", "docker0")

    before = n1.backend.counters().get("stale_removed", 0)
    done = await n1.backend.reconcile()
    assert len(done.del_routes) == 1 and len(done.del_neighbours) == 1 and len(done.del_fdb) == 1
    assert n1.backend.counters()["stale_removed"] == before + 3
    assert not any(r.startswith("10.5.9.0/24") for r in routes(n1.ns))
    assert not any(n.startswith("10.5.9.0 ") for n in neighbours(n1.ns))
    assert not any("10.99.0.9" in e for e in fdb(n1.ns))
    assert foreign <= routes(n1.ns)
    assert "10.5.1.0/24 dev docker0" in routes(n1.ns)  # our own subnet's bridge route
    assert vxlan_entries(n2)[0] in routes(n1.ns)
    assert ping(n1.container_ns, n2.container_ip)


async def test_restart_keeps_live_routes_until_snapshot_then_drops_vanished(lab: Topology, nodes: Nodes) -> None:
    n1, n2, n3 = [await nodes.start(h) for h in lab.hosts.values()]
    await nodes.mesh()
    # h1's daemon stops; while it is down h3 leaves.
    await nodes.stop(n1)
    n1b = await nodes.start(lab.hosts["h1"])
    assert n1b.lease.attrs.backend_data == n1.lease.attrs.backend_data  # compatible device reused
    # Started but no snapshot yet: live peers keep their routes (nothing removed before we know them).
    assert vxlan_entries(n2)[0] in routes(n1b.ns)
    assert vxlan_entries(n3)[0] in routes(n1b.ns)
    await n1b.backend.apply([n2.lease], [])  # the snapshot: h3 is gone
    assert vxlan_entries(n2)[0] in routes(n1b.ns)
    assert vxlan_entries(n3)[0] not in routes(n1b.ns)
    assert vxlan_entries(n3)[1] not in neighbours(n1b.ns)
    assert vxlan_entries(n3)[2] not in fdb(n1b.ns)


async def test_mismatched_backend_and_bad_backend_data_are_not_routed(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    n2 = await nodes.start(lab.hosts["h2"])
    h3 = lab.hosts["h3"]
    hostgw = Lease(subnet_of(h3), LeaseAttrs(h3.address, backend_type="host-gw"))
    udp = Lease(IPv4Network("10.5.40.0/24"), LeaseAttrs(IPv4Address("10.99.0.40")))
    no_mac = Lease(IPv4Network("10.5.41.0/24"), LeaseAttrs(IPv4Address("10.99.0.41"), backend_type="vxlan",
                                                         backend_data={"VNI": 1}))
    await n1.backend.apply([n2.lease, hostgw, udp, no_mac], [])
    table = routes(n1.ns)
    assert vxlan_entries(n2)[0] in table
    for lease in (hostgw, udp, no_mac):
        assert not any(r.startswith(str(lease.subnet)) for r in table)
    assert len(neighbours(n1.ns)) == 1 and len(fdb(n1.ns)) == 1


async def test_incompatible_device_replaced_port_mtu_gbp_options(lab: Topology, nodes: Nodes) -> None:
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    # A leftover flannel.1 with another VNI.
    sh(h1.netns, "ip", "link", "add", DEV, "type", "vxlan", "id", "7", "dev", "eth0", "local", "10.99.0.1",
       "dstport", "0")
    config = cfg(Port=4789, MTU=1400, GBP=True)
    n1 = await nodes.start(h1, config)
    n2 = await nodes.start(h2, config)
    await nodes.mesh()
    link = js(h1.netns, "ip", "-j", "-d", "link", "show", DEV)[0]
    assert link["linkinfo"]["info_data"]["id"] == 1
    assert link["linkinfo"]["info_data"]["port"] == 4789
    assert link["linkinfo"]["info_data"].get("gbp") is True
    assert link["mtu"] == 1400 and n1.backend.mtu == 1400
    assert n1.lease.attrs.backend_data["VtepMAC"] == link["address"]  # type: ignore[index]
    assert ping(n1.container_ns, n2.container_ip)


async def test_direct_routing_uses_public_ip_for_peers_on_the_same_network(lab: Topology, nodes: Nodes) -> None:
    config = cfg(DirectRouting=True)
    n1, n2, n3 = [await nodes.start(h, config) for h in lab.hosts.values()]
    await nodes.mesh()
    # Every peer shares 10.99.0.0/24 with h1: plain routes via the public IP, nothing on the VTEP.
    table = routes(n1.ns)
    assert "10.5.2.0/24 via 10.99.0.2 dev eth0" in table
    assert "10.5.3.0/24 via 10.99.0.3 dev eth0" in table
    assert not any(DEV in r for r in table)
    assert neighbours(n1.ns) == set() and fdb(n1.ns) == set()
    assert ping(n1.container_ns, n2.container_ip)
    # A peer announcing an address h1 reaches only through a router goes over VXLAN.
    h3 = lab.hosts["h3"]
    sh(h3.netns, "ip", "addr", "add", "10.98.0.3/24", "dev", "eth0")
    sh(n1.ns, "ip", "route", "add", "10.98.0.0/24", "via", "10.99.0.3", "dev", "eth0")
    far = Lease(n3.lease.subnet, LeaseAttrs(IPv4Address("10.98.0.3"), backend_type="vxlan",
                                             backend_data=n3.lease.attrs.backend_data))
    await n1.backend.apply([far], [])
    table = routes(n1.ns)
    assert "10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink" in table
    assert "10.5.3.0/24 via 10.99.0.3 dev eth0" not in table
    assert fdb(n1.ns) == {f"{far.attrs.backend_data['VtepMAC']} dst 10.98.0.3 self permanent"}  # type: ignore[index]
    assert ping(n1.container_ns, n3.container_ip)

    # A direct route of a vanished lease is stale like any other.
    sh(n1.ns, "ip", "route", "add", "10.5.9.0/24", "via", "10.99.0.9", "dev", "eth0")
    await n1.backend.reconcile()
    assert "10.5.9.0/24 via 10.99.0.9 dev eth0" not in routes(n1.ns)
    await n1.backend.apply([], [n2.lease])
    assert "10.5.2.0/24 via 10.99.0.2 dev eth0" not in routes(n1.ns)

    # teardown removes the direct routes too (they live on eth0, not on the removed device), and only ours.
    await n1.backend.apply([n2.lease], [])
    assert "10.5.2.0/24 via 10.99.0.2 dev eth0" in routes(n1.ns)
    await n1.backend.teardown()
    table = routes(n1.ns)
    assert not any(r.startswith("10.5.") and "dev eth0" in r for r in table), table
    assert "10.98.0.0/24 via 10.99.0.3 dev eth0" in table


async def test_routes_left_by_direct_routing_make_way_when_it_is_turned_off(lab: Topology, nodes: Nodes) -> None:
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    n2 = await nodes.start(h2)
    # h1 ran with DirectRouting and stopped without removing its routes (a crash, or a kill -9).
    sh(h1.netns, "ip", "route", "add", str(n2.lease.subnet), "via", "10.99.0.2", "dev", "eth0")
    n1 = await nodes.start(h1)
    await nodes.mesh()
    await n1.backend.reconcile()
    table = routes(n1.ns)
    assert vxlan_entries(n2)[0] in table and f"{n2.lease.subnet} via 10.99.0.2 dev eth0" not in table
    assert ping(n1.container_ns, n2.container_ip)


async def test_a_vni_change_replaces_the_routes_left_on_the_old_device(lab: Topology, nodes: Nodes) -> None:
    n1 = await nodes.start(lab.hosts["h1"])
    n2 = await nodes.start(lab.hosts["h2"])
    await nodes.mesh()
    for n in (n1, n2):
        await nodes.stop(n)  # the kernel state stays, as when the daemons stop
    config = cfg(VNI=2)
    m1 = await nodes.start(lab.hosts["h1"], config)
    m2 = await nodes.start(lab.hosts["h2"], config)
    await m1.backend.apply([m2.lease], [])
    await m2.backend.apply([m1.lease], [])
    net = m2.lease.subnet
    table = routes(m1.ns)
    assert f"{net} via {net.network_address} dev flannel.2 onlink" in table
    assert f"{net} via {net.network_address} dev flannel.1 onlink" not in table
    assert ping(m1.container_ns, m2.container_ip)


async def test_an_mtu_above_what_the_interface_allows_is_a_clear_error(lab: Topology, nodes: Nodes) -> None:
    why = r"cannot set MTU 1500 on VXLAN device flannel\.1.*at most 1450.*Backend\.MTU"
    with pytest.raises(FlannelError, match=why):
        await nodes.start(lab.hosts["h1"], cfg(MTU=1500))  # eth0 has MTU 1500: 1450 at most with VXLAN's 50
