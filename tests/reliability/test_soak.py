"""The issue's full-size reliability run (issue 7), in CI: a 10-minute traffic run between containers on
different hosts (udp backend, iperf3 at a moderate rate, pings around the ring) during which etcd is faulted
at the issue's sizes:

    the member the daemons talk to killed (3 s) | the leader killed (3 s) | a member frozen with SIGSTOP (30 s)
    | the whole etcd cluster stopped for 2 minutes and started again | 100 route changes and 20 etcd
    reconnects | quiet traffic until the 10 minutes are over

A lease is added and another removed during each fault. The `soak` fixture runs all of it once and records
what went wrong by property; each test asserts one property (traffic keeps flowing on known routes, no daemon
restarts, lease changes seen exactly once, leases renewed, frozen member abandoned, memory flat and
descriptors not growing). The run is mostly idle CPU-wise: scripts/test.sh starts it first, on its own xdist
worker, next to the rest of the suite. FLANNELPY_QUICK=1 shrinks it (10 s freeze, 20 s outage, 2.5 minutes
of traffic) for a local run.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannelpy.lab.cluster import Cluster, throughput_bps
from flannelpy.lab.topology import run
from tests.reliability.conftest import HEALTHZ_PORT, LEASE_TTL, QUICK, record_figure
from tests.reliability.observe import (
    GapPing,
    count_events,
    etcd_connections,
    etcd_leader,
    fd_count,
    http_get,
    log_events,
    log_length,
    member_at,
    metrics,
    rss_kb,
    wait_until,
)

TRAFFIC_SECONDS = 150 if QUICK else 600
KILL_SECONDS = 3.0
FREEZE_SECONDS = 10.0 if QUICK else 30.0
OUTAGE_SECONDS = 20.0 if QUICK else 120.0
ROUTE_CHANGES = 100
RECONNECTS = 20
IPERF_RATE = "30M"  # moderate: the run shares 2 cores with the rest of the suite
PING_INTERVAL = 0.05
SAMPLE_EVERY = 5.0
RSS_GROWTH_KB = 30 * 1024  # generous: Python's allocator keeps arenas; a leak per packet or event shows more
FD_GROWTH = 8
TIMEOUT = TRAFFIC_SECONDS + 300  # pytest-timeout: the whole run happens in the first test's setup

# The properties the tests assert, each fed by every phase of the run.
TRAFFIC = "traffic on known routes"
NO_RESTART = "no daemon restart"
LEASE_CHANGES = "lease changes seen exactly once"
RENEWAL = "lease renewed after each fault"
FROZEN = "frozen member abandoned"
BOUNDS = "memory and file descriptors"

pytestmark = [pytest.mark.soak, pytest.mark.timeout(TIMEOUT)]

_fake = itertools.count(128)  # above the first 100 free subnets, where real hosts get theirs


@dataclass
class FakeLease:
    """A lease of a host that does not exist (reservation: no etcd lease), written with etcdctl; each has its
    own PublicIP (leases sharing one are deduplicated)."""

    subnet: IPv4Network
    public_ip: str

    @classmethod
    def next(cls) -> FakeLease:
        n = next(_fake)
        assert n < 255, "out of fake subnets"
        return cls(IPv4Network(f"10.10.{n}.0/24"), f"10.99.0.{n - 100}")

    @property
    def key(self) -> str:
        return self.subnet.with_prefixlen.replace("/", "-")

    @property
    def value(self) -> str:
        return json.dumps({"PublicIP": self.public_ip, "PublicIPv6": None})


def etcdctl_via(c: Cluster, host: str, *args: str) -> str:
    """etcdctl against the one member on `host` (with a frozen member in the endpoint list etcdctl may hang)."""
    assert c.etcd is not None
    argv = c.host(host).exec_argv(["env", "ETCDCTL_API=3", "etcdctl",
                                   f"--endpoints={c.etcd.member(host).client_url}", *args])
    deadline = time.monotonic() + 30
    while True:  # right after a member died the others may still be electing a leader
        proc = run(argv, timeout=30, check=False)
        if proc.returncode == 0:
            return proc.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"etcdctl {' '.join(args)} via {host} failed: {proc.stderr}")
        time.sleep(0.5)


def put_lease(c: Cluster, lease: FakeLease, via: str | None = None) -> None:
    args = ("put", f"{c.etcd_prefix}/subnets/{lease.key}", lease.value)
    c.etcdctl(*args) if via is None else etcdctl_via(c, via, *args)


def delete_lease(c: Cluster, lease: FakeLease, via: str | None = None) -> None:
    args = ("del", f"{c.etcd_prefix}/subnets/{lease.key}")
    c.etcdctl(*args) if via is None else etcdctl_via(c, via, *args)


def route_events(c: Cluster, host: str, lease: FakeLease, after: int) -> tuple[int, int]:
    subnet = str(lease.subnet)
    return (count_events(c, host, "route added", after, subnet=subnet),
            count_events(c, host, "route removed", after, subnet=subnet))


def talked_to(c: Cluster) -> str:
    """The etcd member most daemons hold connections to."""
    counts: dict[str, int] = {}
    for host, proc in c.daemons.items():
        for address in etcd_connections(c, host, proc.pid):
            counts[address] = counts.get(address, 0) + 1
    assert counts, "no daemon holds a connection to etcd"
    return member_at(c, max(counts, key=lambda a: counts[a]))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


@dataclass
class Soak:
    """What the run saw; `failures` holds, by property, every check that did not hold (the run goes on)."""

    cluster: Cluster
    pids: dict[str, int]
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    checked: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    fds: dict[str, tuple[int, int]] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)
    abandoned: dict[str, float] = field(default_factory=dict)

    def expect(self, prop: str, ok: bool, message: str) -> bool:
        self.checked[prop] += 1
        if not ok:
            self.failures[prop].append(message)
        return ok

    def wait(self, prop: str, check: Callable[[], object], timeout: float, what: str) -> bool:
        self.checked[prop] += 1
        try:
            wait_until(check, timeout, what)
        except AssertionError as e:
            self.failures[prop].append(str(e))
            return False
        return True

    def verdict(self, prop: str) -> None:
        assert self.checked[prop], f"nothing checked for '{prop}': the run stopped early"
        assert not self.failures[prop], "\n".join(self.failures[prop])


def ring_pings(c: Cluster) -> list[GapPing]:
    """Pings around the ring h1 -> h2 -> h3 -> h1, on routes every daemon already knows."""
    containers = [h.containers[0] for h in c.topology.hosts.values()]
    pairs = list(zip(containers, containers[1:] + containers[:1], strict=True))
    return [GapPing(c, a, b, PING_INTERVAL) for a, b in pairs]


def stop_pings(s: Soak, pings: list[GapPing], during: str) -> None:
    results = [p.stop() for p in pings]
    for r in results:
        s.expect(TRAFFIC, r["sent"] > 0 and r["lost"] <= max(2, r["sent"] // 100),
                 f"traffic disturbed by '{during}': {r}")
    record_figure(f"longest ping gap during: {during}", max(r["longest_gap_s"] for r in results), "s",
                  lost=sum(r["lost"] for r in results), sent=sum(r["sent"] for r in results))


def fault(s: Soak, name: str, inject: Callable[[], None], restore: Callable[[], None], during: float,
          via: str | None) -> None:
    """One fault with pings around the ring; a lease is added and another removed while it lasts (through
    member `via`, or right after the restore when `via` is None: nothing can be written while etcd is down)."""
    c = s.cluster
    hosts = list(c.daemons)
    before_lease, new_lease = FakeLease.next(), FakeLease.next()
    put_lease(c, before_lease)
    for h in hosts:
        s.wait(LEASE_CHANGES, lambda h=h: route_events(c, h, before_lease, 0)[0], 30, f"{h} routing {before_lease}")
    marks = {h: log_length(c, h) for h in hosts}
    pings = ring_pings(c)
    try:
        inject()
        faulted = time.monotonic()
        if via is not None:
            put_lease(c, new_lease, via)
            delete_lease(c, before_lease, via)
            written = time.monotonic()
            for h in hosts:  # the changes arrive while the fault lasts
                s.wait(LEASE_CHANGES, lambda h=h: route_events(c, h, new_lease, marks[h]) == (1, 0)
                       and route_events(c, h, before_lease, marks[h]) == (0, 1),
                       max(during, 30), f"{h} applying the lease changes made during '{name}'")
            record_figure(f"lease change seen by every daemon during: {name}",
                          round(time.monotonic() - written, 2), "s")
        for h in hosts:
            status = http_get(c, h, HEALTHZ_PORT, "/healthz")[0]
            s.expect(NO_RESTART, status == 200, f"{h}: /healthz {status} during '{name}'")
        time.sleep(max(0.0, during - (time.monotonic() - faulted)))
        restore_marks = {h: log_length(c, h) for h in hosts}
        restore()
        restored = time.monotonic()
        if via is None:
            put_lease(c, new_lease)
            delete_lease(c, before_lease)
        for h in hosts:
            s.wait(LEASE_CHANGES, lambda h=h: route_events(c, h, new_lease, marks[h]) == (1, 0)
                   and route_events(c, h, before_lease, marks[h]) == (0, 1),
                   60, f"{h} applying the lease changes made around '{name}'")
        seen = time.monotonic() - restored
        for h in hosts:
            s.wait(RENEWAL, lambda h=h: count_events(c, h, "Lease renewed", restore_marks[h]), 60,
                   f"{h} renewing its lease after '{name}'")
        renewed = time.monotonic() - restored
        time.sleep(1.0)  # anything applied twice would show up by now
    finally:
        stop_pings(s, pings, name)
    for h in hosts:
        proc = c.daemons[h]
        s.expect(NO_RESTART, proc.poll() is None and proc.pid == s.pids[h], f"flannelpy on {h} restarted during {name}")
        for lease, want in ((new_lease, (1, 0)), (before_lease, (0, 1))):
            got = route_events(c, h, lease, marks[h])
            s.expect(LEASE_CHANGES, got == want, f"{h}: {lease.subnet} (added, removed) {got} times during "
                     f"'{name}', want {want}")
        applied = [e for e in log_events(c, h)[marks[h]:] if str(new_lease.subnet) in e.get("added", [])]
        s.expect(LEASE_CHANGES, len(applied) == 1, f"{h} applied {new_lease.subnet} {len(applied)} times: {applied}")
        routes = metrics(c, h, HEALTHZ_PORT)["flannel_routes"]
        s.expect(LEASE_CHANGES, routes == 2 + 1, f"{h}: flannel_routes {routes} after '{name}', want 3 "
                 "(two real peers and the lease added during the fault)")
    delete_lease(c, new_lease)
    record_figure(f"lease changes applied after restore: {name}", round(seen, 2), "s")
    record_figure(f"first renewal after restore: {name}", round(renewed, 2), "s")


def kill_talked_to(s: Soak) -> None:
    e = s.cluster.etcd
    assert e is not None
    victim = talked_to(s.cluster)
    survivor = next(m.name for m in e.members if m.name != victim)
    fault(s, f"SIGKILL of etcd member {victim} (the one the daemons use)", lambda: e.kill_member(victim),
          lambda: e.start_member(victim), KILL_SECONDS, survivor)


def kill_leader(s: Soak) -> None:
    e = s.cluster.etcd
    assert e is not None
    leader = etcd_leader(s.cluster)
    survivor = next(m.name for m in e.members if m.name != leader)
    fault(s, f"SIGKILL of the etcd leader {leader}", lambda: e.kill_member(leader), lambda: e.start_member(leader),
          KILL_SECONDS, survivor)


def freeze_member(s: Soak) -> None:
    c, e = s.cluster, s.cluster.etcd
    assert e is not None
    frozen = talked_to(c)
    frozen_ip = e.member(frozen).ip
    survivor = next(m.name for m in e.members if m.name != frozen)

    def freeze() -> None:
        e.pause_member(frozen)
        start = time.monotonic()
        for h, proc in c.daemons.items():
            if s.wait(FROZEN, lambda h=h, pid=proc.pid: frozen_ip not in etcd_connections(c, h, pid), 30,
                      f"{h} leaving the frozen member {frozen}"):
                s.abandoned[h] = time.monotonic() - start

    fault(s, f"SIGSTOP of etcd member {frozen} for {FREEZE_SECONDS:g}s", freeze, lambda: e.resume_member(frozen),
          FREEZE_SECONDS, survivor)
    if s.abandoned:
        record_figure("frozen member abandoned by every daemon after", round(max(s.abandoned.values()), 2), "s")


def stop_whole_cluster(s: Soak) -> None:
    c, e = s.cluster, s.cluster.etcd
    assert e is not None
    marks = {h: log_length(c, h) for h in c.daemons}

    def stop_all() -> None:
        for m in e.members:
            e.kill_member(m.name)

    fault(s, f"whole etcd cluster down for {OUTAGE_SECONDS:g}s", stop_all, lambda: e.start(60), OUTAGE_SECONDS,
          None)
    for h in c.daemons:
        # The renewal fell into the outage (TTL LEASE_TTL s): it failed, was retried and succeeded.
        s.expect(RENEWAL, count_events(c, h, "Lease renewal failed", marks[h]) >= 1,
                 f"{h} never tried to renew while etcd was down")


def route_changes_and_reconnects(s: Soak) -> None:
    """ROUTE_CHANGES lease changes (a lease added, then removed) spread over RECONNECTS kills of the member h1's
    daemon uses, each waited for in flannel_etcd_reconnects_total."""
    c, e = s.cluster, s.cluster.etcd
    assert e is not None
    pid = s.pids["h1"]
    reconnects_before = metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"]
    changes = 0
    pending: FakeLease | None = None
    pings = ring_pings(c)
    try:
        for round_ in range(RECONNECTS):
            while changes < ROUTE_CHANGES * (round_ + 1) // RECONNECTS:
                if pending is None:
                    pending = FakeLease.next()
                    put_lease(c, pending)
                else:
                    delete_lease(c, pending)
                    pending = None
                changes += 1
            peers = etcd_connections(c, "h1", pid)
            victim = member_at(c, sorted(peers)[0]) if peers else e.members[round_ % 3].name
            count = metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"]
            e.kill_member(victim)
            s.wait(BOUNDS, lambda count=count: metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"]
                   > count, 30, "h1's daemon reconnecting to etcd")
            e.start_member(victim)
    finally:
        stop_pings(s, pings, f"{RECONNECTS} etcd reconnects and {ROUTE_CHANGES} route changes")
    reconnects = metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"] - reconnects_before
    s.expect(BOUNDS, reconnects >= RECONNECTS and changes == ROUTE_CHANGES,
             f"{reconnects:g} reconnects and {changes} route changes, want {RECONNECTS} and {ROUTE_CHANGES}")
    for h in c.daemons:  # every added lease was removed again: only the real peers are routed
        s.wait(LEASE_CHANGES, lambda h=h: metrics(c, h, HEALTHZ_PORT)["flannel_routes"] == 2, 30,
               f"{h} back to routing the two real peers after the route changes")


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soak]:
    from flannelpy.lab.cluster import Cluster

    with Cluster(hosts=3, containers_per_host=1, workdir=tmp_path_factory.mktemp("soak"),
                 daemon_args=[f"--healthz-port={HEALTHZ_PORT}", "--log-format=json",
                              f"--subnet-lease-ttl={LEASE_TTL}"]) as c:
        c.ping_across_hosts(count=1)
        s = Soak(c, {h: p.pid for h, p in c.daemons.items()})
        src, dst = c.host("h1").containers[0], c.host("h2").containers[0]
        assert c.wait_reachable(src, dst).received
        s.fds = {h: (fd_count(pid), 0) for h, pid in s.pids.items()}
        cpu_before = {h: cpu_seconds(pid) for h, pid in s.pids.items()}
        stopped = threading.Event()

        def run_traffic() -> None:
            try:
                s.traffic["result"] = c.iperf3(src, dst, seconds=TRAFFIC_SECONDS, port=5207,
                                               extra=("-b", IPERF_RATE))
            except Exception as e:  # reported by the traffic test
                s.traffic["error"] = repr(e)

        def sample_rss() -> None:
            while not stopped.wait(SAMPLE_EVERY):
                for h, pid in s.pids.items():
                    try:
                        s.rss[h].append((round(time.monotonic() - started), rss_kb(pid)))
                    except (OSError, AssertionError):
                        pass  # a dead daemon: the restart checks report it

        started = time.monotonic()
        traffic = threading.Thread(target=run_traffic, name="iperf3", daemon=True)
        sampler = threading.Thread(target=sample_rss, name="rss", daemon=True)
        traffic.start()
        sampler.start()
        phases = [kill_talked_to, kill_leader, freeze_member, stop_whole_cluster, route_changes_and_reconnects]
        try:
            for phase in phases:
                t0 = time.monotonic()
                try:
                    phase(s)
                except Exception as e:  # recorded; the later phases still run
                    s.failures[f"phase {phase.__name__}"].append(repr(e))
                record_figure(f"soak phase {phase.__name__}", round(time.monotonic() - t0, 1), "s",
                              at=round(t0 - started, 1))
            traffic.join(TRAFFIC_SECONDS + 60)
        finally:
            stopped.set()
            sampler.join(SAMPLE_EVERY + 5)
        time.sleep(2)  # the last reconnects and route changes settle
        for h, pid in s.pids.items():
            s.fds[h] = (s.fds[h][0], fd_count(pid) if c.daemons[h].poll() is None else -1)
            record_figure(f"{h} daemon CPU over the {TRAFFIC_SECONDS}s soak",
                          round(cpu_seconds(pid) - cpu_before[h], 1), "s", rate=IPERF_RATE)
        record_figure("soak run length", round(time.monotonic() - started, 1), "s")
        yield s


def test_the_run_completed_every_phase(soak: Soak) -> None:
    broken = {k: v for k, v in soak.failures.items() if k.startswith("phase ")}
    assert not broken, broken


def test_traffic_keeps_flowing_on_known_routes_through_every_fault(soak: Soak) -> None:
    assert "error" not in soak.traffic, soak.traffic["error"]
    result = soak.traffic["result"]
    per_second = [iv["sum"]["bytes"] for iv in result["intervals"]]
    stalls = [len(list(g)) for zero, g in itertools.groupby(per_second, key=lambda b: b == 0) if zero]
    record_figure(f"iperf3 -b {IPERF_RATE} over {TRAFFIC_SECONDS}s of faults", round(throughput_bps(result) / 1e6, 1),
                  "Mbit/s", seconds=len(per_second), longest_stall_s=max(stalls, default=0))
    assert len(per_second) >= TRAFFIC_SECONDS - 1, f"iperf3 ran {len(per_second)} s of {TRAFFIC_SECONDS}"
    # A lost packet costs TCP a retransmission timeout; seconds without a byte mean the path was down.
    assert max(stalls, default=0) < 3, f"iperf3 seconds without traffic: {stalls}"
    soak.verdict(TRAFFIC)


def test_no_daemon_restarts_and_healthz_stays_up(soak: Soak) -> None:
    for h, proc in soak.cluster.daemons.items():
        assert proc.poll() is None and proc.pid == soak.pids[h], f"flannelpy on {h} restarted"
    soak.verdict(NO_RESTART)


def test_lease_changes_during_faults_reach_every_daemon_exactly_once(soak: Soak) -> None:
    soak.verdict(LEASE_CHANGES)


def test_every_daemon_renews_its_lease_after_every_fault(soak: Soak) -> None:
    assert OUTAGE_SECONDS > LEASE_TTL  # the outage spans a renewal
    soak.verdict(RENEWAL)


def test_frozen_member_is_abandoned_within_seconds(soak: Soak) -> None:
    soak.verdict(FROZEN)


def test_memory_flat_and_no_fd_growth(soak: Soak) -> None:
    soak.verdict(BOUNDS)
    for h, samples in soak.rss.items():
        rss = [kb for _, kb in samples]
        assert len(rss) >= 6, f"{h}: only {len(rss)} RSS samples"
        third = len(rss) // 3
        early, late = statistics.median(rss[:third]), statistics.median(rss[-third:])
        record_figure(f"{h} daemon RSS early/late over {TRAFFIC_SECONDS}s of traffic", f"{early:.0f}/{late:.0f}", "kB",
                      max=max(rss))
        assert late - early <= RSS_GROWTH_KB, f"{h}: RSS grew from {early} kB to {late} kB: {samples}"
    for h, (before, after) in soak.fds.items():
        record_figure(f"{h} daemon fds before/after the soak ({ROUTE_CHANGES} route changes, {RECONNECTS} etcd "
                      "reconnects)", f"{before}/{after}", "")
        assert 0 <= after <= before + FD_GROWTH, f"{h}: {before} fds before, {after} after"
