"""vxlan and host-gw on the three-host cluster, as an operator checks them: the kernel state flanneld would
program, repairs within one resync, no stale state, ip-masq rules that live and die with the daemon, and the
Docker options for the lease."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network

import pytest

from flannelpy.lab.cluster import Cluster, SubnetEnv

RESYNC = 10.0  # flanneld's route-check interval, which both backends keep


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def kcluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(hosts=3, containers_per_host=1, backend=request.param, daemon_args=["--ip-masq"],
                 workdir=tmp_path_factory.mktemp(request.param)) as c:
        yield c


def _ip_json(c: Cluster, host: str, *args: str) -> list[dict[str, object]]:
    out = c.run(c.host(host), ["ip", "-j", *args]).stdout
    return json.loads(out) if out.strip() else []


def _routes(c: Cluster, host: str) -> dict[str, dict[str, object]]:
    return {str(r["dst"]): r for r in _ip_json(c, host, "route", "show")}


def _subnet(c: Cluster, host: str) -> IPv4Network:
    return SubnetEnv.read(c.subnet_file(host)).subnet.network


def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.5)


def test_kernel_state_is_what_flanneld_programs(kcluster: Cluster) -> None:
    routes = _routes(kcluster, "h1")
    leases = kcluster.leases()
    for peer in ("h2", "h3"):
        subnet = _subnet(kcluster, peer)
        route = routes[str(subnet)]
        if kcluster.backend == "vxlan":
            assert route["dev"] == "flannel.1" and route["gateway"] == str(subnet.network_address)
            assert "onlink" in route.get("flags", [])
            mac = leases[subnet]["BackendData"]["VtepMAC"]
            neigh = {n["dst"]: n for n in _ip_json(kcluster, "h1", "neigh", "show", "dev", "flannel.1")}
            assert neigh[str(subnet.network_address)]["lladdr"] == mac
            assert "PERMANENT" in neigh[str(subnet.network_address)]["state"]
            fdb = kcluster.run(kcluster.host("h1"), ["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
            assert f"{mac} dst {kcluster.host(peer).address} self permanent" in fdb
        else:
            assert route["dev"] == "eth0" and route["gateway"] == str(kcluster.host(peer).address)
    if kcluster.backend == "vxlan":
        link = _ip_json(kcluster, "h1", "-d", "link", "show", "flannel.1")[0]
        info = link["linkinfo"]["info_data"]
        assert info["id"] == 1 and info["port"] == 8472 and info.get("learning") is False
        assert link["mtu"] == 1450


def test_route_deleted_by_hand_comes_back_within_one_resync(kcluster: Cluster) -> None:
    subnet = str(_subnet(kcluster, "h2"))
    kcluster.run(kcluster.host("h1"), ["ip", "route", "del", subnet])
    assert subnet not in _routes(kcluster, "h1")
    _eventually(lambda: subnet in _routes(kcluster, "h1"), RESYNC + 5, f"route {subnet} restored on h1")
    result = kcluster.wait_reachable(kcluster.container("h1-c1"), kcluster.container("h2-c1"))
    assert result.received


def test_stale_route_into_the_network_is_removed_and_others_are_untouched(kcluster: Cluster) -> None:
    dev, via = ("flannel.1", "10.10.250.0") if kcluster.backend == "vxlan" else ("eth0", "10.99.0.250")
    h1 = kcluster.host("h1")
    kcluster.run(h1, ["ip", "route", "add", "10.10.250.0/24", "via", via, "dev", dev, "onlink"])
    kcluster.run(h1, ["ip", "route", "add", "172.31.77.0/24", "via", via, "dev", dev, "onlink"])
    try:
        _eventually(lambda: "10.10.250.0/24" not in _routes(kcluster, "h1"), RESYNC + 5,
                    "stale route for a vanished lease removed")
        assert "172.31.77.0/24" in _routes(kcluster, "h1"), "a route outside the network was touched"
    finally:
        kcluster.run(h1, ["ip", "route", "del", "172.31.77.0/24"], check=False)


def test_docker_options_for_the_lease(kcluster: Cluster) -> None:
    env = SubnetEnv.read(kcluster.subnet_file("h1"))
    dest = kcluster.host_dir("h1") / "docker_opts.env"
    subprocess.run([sys.executable, "-m", "flannelpy", "mk-docker-opts", "-f", str(kcluster.subnet_file("h1")),
                    "-d", str(dest), "-c"], check=True, timeout=30)
    text = dest.read_text()
    assert f'DOCKER_OPTS=" --bip={env.subnet} --ip-masq=false --mtu={env.mtu}"' in text


def _rules(c: Cluster, host: str, table: str, chain: str) -> str | None:
    proc = c.run(c.host(host), ["iptables", "-w", "-t", table, "-S", chain], check=False)
    return proc.stdout if proc.returncode == 0 else None


def test_masq_and_forward_rules_live_while_running_and_go_on_sigterm(kcluster: Cluster) -> None:
    masq = _rules(kcluster, "h3", "nat", "FLANNEL-POSTRTG")
    fwd = _rules(kcluster, "h3", "filter", "FLANNEL-FWD")
    assert masq is not None and "MASQUERADE" in masq and "flanneld masq" in masq
    assert fwd is not None and "-s 10.10.0.0/16" in fwd and "flanneld forward" in fwd
    assert kcluster.stop_daemon("h3") == 0
    assert _rules(kcluster, "h3", "nat", "FLANNEL-POSTRTG") is None
    assert _rules(kcluster, "h3", "filter", "FLANNEL-FWD") is None
    postrouting = kcluster.run(kcluster.host("h3"), ["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"]).stdout
    assert "FLANNEL-POSTRTG" not in postrouting
