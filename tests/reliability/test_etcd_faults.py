"""etcd faults while containers on different hosts exchange traffic over the udp backend.

For each fault (the member the daemons talk to killed, the leader killed, a member frozen with SIGSTOP, the
whole etcd cluster stopped and started again): traffic on the routes already known keeps flowing, no daemon
restarts (same PID, /healthz stays 200), each renews its lease afterwards, and a lease added and a lease
removed meanwhile reach every daemon exactly once (one "route added"/"route removed" log line each).

CI durations are scaled down; FLANNELPY_SOAK=1 uses the issue's (30 s frozen member, 2-minute outage).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network

import pytest

from flannelpy.lab.cluster import Cluster
from flannelpy.lab.topology import run
from tests.reliability.conftest import HEALTHZ_PORT, LEASE_TTL, SOAK, record_figure
from tests.reliability.observe import (
    GapPing,
    count_events,
    etcd_connections,
    etcd_leader,
    http_get,
    log_events,
    log_length,
    member_at,
    metrics,
    wait_until,
)

FREEZE_SECONDS = 30.0 if SOAK else 10.0
OUTAGE_SECONDS = 120.0 if SOAK else 20.0
PING_INTERVAL = 0.05
_fake = itertools.cycle(range(128, 255))  # above the first 100 free subnets, where real hosts get theirs


@dataclass
class FakeLease:
    """A lease of a host that does not exist (reservation: no etcd lease), written with etcdctl."""

    subnet: IPv4Network
    public_ip: str

    @classmethod
    def next(cls) -> FakeLease:
        n = next(_fake)
        return cls(IPv4Network(f"10.10.{n}.0/24"), "10.99.0.250")

    @property
    def value(self) -> str:
        return json.dumps({"PublicIP": self.public_ip, "PublicIPv6": None})


def etcdctl_via(cluster: Cluster, host: str, *args: str) -> str:
    """etcdctl against the one member on `host` (with a frozen member in the endpoint list etcdctl may hang)."""
    assert cluster.etcd is not None
    endpoint = cluster.etcd.member(host).client_url
    argv = cluster.host(host).exec_argv(["env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={endpoint}", *args])
    deadline = time.monotonic() + 30
    while True:  # right after a member died the others may still be electing a leader
        proc = run(argv, timeout=30, check=False)
        if proc.returncode == 0:
            return proc.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"etcdctl {' '.join(args)} via {host} failed: {proc.stderr}")
        time.sleep(0.5)


def put_lease(cluster: Cluster, lease: FakeLease, via: str | None = None) -> None:
    args = ("put", f"{cluster.etcd_prefix}/subnets/{lease.subnet.with_prefixlen.replace('/', '-')}", lease.value)
    cluster.etcdctl(*args) if via is None else etcdctl_via(cluster, via, *args)


def delete_lease(cluster: Cluster, lease: FakeLease, via: str | None = None) -> None:
    args = ("del", f"{cluster.etcd_prefix}/subnets/{lease.subnet.with_prefixlen.replace('/', '-')}")
    cluster.etcdctl(*args) if via is None else etcdctl_via(cluster, via, *args)


def route_events(cluster: Cluster, host: str, lease: FakeLease, after: int) -> tuple[int, int]:
    subnet = str(lease.subnet)
    return (count_events(cluster, host, "route added", after, subnet=subnet),
            count_events(cluster, host, "route removed", after, subnet=subnet))


def talked_to(cluster: Cluster) -> str:
    """The etcd member most daemons hold connections to."""
    counts: dict[str, int] = {}
    for host, proc in cluster.daemons.items():
        for address in etcd_connections(cluster, host, proc.pid):
            counts[address] = counts.get(address, 0) + 1
    assert counts, "no daemon holds a connection to etcd"
    return member_at(cluster, max(counts, key=lambda a: counts[a]))


@pytest.fixture
def flows(udp_cluster: Cluster) -> Iterator[list[GapPing]]:
    """Pings around the ring h1 -> h2 -> h3 -> h1, on routes every daemon already knows."""
    containers = [h.containers[0] for h in udp_cluster.topology.hosts.values()]
    for a, b in zip(containers, containers[1:] + containers[:1], strict=True):
        assert udp_cluster.wait_reachable(a, b).received
    pings = [GapPing(udp_cluster, a, b, PING_INTERVAL)
             for a, b in zip(containers, containers[1:] + containers[:1], strict=True)]
    yield pings
    for p in pings:
        try:
            p.stop()
        except AssertionError:
            pass


def survive(cluster: Cluster, flows: list[GapPing], fault: str, inject: Callable[[], None],
            restore: Callable[[], None], during: float, via: str | None) -> dict[str, float]:
    """Run one fault; a lease is added and another removed while it lasts (through member `via`, or right
    after the restore when `via` is None: nothing can be written while etcd is down)."""
    before_lease, new_lease = FakeLease.next(), FakeLease.next()
    put_lease(cluster, before_lease)
    hosts = list(cluster.daemons)
    for h in hosts:
        wait_until(lambda h=h: route_events(cluster, h, before_lease, 0)[0], 30, f"{h} routing {before_lease}")
    pids = {h: p.pid for h, p in cluster.daemons.items()}
    marks = {h: log_length(cluster, h) for h in hosts}

    inject()
    faulted = time.monotonic()
    if via is not None:
        put_lease(cluster, new_lease, via)
        delete_lease(cluster, before_lease, via)
        written = time.monotonic()
        for h in hosts:  # the changes arrive while the fault lasts
            wait_until(lambda h=h: route_events(cluster, h, new_lease, marks[h]) == (1, 0)
                       and route_events(cluster, h, before_lease, marks[h]) == (0, 1),
                       max(during, 30), f"{h} applying the lease changes made during '{fault}'")
        record_figure(f"lease change seen by every daemon during: {fault}", round(time.monotonic() - written, 2),
                      "s")
    for h in hosts:
        assert http_get(cluster, h, HEALTHZ_PORT, "/healthz")[0] == 200, f"{h} not live during {fault}"
    time.sleep(max(0.0, during - (time.monotonic() - faulted)))
    restore_marks = {h: log_length(cluster, h) for h in hosts}
    restore()
    restored = time.monotonic()
    if via is None:
        put_lease(cluster, new_lease)
        delete_lease(cluster, before_lease)
    for h in hosts:
        wait_until(lambda h=h: route_events(cluster, h, new_lease, marks[h]) == (1, 0)
                   and route_events(cluster, h, before_lease, marks[h]) == (0, 1),
                   60, f"{h} applying the lease changes made around '{fault}'")
    seen = time.monotonic() - restored
    for h in hosts:
        wait_until(lambda h=h: count_events(cluster, h, "Lease renewed", restore_marks[h]), 60,
                   f"{h} renewing its lease after '{fault}'")
    renewed = time.monotonic() - restored
    time.sleep(1.0)  # anything applied twice would show up by now

    results = [f.stop() for f in flows]
    flows.clear()
    for h in hosts:
        proc = cluster.daemons[h]
        assert proc.poll() is None and proc.pid == pids[h], f"flannelpy on {h} restarted during {fault}"
        added, removed = route_events(cluster, h, new_lease, marks[h])
        assert (added, removed) == (1, 0), f"{h}: {new_lease.subnet} added {added}x, removed {removed}x"
        added, removed = route_events(cluster, h, before_lease, marks[h])
        assert (added, removed) == (0, 1), f"{h}: {before_lease.subnet} added {added}x, removed {removed}x"
        applied = [e for e in log_events(cluster, h)[marks[h]:] if str(new_lease.subnet) in e.get("added", [])]
        assert len(applied) == 1, f"{h} applied {new_lease.subnet} {len(applied)} times: {applied}"
        # Two real peers plus the fake lease.
        assert metrics(cluster, h, HEALTHZ_PORT)["flannel_routes"] == 2.0 + 1
    for r in results:
        assert r["sent"] > 0
        assert r["lost"] <= max(2, r["sent"] // 100), f"traffic disturbed by '{fault}': {r}"
    delete_lease(cluster, new_lease)
    gap = max(r["longest_gap_s"] for r in results)
    record_figure(f"longest ping gap during: {fault}", gap, "s", lost=sum(r["lost"] for r in results),
                  sent=sum(r["sent"] for r in results))
    record_figure(f"lease changes applied after restore: {fault}", round(seen, 2), "s")
    record_figure(f"first renewal after restore: {fault}", round(renewed, 2), "s")
    return {"seen": seen, "renewed": renewed}


def test_kill_the_member_the_daemons_talk_to(udp_cluster: Cluster, flows: list[GapPing]) -> None:
    c = udp_cluster
    assert c.etcd is not None
    victim = talked_to(c)
    survivor = next(m.name for m in c.etcd.members if m.name != victim)
    survive(c, flows, f"SIGKILL of etcd member {victim} (the one the daemons use)",
            lambda: c.etcd.kill_member(victim), lambda: c.etcd.start_member(victim),  # type: ignore[union-attr]
            during=3.0, via=survivor)


def test_kill_the_leader(udp_cluster: Cluster, flows: list[GapPing]) -> None:
    c = udp_cluster
    assert c.etcd is not None
    leader = etcd_leader(c)
    survivor = next(m.name for m in c.etcd.members if m.name != leader)
    survive(c, flows, f"SIGKILL of the etcd leader {leader}",
            lambda: c.etcd.kill_member(leader), lambda: c.etcd.start_member(leader),  # type: ignore[union-attr]
            during=3.0, via=survivor)


def test_frozen_member_is_abandoned_within_seconds(udp_cluster: Cluster, flows: list[GapPing]) -> None:
    c = udp_cluster
    assert c.etcd is not None
    frozen = talked_to(c)
    frozen_ip = c.etcd.member(frozen).ip
    survivor = next(m.name for m in c.etcd.members if m.name != frozen)
    abandoned: dict[str, float] = {}

    def freeze() -> None:
        c.etcd.pause_member(frozen)  # type: ignore[union-attr]
        start = time.monotonic()
        for h, proc in c.daemons.items():
            wait_until(lambda h=h, pid=proc.pid: frozen_ip not in etcd_connections(c, h, pid), 30,
                       f"{h} leaving the frozen member {frozen}")
            abandoned[h] = time.monotonic() - start

    survive(c, flows, f"SIGSTOP of etcd member {frozen} for {FREEZE_SECONDS:g}s", freeze,
            lambda: c.etcd.resume_member(frozen), during=FREEZE_SECONDS, via=survivor)  # type: ignore[union-attr]
    record_figure("frozen member abandoned by every daemon after", round(max(abandoned.values()), 2), "s")


@pytest.mark.slow
def test_whole_etcd_cluster_stopped_and_started_again(udp_cluster: Cluster, flows: list[GapPing]) -> None:
    c = udp_cluster
    assert c.etcd is not None
    names = [m.name for m in c.etcd.members]
    marks = {h: log_length(c, h) for h in c.daemons}

    def stop_all() -> None:
        for name in names:
            c.etcd.kill_member(name)  # type: ignore[union-attr]

    survive(c, flows, f"whole etcd cluster down for {OUTAGE_SECONDS:g}s", stop_all,
            lambda: c.etcd.start(60), during=OUTAGE_SECONDS, via=None)  # type: ignore[union-attr]
    for h in c.daemons:
        # The renewal fell into the outage (TTL LEASE_TTL s): it failed, was retried and succeeded.
        assert count_events(c, h, "Lease renewal failed", marks[h]) >= 1, f"{h} never tried to renew"
    assert OUTAGE_SECONDS > LEASE_TTL
