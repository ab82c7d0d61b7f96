"""Resource bounds: a daemon's memory stays flat while traffic flows through it, and its file descriptors do not
grow across 100 route changes and 20 etcd reconnects (all in one run: CI ~60 s of traffic, FLANNELPY_SOAK=1
10 minutes). Margins are generous: the test looks for growth, not for a number."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from flannelpy.lab.cluster import Cluster, throughput_bps
from tests.reliability.conftest import HEALTHZ_PORT, SOAK, record_figure
from tests.reliability.observe import etcd_connections, fd_count, member_at, metrics, rss_kb, wait_until
from tests.reliability.test_etcd_faults import FakeLease, delete_lease, put_lease

TRAFFIC_SECONDS = 600 if SOAK else 60
ROUTE_CHANGES = 100
RECONNECTS = 20
RSS_GROWTH_KB = 30 * 1024  # generous: Python's allocator keeps arenas; a leak per packet or event shows more
FD_GROWTH = 8


def test_memory_flat_and_no_fd_growth_under_traffic_route_changes_and_reconnects(udp_cluster: Cluster) -> None:
    c = udp_cluster
    assert c.etcd is not None
    src, dst = c.host("h1").containers[0], c.host("h2").containers[0]
    pids = {h: p.pid for h, p in c.daemons.items()}
    assert c.wait_reachable(src, dst).received
    traffic: dict[str, Any] = {}

    def run_traffic() -> None:
        try:
            traffic["result"] = c.iperf3(src, dst, seconds=TRAFFIC_SECONDS, port=5207, extra=("-b", "100M"))
        except Exception as e:  # reported below
            traffic["error"] = e

    fds_before = {h: fd_count(pid) for h, pid in pids.items()}
    thread = threading.Thread(target=run_traffic, daemon=True)
    thread.start()
    started = time.monotonic()
    time.sleep(5)  # warm-up: buffers, first allocations
    samples: dict[str, list[tuple[float, int]]] = {h: [] for h in pids}

    def sample() -> None:
        for h, pid in pids.items():
            samples[h].append((time.monotonic() - started, rss_kb(pid)))

    sample()
    reconnects_before = metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"]
    changes = 0
    pending: FakeLease | None = None
    for round_ in range(RECONNECTS):
        while changes < ROUTE_CHANGES * (round_ + 1) // RECONNECTS:  # a lease added, then removed
            if pending is None:
                pending = FakeLease.next()
                put_lease(c, pending)
            else:
                delete_lease(c, pending)
                pending = None
            changes += 1
        peers = etcd_connections(c, "h1", pids["h1"])
        victim = member_at(c, sorted(peers)[0]) if peers else c.etcd.members[round_ % 3].name
        count = metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"]
        c.etcd.kill_member(victim)
        wait_until(lambda count=count: metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"] > count, 30,
                   "h1's daemon reconnecting to etcd")
        c.etcd.start_member(victim)
        sample()
    while time.monotonic() - started < TRAFFIC_SECONDS - 2:
        time.sleep(min(10.0, TRAFFIC_SECONDS - 2 - (time.monotonic() - started)))
        sample()
    thread.join(TRAFFIC_SECONDS + 60)
    assert "error" not in traffic, traffic.get("error")
    reconnects = metrics(c, "h1", HEALTHZ_PORT)["flannel_etcd_reconnects_total"] - reconnects_before
    assert reconnects >= RECONNECTS and changes == ROUTE_CHANGES

    # Let the last reconnects and route changes settle, then count descriptors again.
    time.sleep(2)
    for h, pid in pids.items():
        assert c.daemons[h].pid == pid and c.daemons[h].poll() is None, f"{h} restarted"
        fds_after = fd_count(pid)
        assert fds_after <= fds_before[h] + FD_GROWTH, f"{h}: {fds_before[h]} fds before, {fds_after} after"
        rss = [kb for _, kb in samples[h]]
        third = max(1, len(rss) // 3)
        early, late = statistics.median(rss[:third]), statistics.median(rss[-third:])
        assert late - early <= RSS_GROWTH_KB, f"{h}: RSS grew from {early} kB to {late} kB: {samples[h]}"
        record_figure(f"{h} daemon RSS early/late over {TRAFFIC_SECONDS}s of traffic", f"{early:.0f}/{late:.0f}",
                      "kB", max=max(rss))
        record_figure(f"{h} daemon fds before/after {ROUTE_CHANGES} route changes and {RECONNECTS} etcd reconnects",
                      f"{fds_before[h]}/{fds_after}", "")
    record_figure("iperf3 through the udp data path during the bounds run",
                  round(throughput_bps(traffic["result"]) / 1e6, 1), "Mbit/s", limit="100M")
