"""Leases over time and bad data in etcd, on a host-gw cluster (its routes are plain `ip route` entries).

The daemons run with the test-only --subnet-lease-ttl=5 (renewed when 2/3 of the TTL are left, see
docs/operations.md): a stopped peer's lease expires and its routes disappear everywhere, a running daemon
keeps its one etcd lease across 10 TTLs, and entries under subnets/ that are not usable leases are logged
once and never routed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannelpy.lab.cluster import Cluster, SubnetEnv
from tests.reliability.conftest import SOAK, record_figure
from tests.reliability.observe import count_events, log_events, log_length, wait_until

TTL = 5
TTLS_KEPT = 10
HEALTHZ = 8474
NETWORK = IPv4Network("10.10.0.0/16")
NOT_USABLE = "ignoring an entry under subnets/ that is not a usable lease"


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
    """The host's IPv4 routes other than its default and its link to the switch: dst -> gateway."""
    out = json.loads(c.run(c.host(host), ["ip", "-j", "-4", "route", "show"]).stdout)
    table = {}
    for r in out:
        if r["dst"] == "default":
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
    with Cluster(hosts=3, containers_per_host=0, backend="host-gw", workdir=tmp_path_factory.mktemp("hostgw"),
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
    h2 = c.host("h2")
    bad = {
        "10.10.77.0-24": "{not json at all",
        "10.10.78.0-24": json.dumps({"PublicAddr": "10.99.0.78"}),  # wrong field name
        "not-a-subnet": json.dumps({"PublicIP": "10.99.0.79"}),  # wrong key name
        "192.168.5.0-24": json.dumps({"PublicIP": "10.99.0.80"}),  # outside Network
        "10.10.81.0-25": json.dumps({"PublicIP": "10.99.0.81"}),  # another prefix length
        "10.10.82.0-24": json.dumps({"PublicIP": "10.99.0.82", "BackendType": ["host-gw"]}),  # bad type
    }
    duplicate = IPv4Network("10.10.83.0/24")  # a second lease carrying h2's PublicIP
    marks = {h: log_length(c, h) for h in c.daemons}
    pids = {h: p.pid for h, p in c.daemons.items()}
    for key, value in bad.items():
        c.etcdctl("put", f"{c.etcd_prefix}/subnets/{key}", value)
    c.etcdctl("put", lease_key(c, duplicate), json.dumps({"PublicIP": str(h2.address), "BackendType": "host-gw"}))
    # An invalid network config while the daemons run: the config is read at start-up only (as flanneld).
    good_config = c.etcdctl("get", "--print-value-only", f"{c.etcd_prefix}/config").strip()
    c.etcdctl("put", f"{c.etcd_prefix}/config", '{"Network": "10.10.0.0/33", "Backend": {"Type": 7}}')
    try:
        # A valid lease written after the bad ones is routed: the daemons kept processing the watch.
        probe = IPv4Network("10.10.84.0/24")
        c.etcdctl("put", lease_key(c, probe), json.dumps({"PublicIP": "10.99.0.84", "BackendType": "host-gw"}))
        for h in c.daemons:
            wait_until(lambda h=h: routes(c, h).get(probe) == "10.99.0.84", 30, f"{h} routing the probe lease")
        time.sleep(1.0)
        for h in c.daemons:
            assert c.daemons[h].poll() is None and c.daemons[h].pid == pids[h], c.log_tail(h)
            want = expected_routes(c, h) | {probe: "10.99.0.84"}
            if h != "h2":
                want[duplicate] = str(h2.address)  # flanneld's behaviour on the other hosts (docs/operations.md)
            assert routes(c, h) == want, f"{h}: unexpected routes"
            for key in bad:
                n = count_events(c, h, NOT_USABLE, marks[h], key=f"{c.etcd_prefix}/subnets/{key}")
                assert n == 1, f"{h} logged {key} {n} times"
        assert count_events(c, "h2", "Lease not routed", marks["h2"], subnet=str(duplicate)) == 1
        # A restarted daemon lists them all at start-up and logs each once more, once.
        mark = log_length(c, "h3")
        c.etcdctl("put", f"{c.etcd_prefix}/config", good_config)
        c.stop_daemon("h3")
        c.start_daemon("h3")
        wait_until(lambda: count_events(c, "h3", "flannelpy is running", mark), 30, "h3 running again")
        time.sleep(1.0)
        for key in bad:
            assert count_events(c, "h3", NOT_USABLE, mark, key=f"{c.etcd_prefix}/subnets/{key}") == 1, key
        assert routes(c, "h3") == expected_routes(c, "h3") | {probe: "10.99.0.84", duplicate: str(h2.address)}
        errors = [e for h in c.daemons for e in log_events(c, h)[marks[h]:] if e.get("level") == "error"]
        assert not errors, errors
    finally:
        c.etcdctl("put", f"{c.etcd_prefix}/config", good_config)
        for key in [*bad, "10.10.83.0-24", "10.10.84.0-24"]:
            c.etcdctl("del", f"{c.etcd_prefix}/subnets/{key}")
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
    record_figure(f"lease kept across {ttls} TTLs of {TTL}s", ttls, "TTLs")


def test_routes_are_those_of_real_peers_only(hostgw: tuple[Cluster, Start]) -> None:
    c, _ = hostgw
    for h in c.daemons:
        table = routes(c, h)
        assert table == expected_routes(c, h)
        assert all(dst.subnet_of(NETWORK) and IPv4Address(gw) in IPv4Network("10.99.0.0/24")
                   for dst, gw in table.items() if gw)
