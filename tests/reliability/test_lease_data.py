"""Leases over time and bad data in etcd, on a host-gw cluster (its routes are plain `ip route` entries).

The daemons run with the test-only --subnet-lease-ttl=5 (renewed when 2/3 of the TTL are left, see
docs/operations.md): a stopped peer's lease expires and its routes disappear everywhere, a running daemon
keeps its one etcd lease across 10 TTLs, entries under subnets/ that are not usable leases are logged
once and never routed, and of leases sharing a PublicIP every host routes the same one (the oldest).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannelpy.lab.cluster import Cluster, SubnetEnv
from tests.reliability.conftest import HEALTHZ_PORT, SOAK, record_figure
from tests.reliability.observe import (
    count_events,
    etcd_connections,
    log_events,
    log_length,
    member_at,
    metrics,
    wait_until,
)

TTL = 5
TTLS_KEPT = 10
HEALTHZ = 8474
NETWORK = IPv4Network("10.10.0.0/16")  # the leases the tests write lie in 10.10.200-218, above the first
# 100 free subnets (10.10.1-100) where the hosts get theirs
NOT_USABLE = "ignoring an entry under subnets/ that is not a usable lease"
SAME_IP = "lease ignored: another lease has the same public IP"
OWN_IP = "lease ignored: it announces this host's own public IP"


@dataclass
class Start:
    at: float
    pids: dict[str, int]
    leases: dict[str, tuple[int, int]]  # host -> (etcd lease id, create revision of its key)


def lease_key(c: Cluster, subnet: IPv4Network) -> str:
    return f"{c.etcd_prefix}/subnets/{subnet.with_prefixlen.replace('/', '-')}"


def key_state(c: Cluster, subnet: IPv4Network) -> tuple[int, int] | None:
    out = json.loads(c.etcdctl("get", lease_key(c, subnet), "-w", "json"))
    kvs = out.get("kvs") or []
    return (int(kvs[0].get("lease", 0)), int(kvs[0]["create_revision"])) if kvs else None


def subnet_of(c: Cluster, host: str) -> IPv4Network:
    return SubnetEnv.read(c.subnet_file(host)).subnet.network


def routes(c: Cluster, host: str) -> dict[IPv4Network, str | None]:
    """The host's IPv4 routes other than its default, its link to the switch and its containers' bridge:
    dst -> gateway."""
    out = json.loads(c.run(c.host(host), ["ip", "-j", "-4", "route", "show"]).stdout)
    table = {}
    for r in out:
        if r["dst"] == "default" or r.get("dev") == "docker0":
            continue
        dst = IPv4Network(r["dst"])
        if dst == IPv4Network("10.99.0.0/24"):
            continue
        table[dst] = r.get("gateway")
    return table


def expected_routes(c: Cluster, host: str) -> dict[IPv4Network, str | None]:
    return {subnet_of(c, h): str(c.host(h).address) for h in c.daemons if h != host}


@pytest.fixture(scope="module")
def hostgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Start]]:
    with Cluster(hosts=3, containers_per_host=1, backend="host-gw", workdir=tmp_path_factory.mktemp("hostgw"),
                 daemon_args=["--log-format=json", f"--subnet-lease-ttl={TTL}", f"--healthz-port={HEALTHZ}",
                              "--iptables-forward-rules=false"]) as c:
        for h in c.daemons:
            wait_until(lambda h=h: routes(c, h) == expected_routes(c, h), 30, f"routes on {h}")
        leases = {}
        for h in c.daemons:
            state = key_state(c, subnet_of(c, h))
            assert state is not None and state[0] != 0
            leases[h] = state
        yield c, Start(time.monotonic(), {h: p.pid for h, p in c.daemons.items()}, leases)


def test_bad_entries_are_logged_once_ignored_and_never_routed(hostgw: tuple[Cluster, Start]) -> None:
    c, _ = hostgw
    bad = {
        "10.10.207.0-24": "{not json at all",
        "10.10.208.0-24": json.dumps({"PublicAddr": "10.99.0.78"}),  # wrong field name
        "not-a-subnet": json.dumps({"PublicIP": "10.99.0.79"}),  # wrong key name
        "192.168.5.0-24": json.dumps({"PublicIP": "10.99.0.80"}),  # outside Network
        "10.10.211.0-25": json.dumps({"PublicIP": "10.99.0.81"}),  # another prefix length
        "10.10.212.0-24": json.dumps({"PublicIP": "10.99.0.82", "BackendType": ["host-gw"]}),  # bad type
    }
    marks = {h: log_length(c, h) for h in c.daemons}
    pids = {h: p.pid for h, p in c.daemons.items()}
    for key, value in bad.items():
        c.etcdctl("put", f"{c.etcd_prefix}/subnets/{key}", value)
    # An invalid network config while the daemons run: the config is read at start-up only (as flanneld).
    good_config = c.etcdctl("get", "--print-value-only", f"{c.etcd_prefix}/config").strip()
    c.etcdctl("put", f"{c.etcd_prefix}/config", '{"Network": "10.10.0.0/33", "Backend": {"Type": 7}}')
    try:
        # A valid lease written after the bad ones is routed: the daemons kept processing the watch.
        probe = IPv4Network("10.10.214.0/24")
        c.etcdctl("put", lease_key(c, probe), json.dumps({"PublicIP": "10.99.0.84", "BackendType": "host-gw"}))
        for h in c.daemons:
            wait_until(lambda h=h: routes(c, h).get(probe) == "10.99.0.84", 30, f"{h} routing the probe lease")
        time.sleep(1.0)
        for h in c.daemons:
            assert c.daemons[h].poll() is None and c.daemons[h].pid == pids[h], c.log_tail(h)
            assert routes(c, h) == expected_routes(c, h) | {probe: "10.99.0.84"}, f"{h}: unexpected routes"
            for key in bad:
                n = count_events(c, h, NOT_USABLE, marks[h], key=f"{c.etcd_prefix}/subnets/{key}")
                assert n == 1, f"{h} logged {key} {n} times"
        # A restarted daemon lists them all at start-up and logs each once more, once.
        mark = log_length(c, "h3")
        c.etcdctl("put", f"{c.etcd_prefix}/config", good_config)
        c.stop_daemon("h3")
        c.start_daemon("h3")
        wait_until(lambda: count_events(c, "h3", "flannelpy is running", mark), 30, "h3 running again")
        time.sleep(1.0)
        for key in bad:
            assert count_events(c, "h3", NOT_USABLE, mark, key=f"{c.etcd_prefix}/subnets/{key}") == 1, key
        assert routes(c, "h3") == expected_routes(c, "h3") | {probe: "10.99.0.84"}
        errors = [e for h in c.daemons for e in log_events(c, h)[marks[h]:] if e.get("level") == "error"]
        assert not errors, errors
    finally:
        c.etcdctl("put", f"{c.etcd_prefix}/config", good_config)
        for key in [*bad, "10.10.214.0-24"]:
            c.etcdctl("del", f"{c.etcd_prefix}/subnets/{key}")
    for h in c.daemons:
        wait_until(lambda h=h: routes(c, h) == expected_routes(c, h), 30, f"{h} back to the real peers' routes")


def put(c: Cluster, subnet: IPv4Network, public_ip: str, backend: str | None = "host-gw") -> None:
    value = {"PublicIP": public_ip, "PublicIPv6": None} | ({"BackendType": backend} if backend else {})
    c.etcdctl("put", lease_key(c, subnet), json.dumps(value))


def test_leases_sharing_a_public_ip_one_route_the_same_on_every_host(hostgw: tuple[Cluster, Start]) -> None:
    """A second lease with a running host's PublicIP is routed nowhere (on that host nor on the others) and
    traffic to the host's real subnet goes on; of two leases of another PublicIP every host routes the older,
    and the newer when the older goes. Each passed-over lease is logged once per host, not again on a resync."""
    c, _ = hostgw
    h2 = c.host("h2")
    impostor = IPv4Network("10.10.213.0/24")  # h2's PublicIP, created after h2's own lease
    older, newer = IPv4Network("10.10.215.0/24"), IPv4Network("10.10.216.0/24")  # a host that is not running
    shared = "10.99.0.77"
    marks = {h: log_length(c, h) for h in c.daemons}
    pids = {h: p.pid for h, p in c.daemons.items()}
    put(c, impostor, str(h2.address))
    put(c, older, shared)
    put(c, newer, shared)
    try:
        for h in c.daemons:  # written after the impostor: once it is routed, the impostor was processed
            wait_until(lambda h=h: routes(c, h).get(older) == shared, 30, f"{h} routing {older}")
        time.sleep(1.0)
        for h in c.daemons:
            assert routes(c, h) == expected_routes(c, h) | {older: shared}, f"{h}: unexpected routes"
        a, b = c.host("h1").containers[0], c.host("h3").containers[0]
        target = h2.containers[0]
        assert c.ping(a, target).received == 3 and c.ping(b, target).received == 3, "h2's real subnet unreachable"
        for h in ("h1", "h3"):
            assert count_events(c, h, SAME_IP, marks[h], subnet=str(impostor),
                                used=str(subnet_of(c, "h2"))) == 1, h
        assert count_events(c, "h2", OWN_IP, marks["h2"], subnet=str(impostor)) == 1
        for h in c.daemons:
            assert count_events(c, h, SAME_IP, marks[h], subnet=str(newer), used=str(older)) == 1, h

        # A resync (the member h1's daemon uses killed: the watch breaks, the leases are listed again) logs
        # nothing new and changes no route.
        assert c.etcd is not None
        peers = etcd_connections(c, "h1", pids["h1"])
        victim = member_at(c, sorted(peers)[0]) if peers else "h1"
        count = metrics(c, "h1", HEALTHZ)["flannel_etcd_reconnects_total"]
        c.etcd.kill_member(victim)
        try:
            wait_until(lambda: metrics(c, "h1", HEALTHZ)["flannel_etcd_reconnects_total"] > count, 30,
                       "h1's daemon reconnecting to etcd")
        finally:
            c.etcd.start_member(victim)
        time.sleep(1.0)
        assert count_events(c, "h1", "lease ignored:", marks["h1"]) == 2
        assert routes(c, "h1") == expected_routes(c, "h1") | {older: shared}

        # The older one goes: every host routes the newer one now.
        c.etcdctl("del", lease_key(c, older))
        for h in c.daemons:
            wait_until(lambda h=h: routes(c, h) == expected_routes(c, h) | {newer: shared}, 30,
                       f"{h} routing {newer} once {older} is gone")
        assert all(c.daemons[h].pid == pids[h] and c.daemons[h].poll() is None for h in c.daemons)
        errors = [e for h in c.daemons for e in log_events(c, h)[marks[h]:] if e.get("level") == "error"]
        assert not errors, errors
    finally:
        for subnet in (impostor, older, newer):
            c.etcdctl("del", lease_key(c, subnet))
    for h in c.daemons:
        wait_until(lambda h=h: routes(c, h) == expected_routes(c, h), 30, f"{h} back to the real peers' routes")


def test_a_stopped_peers_lease_expires_and_its_routes_disappear_everywhere(hostgw: tuple[Cluster, Start]) -> None:
    c, _ = hostgw
    gone = subnet_of(c, "h3")
    assert c.stop_daemon("h3") == 0  # a clean stop keeps the lease; nobody renews it now
    stopped = time.monotonic()
    wait_until(lambda: key_state(c, gone) is None, 4 * TTL, "the stopped peer's lease to expire")
    expired = time.monotonic() - stopped
    for h in ("h1", "h2"):
        wait_until(lambda h=h: gone not in routes(c, h), 30, f"{h} dropping the route to {gone}")
    record_figure(f"stopped peer's lease gone from etcd after (TTL {TTL}s)", round(expired, 1), "s")
    record_figure(f"stopped peer's routes gone everywhere after (TTL {TTL}s)",
                  round(time.monotonic() - stopped, 1), "s")
    assert all(c.daemons[h].poll() is None for h in ("h1", "h2"))
    c.start_daemon("h3")  # its subnet file names the subnet, free again
    wait_until(lambda: key_state(c, gone) is not None, 30, "h3 leasing again")
    for h in c.daemons:
        wait_until(lambda h=h: routes(c, h) == expected_routes(c, h), 30, f"routes on {h} after h3 came back")
    assert subnet_of(c, "h3") == gone


def test_a_running_daemon_keeps_its_lease_across_10_ttls(hostgw: tuple[Cluster, Start]) -> None:
    c, start = hostgw
    ttls = TTLS_KEPT * (6 if SOAK else 1)
    time.sleep(max(0.0, start.at + ttls * TTL + 1 - time.monotonic()))
    for h in ("h1", "h2"):  # never stopped by the tests above
        assert c.daemons[h].pid == start.pids[h] and c.daemons[h].poll() is None
        # The same etcd lease on the same key: never expired, never re-created.
        assert key_state(c, subnet_of(c, h)) == start.leases[h], f"{h}'s lease changed"
        assert count_events(c, h, "our lease expired") == 0
        assert count_events(c, h, "etcd lease had expired") == 0
        renewals = count_events(c, h, "Lease renewed")
        assert renewals >= ttls, f"{h} renewed only {renewals} times in {ttls} TTLs"
        ttl_left = json.loads(c.etcdctl("lease", "timetolive", f"{start.leases[h][0]:x}", "-w", "json"))["ttl"]
        assert 0 < ttl_left <= TTL
        # What the operator's dashboard shows follows the renewals (it once stayed at the first expiry: 0).
        assert 0 < metrics(c, h, HEALTHZ)["flannel_lease_ttl_seconds"] <= TTL
    record_figure(f"lease kept across {ttls} TTLs of {TTL}s", ttls, "TTLs")


def test_routes_are_those_of_real_peers_only(hostgw: tuple[Cluster, Start]) -> None:
    c, _ = hostgw
    for h in c.daemons:
        table = routes(c, h)
        assert table == expected_routes(c, h)
        assert all(dst.subnet_of(NETWORK) and IPv4Address(gw) in IPv4Network("10.99.0.0/24")
                   for dst, gw in table.items() if gw)


def test_udp_a_second_lease_with_a_hosts_public_ip_gets_no_route_anywhere(udp_cluster: Cluster) -> None:
    """The udp backend's route table (the data path's): an impostor lease with h2's PublicIP is not routed on any
    host, packets for it are answered "network unreachable", and h2's real subnet keeps working."""
    c = udp_cluster
    h2 = c.host("h2")
    impostor = IPv4Network("10.10.217.0/24")
    probe = IPv4Network("10.10.218.0/24")
    marks = {h: log_length(c, h) for h in c.daemons}
    routed = {h: metrics(c, h, HEALTHZ_PORT)["flannel_routes"] for h in c.daemons}
    put(c, impostor, str(h2.address), backend=None)
    put(c, probe, "10.99.0.88", backend=None)
    try:
        for h in c.daemons:  # written after the impostor: once it is routed, the impostor was processed
            wait_until(lambda h=h: count_events(c, h, "route added", marks[h], subnet=str(probe)), 30,
                       f"{h} routing {probe}")
        for h in c.daemons:
            assert count_events(c, h, "route added", marks[h], subnet=str(impostor)) == 0, f"{h} routed it"
            assert metrics(c, h, HEALTHZ_PORT)["flannel_routes"] == routed[h] + 1, h
            event = OWN_IP if h == "h2" else SAME_IP
            assert count_events(c, h, event, marks[h], subnet=str(impostor)) == 1, h
        for h in ("h1", "h3"):
            src = c.host(h).containers[0]
            assert c.udp_unreachable(src, impostor.network_address + 5) == "ENETUNREACH", h
            assert c.ping(src, h2.containers[0]).received == 3, f"{h} -> h2's real subnet"
    finally:
        for subnet in (impostor, probe):
            c.etcdctl("del", lease_key(c, subnet))
