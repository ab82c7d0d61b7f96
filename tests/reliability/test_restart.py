"""A daemon killed with SIGKILL and started again: it gets the same subnet, brings flannel0 back without
errors, rebuilds its routes, and traffic through it resumes; the gap is measured (a figure, not a threshold).
Traffic between the other hosts is not disturbed."""

from __future__ import annotations

import json
import time

from flannelpy.lab.cluster import Cluster, SubnetEnv
from tests.reliability.conftest import HEALTHZ_PORT, SOAK, record_figure
from tests.reliability.observe import GapPing, count_events, log_events, log_length, metrics, wait_until

RESTARTS = 5 if SOAK else 2


def flannel0(cluster: Cluster, host: str) -> dict[str, object]:
    out = cluster.run(cluster.host(host), ["ip", "-j", "addr", "show", "dev", "flannel0"], check=False).stdout
    links = json.loads(out) if out.strip() else []
    return links[0] if links else {}


def test_kill_9_and_start_again_keeps_the_subnet_and_rebuilds_routes(udp_cluster: Cluster) -> None:
    c = udp_cluster
    victim = "h2"
    others = [h for h in c.daemons if h != victim]
    subnet = SubnetEnv.read(c.subnet_file(victim)).subnet
    lease_before = c.leases()[subnet.network]
    through = c.host(victim).containers[0]
    a, b = (c.host(h).containers[0] for h in others)
    for src, dst in ((a, through), (through, b), (a, b)):
        assert c.wait_reachable(src, dst).received
    gaps = []
    for _ in range(RESTARTS):
        into, out_of, bystander = GapPing(c, a, through), GapPing(c, through, b), GapPing(c, b, a)
        time.sleep(1.0)
        mark = log_length(c, victim)
        old = c.daemons[victim]
        old.kill()  # SIGKILL: no clean-up at all
        old.wait(10)
        new = c.start_daemon(victim)
        wait_until(lambda mark=mark: count_events(c, victim, "flannelpy is running", mark), 60,
                   f"flannelpy on {victim} running again")
        wait_until(lambda: c.wait_reachable(a, through, timeout=0.5).received, 30, "traffic through the restarted host")
        time.sleep(1.0)
        results = {"into": into.stop(), "out_of": out_of.stop(), "bystander": bystander.stop()}
        assert new.poll() is None, c.log_tail(victim)

        events = log_events(c, victim)[mark:]
        errors = [e for e in events if e.get("level") in ("error", "critical")]
        assert not errors, f"errors after the restart: {errors}"
        assert SubnetEnv.read(c.subnet_file(victim)).subnet == subnet
        assert any(e["event"].startswith("Found lease for current IP, reusing") and e["subnet"] == str(subnet.network)
                   for e in events), "the restarted daemon did not reuse its lease"
        assert c.leases()[subnet.network] == lease_before
        device = flannel0(c, victim)
        assert device.get("mtu") == 1472 and "UP" in device.get("flags", [])  # type: ignore[operator]
        assert [f"{x['local']}/{x['prefixlen']}" for x in device["addr_info"]  # type: ignore[index]
                if x["family"] == "inet"] == [f"{subnet.network.network_address}/32"]
        assert metrics(c, victim, HEALTHZ_PORT)["flannel_routes"] == len(others)
        for h in others:  # the others never dropped the route: the key stayed
            assert metrics(c, h, HEALTHZ_PORT)["flannel_routes"] == len(others)
        bystander_result = results["bystander"]
        assert bystander_result["lost"] <= max(2, bystander_result["sent"] // 100), bystander_result
        # Requests sent while the daemon was down are lost: the gap is the outage as containers see it.
        gap = max(results["into"]["longest_gap_s"], results["out_of"]["longest_gap_s"])
        gaps.append(gap)
    record_figure("udp traffic gap across a kill -9 and restart", round(max(gaps), 2), "s",
                  all=[round(g, 2) for g in gaps])
