"""The seed tutorial's cluster on one machine: containers on different hosts talk through flannelpy (udp, and
the vxlan and host-gw backends too), bytes arrive intact, and hosts join and leave while traffic flows."""

from __future__ import annotations

import json
from ipaddress import IPv4Network

from flannelpy.lab.cluster import SEED_PREFIX, Cluster

# Interface MTU 1500 minus the encapsulation: IPv4 + UDP for udp, + VXLAN + inner Ethernet for vxlan.
MTU = {"udp": 1472, "vxlan": 1450, "host-gw": 1500}


def test_config_under_flannel_use_prefix_gives_each_host_its_own_subnet(cluster: Cluster) -> None:
    config = json.loads(cluster.etcdctl("get", "--print-value-only", f"{SEED_PREFIX}/config"))
    if cluster.backend == "udp":
        assert config == {"Network": "10.10.0.0/16"}  # the seed tutorial's config, unchanged
    else:
        assert config == {"Network": "10.10.0.0/16", "Backend": {"Type": cluster.backend}}
    leases = cluster.leases()
    hosts = list(cluster.topology.hosts.values())
    subnets = []
    for host in hosts:
        env = cluster.wait_subnet_env(host.name, timeout=0)
        assert env.network == IPv4Network("10.10.0.0/16")
        assert env.subnet.network.subnet_of(env.network) and env.subnet.network.prefixlen == 24
        assert env.subnet.ip == env.subnet.network.network_address + 1  # Docker's --bip
        assert env.mtu == MTU[cluster.backend]
        lease = leases[env.subnet.network]
        assert lease["PublicIP"] == str(host.address)
        assert lease.get("BackendType", "udp") == cluster.backend  # flanneld's udp leases carry no type
        subnets.append(env.subnet.network)
    assert len(set(subnets)) == len(hosts)
    assert set(leases) == set(subnets)


def test_containers_ping_across_every_pair_of_hosts(cluster: Cluster) -> None:
    results = cluster.ping_across_hosts(count=3)
    assert len(results) == 6
    failed = {pair: r for pair, r in results.items() if r.received != r.sent}
    assert not failed, f"ping lost packets: {failed}"


def test_tcp_transfer_of_100_mb_arrives_intact(cluster: Cluster) -> None:
    src, dst = cluster.container("h1-c1"), cluster.container("h3-c2")
    result = cluster.tcp_transfer(src, dst, 100 * 1000 * 1000)
    assert result.received_bytes == 100 * 1000 * 1000
    assert result.received_sha256 == result.sent_sha256


def test_host_joins_and_leaves_while_traffic_flows(cluster: Cluster) -> None:
    flows = [
        cluster.ping_background(cluster.container("h1-c1"), cluster.container("h2-c2")),
        cluster.ping_background(cluster.container("h2-c1"), cluster.container("h3-c2")),
    ]
    try:
        h4 = cluster.add_host()
        newcomer = h4.containers[0]
        for name in ("h1", "h2", "h3"):
            other = cluster.host(name).containers[-1]
            cluster.wait_reachable(newcomer, other)
            there = cluster.ping(newcomer, other, count=2)
            back = cluster.ping(other, newcomer, count=2)
            assert there.received == there.sent and back.received == back.sent, (there, back)

        gone = cluster.remove_host("h4")
        assert gone is not None and gone not in cluster.leases()
        # The leaver's subnet now has no lease: h1 answers "net unreachable" (udp: flannelpy's data path;
        # vxlan and host-gw: the kernel, once flannelpy removed the route) and the container's connected
        # UDP socket learns it.
        error = cluster.udp_unreachable(cluster.container("h1-c2"), gone.network_address + 2, timeout=15)
        assert error == "ENETUNREACH"
    finally:
        results = [flow.stop() for flow in flows]
    for r in results:
        assert r.sent > 0 and r.received == r.sent, f"traffic between the other hosts was disturbed: {r}"
