"""UdpBackend's control-plane side without root: lease value, MTU, data-path choice, apply() -> routes."""

from __future__ import annotations

import errno
import json
import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import structlog.testing

from flannelpy.backend.base import ExternalInterface, create_backend
from flannelpy.backend.udp import UdpBackend
from flannelpy.backend.udp.datapath import Realtime, cgroup_cpu_limit, make_realtime, probe_realtime
from flannelpy.config import parse_config
from flannelpy.errors import ConfigError, ExitCode
from flannelpy.subnet.lease import Lease, LeaseAttrs

IFACE = ExternalInterface(name="eth0", index=2, ip=IPv4Address("10.99.0.1"), public_ip=IPv4Address("10.99.0.1"),
                          mtu=1500)


def backend(config: dict[str, object] | None = None, **kwargs: object) -> UdpBackend:
    cfg = parse_config(json.dumps(config or {"Network": "10.10.0.0/16"}))
    return UdpBackend(cfg, IFACE, **kwargs)  # type: ignore[arg-type]


def lease(subnet: str, public_ip: str, btype: str | None = None) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), backend_type=btype))


def route(b: UdpBackend, addr: str) -> str | None:
    peer = b.table.lookup(int(IPv4Address(addr)))
    return str(IPv4Address(peer)) if peer else None


def test_seed_config_runs_the_udp_backend() -> None:
    b = create_backend(parse_config('{"Network":"10.10.0.0/16"}'), IFACE)
    assert isinstance(b, UdpBackend) and b.type == "udp"


async def test_lease_value_is_flanneld_udp_one() -> None:
    attrs = await backend().lease_attrs()
    assert attrs.backend_type is None
    assert json.loads(attrs.to_json()) == {"PublicIP": "10.99.0.1", "PublicIPv6": None}


