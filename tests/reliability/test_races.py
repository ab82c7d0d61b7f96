"""Daemons racing for subnets: 50 started at once for 16 subnets, 20 at once on a roomy network.

Each daemon runs in its own host namespace with the alloc backend (a lease and nothing else) and without
iptables rules, so the race is the control plane's alone.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from flannelpy.errors import ExitCode
from flannelpy.lab.cluster import Cluster, SubnetEnv
from tests.reliability.conftest import record_figure
from tests.reliability.observe import count_events, wait_until

TIGHT = {"Network": "10.30.0.0/20", "SubnetLen": 24, "SubnetMin": "10.30.0.0", "SubnetMax": "10.30.15.0",
         "Backend": {"Type": "alloc"}}  # room for exactly 16 subnets
ROOMY = {"Network": "10.31.0.0/16", "Backend": {"Type": "alloc"}}
CONTENDERS = 50
ROOMY_DAEMONS = 20


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-member etcd on h1..h3 and 50 host namespaces, no daemon running yet."""
    c = Cluster(hosts=3, containers_per_host=0, config=TIGHT, workdir=tmp_path_factory.mktemp("races"),
                daemon_args=["--log-format=json", "--iptables-forward-rules=false"])
    with c:
        stop_all(c)
        while len(c.topology.hosts) < CONTENDERS:
            c.topology.add_host()
        yield c
        stop_all(c)


def stop_all(c: Cluster) -> None:
    """SIGTERM to every daemon at once, then reap each (stop_daemon one by one waits for each in turn)."""
    for proc in c.daemons.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for name in list(c.daemons):
        c.stop_daemon(name)


def start_all(c: Cluster, config: dict[str, object], count: int) -> list[str]:
    """Fresh state (no leases, no subnet files), then `count` daemons started back to back."""
    stop_all(c)
    c.etcdctl("del", "--prefix", f"{c.etcd_prefix}/subnets/")
    c.etcdctl("put", f"{c.etcd_prefix}/config", json.dumps(config))
    names = list(c.topology.hosts)[:count]
    for name in names:
        c.subnet_file(name).unlink(missing_ok=True)
        c.log_file(name).unlink(missing_ok=True)
    for name in names:
        c.start_daemon(name)
    return names


def settled(c: Cluster, names: list[str]) -> bool:
    return all(c.daemons[n].poll() is not None or c.subnet_file(n).exists() for n in names)


def test_50_daemons_race_for_16_subnets(hosts: Cluster) -> None:
    c = hosts
    started = time.monotonic()
    names = start_all(c, TIGHT, CONTENDERS)
    wait_until(lambda: settled(c, names), 240, "every daemon to hold a lease or exit")
    record_figure("50 daemons racing for 16 subnets: all settled after", round(time.monotonic() - started, 1), "s")
    time.sleep(2.0)  # a loser that exits late would show up now
    winners = [n for n in names if c.daemons[n].poll() is None]
    losers = [n for n in names if c.daemons[n].poll() is not None]
    codes = {n: c.daemons[n].returncode for n in losers}
    assert len(winners) == 16, f"{len(winners)} daemons hold a lease; exit codes of the rest: {codes}"
    assert set(codes.values()) == {ExitCode.OUT_OF_SUBNETS}, codes
    for n in losers:
        assert "out of subnets" in c.log_file(n).read_text(), c.log_tail(n)
    subnets = {n: SubnetEnv.read(c.subnet_file(n)).subnet.network for n in winners}
    assert len(set(subnets.values())) == 16
    assert all(s.subnet_of(IPv4Network(TIGHT["Network"])) for s in subnets.values())  # type: ignore[arg-type]
    leases = c.leases()
    assert set(leases) == set(subnets.values())
    for n, subnet in subnets.items():
        assert leases[subnet]["PublicIP"] == str(c.host(n).address)
    lost = sum(count_events(c, n, "another host claimed the subnet first") for n in names)
    record_figure("50 daemons racing for 16 subnets: lost claim races (retried)", lost)
    # The winners are unaffected by the losers' exit: still running, same leases, no revocation.
    pids = {n: c.daemons[n].pid for n in winners}
    time.sleep(3.0)
    assert {n: c.daemons[n].pid for n in winners if c.daemons[n].poll() is None} == pids
    assert c.leases() == leases
    for n in winners:
        assert count_events(c, n, "Lease has been revoked") == 0


def test_20_daemons_on_a_roomy_network_get_20_distinct_subnets(hosts: Cluster) -> None:
    c = hosts
    started = time.monotonic()
    names = start_all(c, ROOMY, ROOMY_DAEMONS)
    wait_until(lambda: settled(c, names), 180, "every daemon to hold a lease or exit")
    record_figure("20 daemons started at once: all holding leases after", round(time.monotonic() - started, 1), "s")
    exited = {n: c.daemons[n].returncode for n in names if c.daemons[n].poll() is not None}
    assert not exited, {n: c.log_tail(n) for n in exited}
    subnets = [SubnetEnv.read(c.subnet_file(n)).subnet.network for n in names]
    assert len(set(subnets)) == ROOMY_DAEMONS
    assert set(c.leases()) == set(subnets)
    lost = sum(count_events(c, n, "another host claimed the subnet first") for n in names)
    assert all(count_events(c, n, "could not claim a subnet") == 0 for n in names)  # no retries exhausted
    record_figure("20 daemons started at once: lost claim races (retried)", lost)
