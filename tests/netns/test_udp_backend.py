"""The udp backend's kernel state and lifecycle (root): flannel0 as flanneld makes it, lease value,
leases of other backends ignored, a second instance refused, everything removed on stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.conftest import NETWORK, Node, Pair, build_pair, kill_netns, new_prefix, nsexec, wait_for
from tests.netns.test_udp_datapath import ping, py

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def ipj(ns: str, *args: str) -> list[dict[str, Any]]:
    out = nsexec(ns, "ip", "-j", *args).stdout.strip()
    return json.loads(out) if out else []


def test_flannel0_is_configured_like_flanneld(udp_pair: Pair) -> None:
    h1 = udp_pair.hosts[0]
    link = ipj(h1, "-d", "link", "show", "flannel0")[0]
    assert link["mtu"] == 1472  # eth0's 1500 - 28
    assert link["linkinfo"]["info_kind"] == "tun"
    assert link["linkinfo"]["info_data"]["type"] == "tun" and link["linkinfo"]["info_data"]["pi"] is False
    assert "UP" in link["flags"]
    assert link["qdisc"] == "noqueue"  # unlike flanneld's: like the kernel's own tunnels, no queue to lock
    addrs = [(a["local"], a["prefixlen"]) for a in ipj(h1, "-4", "addr", "show", "flannel0")[0]["addr_info"]]
    assert addrs == [("10.10.1.0", 32)]
    routes = {r["dst"] for r in ipj(h1, "route", "show", "dev", "flannel0")}
    assert NETWORK in routes
    listening = nsexec(h1, "ss", "-lun", "sport = :8285").stdout
    assert "10.99.0.1:8285" in listening
    # IPv4 only: no IPv6 link-local address, so the kernel sends nothing of its own into flannel0 (its router
    # solicitations were counted as not_ipv4 drops on an idle node).
    assert not any(a.get("addr_info") for a in ipj(h1, "-6", "addr", "show", "flannel0"))
    assert udp_pair.nodes[0].counters()["encap_drop_not_ipv4"] == 0


def test_data_path_threads_run_under_normal_scheduling_when_idle_and_sched_rr_if_asked_for(udp_pair: Pair) -> None:
    for node in udp_pair.nodes:  # the default, auto: real-time only while it pays (see below)
        threads = node.call(op="sched")["sched"]
        assert threads and all(t == [os.SCHED_OTHER, 0] for t in threads), threads
    with contextlib.ExitStack() as stack:
        rt = build_pair(new_prefix(), "compiled+rt", stack)
        for node in rt.nodes:
            threads = node.call(op="sched")["sched"]
            assert threads and all(t == [os.SCHED_RR, 1] for t in threads), threads
        assert ping(rt.containers[0], rt.container_ips[1], count=2).returncode == 0


@contextlib.contextmanager
def one_cpu(pids: list[int]) -> Iterator[int]:
    """Every thread of these processes on one CPU, so that the data path surely waits for it; undone after."""
    cpu = min(os.sched_getaffinity(0))
    saved: dict[int, set[int]] = {}
    for pid in pids:
        for tid in map(int, os.listdir(f"/proc/{pid}/task")):
            with contextlib.suppress(ProcessLookupError):
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
    try:
        yield cpu
    finally:
        for tid, cpus in saved.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def iperf3_on(cpu: int, pair: Pair, seconds: int) -> Iterator[None]:
    """A TCP bulk transfer container 1 -> container 2, both ends on `cpu`, running while the block runs (and
    then to its end: it must have moved data)."""
    c1, c2 = pair.containers
    server = subprocess.Popen(["ip", "netns", "exec", c2, "taskset", "-c", str(cpu), "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        assert wait_for(lambda: "LISTEN" in nsexec(c2, "ss", "-ltn", "sport = :5201", check=False).stdout)
        client = subprocess.Popen(["ip", "netns", "exec", c1, "taskset", "-c", str(cpu), "iperf3", "-c",
                                   pair.container_ips[1], "-t", str(seconds), "-J"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        time.sleep(1)  # past its start
        yield
        out = client.communicate(timeout=seconds + 60)[0]
        assert json.loads(out)["end"]["sum_received"]["bytes"] > 0, out[-500:]
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait()


@pytest.mark.parametrize("mode", ["compiled@1", "compiled@2"])
def test_auto_realtime_while_a_bulk_transfer_makes_other_traffic_wait(mode: str) -> None:
    """The default (FLANNELPY_UDP_RTPRIO=auto) on one CPU shared with a TCP transfer's two ends: the data
    path takes SCHED_RR only while a ping has to get through too, and gives it back afterwards. With a thread
    per direction, the one that carries the data on each host (encap on the sender's, decap on the
    receiver's) is promoted; the other traffic counts for both."""
    with contextlib.ExitStack() as stack:
        check_auto_realtime(build_pair(new_prefix(), mode, stack))


def check_auto_realtime(pair: Pair) -> None:

    def promotions() -> list[int]:
        return [node.counters()["realtime_promotions"] for node in pair.nodes]

    def all_realtime() -> bool:
        return all(t == [os.SCHED_RR, 1] for node in pair.nodes for t in node.call(op="sched")["sched"])

    def all_normal() -> bool:
        return all(t == [os.SCHED_OTHER, 0] for node in pair.nodes for t in node.call(op="sched")["sched"])

    with one_cpu([node.proc.pid for node in pair.nodes]) as cpu:
        with iperf3_on(cpu, pair, 4):
            time.sleep(2)
            assert promotions() == [0, 0]  # the transfer alone: real-time would only cost it throughput
        assert wait_for(all_normal, timeout=10)

        def promoted() -> None:
            time.sleep(2)
            # Both hosts' loops carry the transfer (data one way, ACKs back) and the pings' two directions;
            # with a loop per direction, the one carrying the transfer takes the other along.
            assert all(n >= 1 for n in promotions()), (promotions(), pair.nodes[0].logs()[-2000:])
            assert wait_for(all_realtime, timeout=3), [node.call(op="sched") for node in pair.nodes]

        assert ping_beside_a_transfer(pair, cpu, promoted) > 0
        assert wait_for(all_normal, timeout=10), [node.call(op="sched") for node in pair.nodes]
    assert [node.call(op="sched")["refused"] for node in pair.nodes] == [None, None]


def ping_beside_a_transfer(pair: Pair, cpu: int, during: Callable[[], None]) -> int:
    """A ping every 50 ms for 6 s from container 1 to container 2 and, beside it, a 4 s TCP transfer the same
    way (iperf3_on); during() runs while both do. The number of ping replies."""
    pinger = subprocess.Popen(["ip", "netns", "exec", pair.containers[0], "ping", "-n", "-i", "0.05", "-w", "6",
                               pair.container_ips[1]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        with iperf3_on(cpu, pair, 4):
            during()
    finally:
        replies = pinger.communicate(timeout=30)[0].count("bytes from")
    return replies


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu hierarchy, where RT groups are
REFUSED = "auto real-time priority refused by the kernel"


@contextlib.contextmanager
def rt_refusing_cgroup(name: str) -> Iterator[Path]:
    """A new cgroup v1 cpu group (cpu.rt_runtime_us 0, the default for a new group): its threads cannot go to
    SCHED_RR. Whatever is left in it is moved back to the root group and the group removed afterwards."""
    if not (CPU_CGROUPS / "cpu.rt_runtime_us").exists():
        pytest.skip("needs the cgroup v1 cpu controller with RT group scheduling")
    group = CPU_CGROUPS / name
    try:
        group.mkdir()
    except OSError as e:  # a read-only or delegated hierarchy: nothing to test here, not a failure of ours
        pytest.skip(f"cannot create a cgroup under {CPU_CGROUPS}: {e}")
    try:
        assert (group / "cpu.rt_runtime_us").read_text().strip() == "0"
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (CPU_CGROUPS / "cgroup.procs").write_text(pid)
        group.rmdir()


@pytest.mark.parametrize("mode", ["compiled@1", "compiled@2"])
def test_auto_realtime_refused_while_running_is_said_once_and_traffic_flows(mode: str) -> None:
    """The kernel lets the daemon take SCHED_RR at start (the probe passes) and refuses it later: both
    daemons are moved into a cgroup v1 group without real-time runtime, as an operator's cgroup set-up can."""
    prefix = new_prefix()
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(rt_refusing_cgroup(prefix))
        pair = build_pair(prefix, mode, stack)
        for node in pair.nodes:
            assert "real-time priority refused" not in node.logs()  # the start-up probe passed
            (group / "cgroup.procs").write_text(str(node.proc.pid))

        def refused() -> None:
            # What promotes every loop of both hosts in the test above is refused here.
            assert wait_for(lambda: all(REFUSED in node.logs() for node in pair.nodes), timeout=4), \
                [node.logs()[-1500:] for node in pair.nodes]
            for node in pair.nodes:
                sched = node.call(op="sched")
                assert all(t == [os.SCHED_OTHER, 0] for t in sched["sched"])
                # What flannel_realtime_refused exports (1), so an operator sees it without the log.
                assert sched["refused"] and "after start" in sched["refused"], sched

        with one_cpu([node.proc.pid for node in pair.nodes]) as cpu:
            replies = ping_beside_a_transfer(pair, cpu, refused)  # the transfer must move data too (iperf3_on)
        assert replies > 60  # of 120: answered all along, not only before the refusal
        for node in pair.nodes:
            assert node.logs().count(REFUSED) == 1, node.logs()[-2000:]  # once per daemon, whichever loop saw it
            assert node.counters()["realtime_promotions"] == 0
        assert ping(pair.containers[0], pair.container_ips[1], count=2).returncode == 0


def test_lease_value_has_no_backend_type(udp_pair: Pair) -> None:
    assert udp_pair.nodes[0].ready["lease"] == {"PublicIP": "10.99.0.1", "PublicIPv6": None}


def test_leases_of_other_backends_are_ignored_and_logged_once(fresh_udp_pair: Pair) -> None:
    udp_pair = fresh_udp_pair
    node = udp_pair.nodes[0]
    vxlan = ("10.10.3.0/24", "10.99.0.2", "vxlan")
    node.apply(added=[vxlan])
    node.apply(added=[vxlan])
    assert node.logs().count("lease ignored by the udp backend") == 1
    before = node.counters()["icmp_unreachable_sent"]
    py(udp_pair.containers[0], "import socket; socket.socket(2, 2).sendto(b'x', ('10.10.3.3', 9))")
    # No route through us: answered with an ICMP (counted by the data-path thread, hence the wait).
    assert wait_for(lambda: node.counters()["icmp_unreachable_sent"] == before + 1)
    # A udp lease that turns into a host-gw one stops going through the TUN.
    node.apply(added=[(udp_pair.subnets[1], udp_pair.public_ips[1], "host-gw")])
    assert ping(udp_pair.containers[0], udp_pair.container_ips[1], count=1).returncode != 0
    node.apply(added=[udp_pair.lease(1)])
    assert ping(udp_pair.containers[0], udp_pair.container_ips[1], count=1).returncode == 0


def test_removed_lease_stops_traffic_and_answers_unreachable(udp_pair: Pair) -> None:
    node = udp_pair.nodes[0]
    before = node.counters()["encap_drop_no_route"]
    node.apply(removed=[udp_pair.lease(1)])
    assert ping(udp_pair.containers[0], udp_pair.container_ips[1], count=1).returncode != 0
    assert node.counters()["encap_drop_no_route"] > before
    node.apply(added=[udp_pair.lease(1)])
    assert ping(udp_pair.containers[0], udp_pair.container_ips[1], count=1).returncode == 0


def test_second_instance_is_refused_with_a_clear_error(udp_pair: Pair) -> None:
    with pytest.raises(AssertionError, match="in use"):
        Node(udp_pair.hosts[0], {"network": NETWORK, "subnet": udp_pair.subnets[0], "iface": "eth0"})


def test_stop_removes_the_device_and_frees_the_port(fresh_udp_pair: Pair) -> None:
    udp_pair = fresh_udp_pair
    h1 = udp_pair.hosts[0]
    udp_pair.nodes[0].stop()
    assert nsexec(h1, "ip", "link", "show", "flannel0", check=False).returncode != 0
    assert "8285" not in nsexec(h1, "ss", "-lun").stdout
    assert NETWORK not in {r.get("dst") for r in ipj(h1, "route", "show")}
    # And it comes back: a fresh start on the same host works.
    again = Node(h1, {"network": NETWORK, "subnet": udp_pair.subnets[0], "iface": "eth0"})
    try:
        again.apply(added=[udp_pair.lease(1)])
        assert ping(udp_pair.containers[0], udp_pair.container_ips[1], count=1).returncode == 0
    finally:
        again.stop()


CANCELLED_START = r"""
import asyncio, json, subprocess, time
from ipaddress import IPv4Address, IPv4Network
from flannelpy.backend.base import ExternalInterface
from flannelpy.backend.udp import backend as udp
from flannelpy.config import parse_config
from flannelpy.subnet.lease import Lease, LeaseAttrs

config = parse_config(b'{"Network":"10.10.0.0/16","Backend":{"Type":"udp"}}')
iface = ExternalInterface("lo", 1, IPv4Address("127.0.0.1"), IPv4Address("127.0.0.1"), 1500)
lease = Lease(IPv4Network("10.10.1.0/24"), LeaseAttrs(IPv4Address("127.0.0.1")))
create = udp.TunDevice.create.__func__

def slow_create(cls, *args, **kwargs):
    time.sleep(0.5)  # the cancellation comes while the device is being made
    return create(cls, *args, **kwargs)

def devices():
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.count("flannel0")

async def main():
    first = udp.UdpBackend(config, iface, datapath="compiled", rtprio=0)
    udp.TunDevice.create = classmethod(slow_create)
    start = asyncio.ensure_future(first.start(lease))
    await asyncio.sleep(0.1)
    start.cancel()
    try:
        await start
        cancelled = False
    except asyncio.CancelledError:
        cancelled = True
    await first.stop()
    udp.TunDevice.create = classmethod(create)
    left = devices()
    second = udp.UdpBackend(config, iface, datapath="compiled", rtprio=0)
    try:
        await second.start(lease)
        again = "ok"
    except Exception as e:
        again = str(e)
    await second.stop()
    print(json.dumps({"cancelled": cancelled, "left": left, "again": again, "after": devices()}))

asyncio.run(main())
"""


def test_a_start_cancelled_while_flannel0_is_made_leaves_no_device_behind() -> None:
    # An embedding program's wait_for(node.start(), ...) can cancel it at any point.
    ns = new_prefix() + "cx"
    added = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    try:
        nsexec(ns, "ip", "link", "set", "lo", "up")
        out = py(ns, CANCELLED_START)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result == {"cancelled": True, "left": 0, "again": "ok", "after": 0}, result
    finally:
        kill_netns(ns)