def test_mtu_is_interface_minus_28_or_backend_mtu() -> None:
    assert backend().mtu == 1472
    assert backend({"Network": "10.10.0.0/16", "Backend": {"Type": "udp", "MTU": 1400}}).mtu == 1400


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_datapath_choice_by_argument_or_environment(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend(datapath=kind).datapath_kind == kind
    monkeypatch.setenv("FLANNELPY_DATAPATH", kind)
    assert backend().datapath_kind == kind


def test_unknown_datapath_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLANNELPY_DATAPATH", "turbo")
    with pytest.raises(ConfigError, match="FLANNELPY_DATAPATH"):
        backend()


@pytest.mark.parametrize("kind", ["compiled", "python"])
async def test_apply_turns_udp_leases_into_routes(kind: str) -> None:
    b = backend(datapath=kind)
    b.lease = lease("10.10.1.0/24", "10.99.0.1")
    await b.apply([lease("10.10.2.0/24", "10.99.0.2"), lease("10.10.3.0/24", "10.99.0.3", "udp"),
                   lease("10.10.4.0/24", "10.99.0.4", "vxlan"), lease("10.10.1.0/24", "10.99.0.1"),
                   lease("10.11.5.0/24", "10.99.0.5"), lease("10.10.6.0/25", "10.99.0.6")], [])
    assert route(b, "10.10.2.9") == "10.99.0.2"
    assert route(b, "10.10.3.9") == "10.99.0.3"
    assert route(b, "10.10.4.9") is None  # another backend's lease
    assert route(b, "10.10.1.9") is None  # our own subnet
    assert route(b, "10.10.6.9") is None  # wrong prefix length
    assert len(b.table) == 2
    # What flannel_leases_not_routed says (and flannel_routes leaves out): vxlan, 10.11.5.0, the /25, and our
    # own subnet (the watch never hands that one over; here it is).
    assert b.leases_not_routed == 4
    # Renewal re-announces; the host behind a subnet may change; a lease may change backend.
    await b.apply([lease("10.10.2.0/24", "10.99.0.2"), lease("10.10.3.0/24", "10.99.0.33"),
                   lease("10.10.2.0/24", "10.99.0.2", "host-gw")], [])
    assert route(b, "10.10.3.9") == "10.99.0.33"
    assert route(b, "10.10.2.9") is None
    assert b.leases_not_routed == 5
    await b.apply([], [lease("10.10.2.0/24", "10.99.0.2", "host-gw"), lease("10.10.4.0/24", "10.99.0.4", "vxlan")])
    assert b.leases_not_routed == 3
    # A stale removal (the subnet is held by another host by now) does not remove the new route.
    await b.apply([], [lease("10.10.3.0/24", "10.99.0.3")])
    assert route(b, "10.10.3.9") == "10.99.0.33"
    await b.apply([], [lease("10.10.3.0/24", "10.99.0.33")])
    assert route(b, "10.10.3.9") is None and len(b.table) == 0
    await b.apply([lease("10.10.7.0/24", "10.99.0.7", "vxlan")], [])
    assert b.leases_not_routed == 4
    await b.apply([lease("10.10.7.0/24", "10.99.0.7", "udp")], [])  # the host switched to udp
    assert b.leases_not_routed == 3 and route(b, "10.10.7.9") == "10.99.0.7"


async def test_an_ignored_lease_is_said_once_while_it_lasts_and_again_when_it_comes_back() -> None:
    # What was logged is remembered per subnet while the lease is there (it was per key and reason, for ever).
    b = backend()
    vx = lease("10.10.4.0/24", "10.99.0.4", "vxlan")
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            await b.apply([vx], [])  # renewals
        await b.apply([], [vx])
        await b.apply([vx], [])  # the host came back, still vxlan
    assert len([e for e in logs if e["event"] == "lease ignored by the udp backend"]) == 2
    assert b.leases_not_routed == 1


def test_counters_before_start_are_zero() -> None:
    counts = backend().counters()
    assert counts["encap_packets"] == 0 and "decap_drop_unknown_sender" in counts


def test_batch_by_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend().batch == 64
    assert backend(batch=1).batch == 1
    monkeypatch.setenv("FLANNELPY_BATCH", "8")
    assert backend().batch == 8
    monkeypatch.setenv("FLANNELPY_BATCH", "lots")
    with pytest.raises(ConfigError, match="FLANNELPY_BATCH"):
        backend()
    with pytest.raises(ConfigError, match=r"1\.\.1024"):
        backend(batch=5000)


def test_realtime_priority_auto_unless_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLANNELPY_UDP_RTPRIO", raising=False)
    assert backend().realtime == Realtime(1, auto=True) and backend().realtime.describe() == "auto"
    assert backend(rtprio=0).realtime == Realtime(0) and backend(rtprio=0).realtime.describe() == "0"
    assert backend(rtprio=1).realtime == Realtime(1)
    monkeypatch.setenv("FLANNELPY_UDP_RTPRIO", "2")
    assert backend().realtime == Realtime(2)
    assert backend(rtprio="auto").realtime.auto  # the argument wins
    monkeypatch.setenv("FLANNELPY_UDP_RTPRIO", " AUTO ")
    assert backend().realtime == Realtime(1, auto=True)
    assert backend(datapath="python").realtime == Realtime(0)  # its loops hold the GIL: never above the control plane
    for bad, words in (("high", "not a number"), ("100", "out of range")):
        monkeypatch.setenv("FLANNELPY_UDP_RTPRIO", bad)
        with pytest.raises(ConfigError, match=f"FLANNELPY_UDP_RTPRIO.*{words}.*0 .normal scheduling"):
            backend()


async def test_auto_realtime_stays_off_under_a_cpu_quota_or_without_permission(
        monkeypatch: pytest.MonkeyPatch) -> None:
    b = backend(rtprio="auto")
    monkeypatch.setattr("flannelpy.backend.udp.backend.cgroup_cpu_limit", lambda: 0.5)
    probes: list[int] = []
    monkeypatch.setattr("flannelpy.backend.udp.backend.probe_realtime", lambda prio: probes.append(prio))
    with structlog.testing.capture_logs() as logs:
        assert await b._auto_rtprio() == 0  # a quota the real-time threads would escape
    assert probes == [] and any("cgroup CPU quota" in e["event"] and e["cpus"] == 0.5 for e in logs)
    assert b.realtime_refused is None  # our own choice, not a refusal
    monkeypatch.setattr("flannelpy.backend.udp.backend.cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr("flannelpy.backend.udp.backend.probe_realtime",
                        lambda prio: "Operation not permitted (needs CAP_SYS_NICE)")
    with structlog.testing.capture_logs() as logs:
        assert await b._auto_rtprio() == 0
    assert [e["error"] for e in logs if "real-time priority refused" in e["event"]] == [
        "Operation not permitted (needs CAP_SYS_NICE)"]
    assert b.realtime_refused == "Operation not permitted (needs CAP_SYS_NICE)"  # flannel_realtime_refused 1
    monkeypatch.setattr("flannelpy.backend.udp.backend.probe_realtime", lambda prio: None)
    assert await b._auto_rtprio() == 1
    assert await backend(rtprio=0)._auto_rtprio() == 0 and await backend(rtprio=5)._auto_rtprio() == 0


def test_probing_realtime_leaves_the_thread_under_normal_scheduling(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr("os.sched_setscheduler",
                        lambda pid, policy, param: calls.append((policy, param.sched_priority)))
    assert probe_realtime(1) is None
    assert calls == [(os.SCHED_RR, 1), (os.SCHED_OTHER, 0)]


def test_a_refused_realtime_priority_says_why_and_leaves_the_thread_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []

    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        calls.append((pid, policy, param.sched_priority))
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("os.sched_setscheduler", refuse)
    assert make_realtime(0) is None and calls == []  # 0: normal scheduling, nothing asked of the kernel
    why = make_realtime(1)
    assert calls == [(0, os.SCHED_RR, 1)]  # the calling thread only
    assert why is not None and "Operation not permitted" in why and "CAP_SYS_NICE" in why


def test_a_refusal_is_logged_once_for_all_loop_threads_and_the_loops_still_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flannelpy.backend.udp.backend.make_realtime",
                        lambda rtprio: "Operation not permitted (needs CAP_SYS_NICE)")
    b = backend(rtprio=1)
    ran: list[str] = []
    with structlog.testing.capture_logs() as logs:
        b._run_loop("encap", lambda: ran.append("encap"))
        b._run_loop("decap", lambda: ran.append("decap"))
    assert ran == ["encap", "decap"]
    refusals = [e for e in logs if "real-time priority refused" in e["event"]]
    assert len(refusals) == 1 and refusals[0]["rtprio"] == 1 and "CAP_SYS_NICE" in refusals[0]["error"]


def test_threads_follow_the_cpus_unless_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLANNELPY_UDP_THREADS", raising=False)
    monkeypatch.setattr("flannelpy.backend.udp.datapath.cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert backend().threads == 1  # a two-core host: one thread carries both directions
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert backend().threads == 2
    assert backend(threads=1).threads == 1
    monkeypatch.setenv("FLANNELPY_UDP_THREADS", "1")
    assert backend().threads == 1
    assert backend(threads=2).threads == 2  # the argument wins
    monkeypatch.setenv("FLANNELPY_UDP_THREADS", "4")
    with pytest.raises(ConfigError, match=r"FLANNELPY_UDP_THREADS='4'.*1 .*2 .*auto"):
        backend()


def test_a_cgroup_cpu_quota_counts_like_fewer_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # A DaemonSet pod with an 8-CPU affinity and a limit of one CPU: one thread.
    monkeypatch.delenv("FLANNELPY_UDP_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr("flannelpy.backend.udp.datapath.cgroup_cpu_limit", lambda: 1.0)
    assert backend().threads == 1
    monkeypatch.setattr("flannelpy.backend.udp.datapath.cgroup_cpu_limit", lambda: 2.5)
    assert backend().threads == 2


def cgroup_tree(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "self-cgroup"
    proc.write_text(self_cgroup)
    return root, proc


@pytest.mark.parametrize(("self_cgroup", "files", "want"), [
    # cgroup v2, the process's own group and, inside a container, the mount root
    ("0::/kubepods/pod1\n", {"kubepods/pod1/cpu.max": "150000 100000\n"}, 1.5),
    ("0::/kubepods/pod1\n", {"cpu.max": "50000 100000\n"}, 0.5),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # a parent's quota holds for the groups below it, the smallest on the way up wins
    ("0::/kubepods.slice/pod1/c1\n", {"kubepods.slice/cpu.max": "50000 100000\n",
                                      "kubepods.slice/pod1/c1/cpu.max": "max 100000\n"}, 0.5),
    ("0::/kubepods.slice/pod1/c1\n", {"kubepods.slice/cpu.max": "400000 100000\n",
                                      "kubepods.slice/pod1/cpu.max": "150000 100000\n"}, 1.5),
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/cpu.cfs_quota_us": "200000\n",
                                     "cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1\n",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 2.0),
    # cgroup v1 (cpu,cpuacct or cpu), next to a v2 line without the cpu controller
    ("4:cpu,cpuacct:/docker/abc\n0::/\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
                                          "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 3.0),
    ("1:cpu:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    # nothing readable, garbage: no limit known
    ("0::/\n", {}, None),
    ("0::/\n", {"cpu.max": "lots\n"}, None),
])
def test_cgroup_cpu_limit_reads_v1_and_v2(tmp_path: Path, self_cgroup: str, files: dict[str, str],
                                          want: float | None) -> None:
    root, proc = cgroup_tree(tmp_path, self_cgroup, files)
    assert cgroup_cpu_limit(root, proc) == want


def test_offloads_are_on_by_default_and_off_in_the_one_packet_per_syscall_mode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLANNELPY_OFFLOAD", raising=False)
    monkeypatch.delenv("FLANNELPY_BATCH", raising=False)
    assert backend(datapath="compiled").offloads_wanted.describe() == "tso,gso,gro"
    assert backend(datapath="compiled", batch=1).offloads_wanted.describe() == "off"  # flanneld's stand-in
    assert backend(datapath="python").offloads_wanted.describe() == "off"  # the reference has none
    assert backend(datapath="compiled", batch=1, offload=True).offloads_wanted.describe() == "tso,gso,gro"


@pytest.mark.parametrize(("value", "want"), [("0", "off"), ("off", "off"), ("1", "tso,gso,gro"),
                                              ("on", "tso,gso,gro"), ("tso", "tso"), ("gso, gro", "gso,gro")])
def test_offloads_by_environment(value: str, want: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLANNELPY_OFFLOAD", value)
    assert backend(datapath="compiled").offloads_wanted.describe() == want
    assert backend(datapath="compiled", offload=False).offloads_wanted.describe() == "off"  # argument wins


def test_unknown_offload_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLANNELPY_OFFLOAD", "tso,turbo")
    with pytest.raises(ConfigError, match=r"turbo.*tso, gso, gro"):
        backend(datapath="compiled")


def test_realtime_threads_and_promotions_as_the_data_path_reports_them() -> None:
    from types import SimpleNamespace

    auto = backend(rtprio="auto")
    assert auto.realtime_threads == 0  # not started
    auto.datapath = SimpleNamespace(rt_threads=1, rt_promotions=4)  # type: ignore[assignment]
    assert auto.realtime_threads == 1 and auto.counters()["realtime_promotions"] == 4
    fixed = backend(rtprio=3)
    fixed.datapath = SimpleNamespace()  # type: ignore[assignment]
    fixed._threads = [object(), object()]  # type: ignore[list-item]
    assert fixed.realtime_threads == 2  # both loops set SCHED_RR when they started
    assert fixed.realtime_refused is None
    fixed._rt_refused = "Operation not permitted (needs CAP_SYS_NICE)"
    assert fixed.realtime_threads == 0  # ... unless the kernel refused
    assert fixed.realtime_refused == "Operation not permitted (needs CAP_SYS_NICE)"
    python = backend(datapath="python")
    assert "realtime_promotions" not in python.counters() and python.realtime_refused is None


def test_a_refusal_after_start_is_reported_from_the_data_path() -> None:
    from types import SimpleNamespace

    auto = backend(rtprio="auto")
    auto.datapath = SimpleNamespace(rt_threads=0, rt_promotions=0, rt_error=0)  # type: ignore[assignment]
    assert auto.realtime_refused is None
    auto.datapath.rt_error = errno.EPERM  # type: ignore[attr-defined]  # set by a loop whose switch failed
    assert auto.realtime_refused == "Operation not permitted (errno 1), after start"


def test_a_network_too_large_for_the_route_table_is_a_config_error() -> None:
    # parse_config takes it (flanneld has no such bound); the udp route table holds 2**24 subnets at most.
    with pytest.raises(ConfigError, match=r"udp backend: /4 network with /30 subnets.*2\*\*24.*SubnetLen") as e:
        backend({"Network": "16.0.0.0/4", "SubnetLen": 30})
    assert e.value.exit_code == ExitCode.CONFIG


async def test_a_loop_that_does_not_stop_keeps_its_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Closed under a live loop, the socket's fd number could be reused at once and written by the loop.
    import socket
    import threading
    from types import SimpleNamespace

    import flannelpy.backend.udp.backend as udp_backend

    monkeypatch.setattr(udp_backend, "STOP_TIMEOUT", 0.1)
    b = backend()
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="encap", daemon=True)
    stuck.start()
    b._threads = [stuck]
    b.datapath = SimpleNamespace(stop=lambda: None)  # type: ignore[assignment]
    b.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with structlog.testing.capture_logs() as logs:
            await b.stop()
        assert b.sock.fileno() >= 0  # still open
        assert [e["loops"] for e in logs if e["event"].startswith("data path loop did not stop")] == [["encap"]]
    finally:
        release.set()
        stuck.join()
        b.sock.close()
