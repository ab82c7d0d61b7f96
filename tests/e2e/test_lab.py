"""The lab itself: namespaces, an etcd cluster on the hosts' addresses, and teardown that leaves nothing,
also after a failure half-way and on SIGTERM. Needs no daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from flannelpy.lab.cluster import Cluster, probe_argv
from flannelpy.lab.etcd import EtcdCluster, EtcdMemberSpec
from flannelpy.lab.topology import Host, LabError, Topology, list_namespaces, run

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_topology_hosts_containers_and_etcd_then_nothing_left(tmp_path: Path) -> None:
    with Topology() as topo:
        topo.build(3)
        for i, host in enumerate(topo.hosts.values()):
            topo.add_containers(host.name, IPv4Interface(f"10.10.{i + 1}.1/24"), 1472, 2)
        h1, h3 = topo.hosts["h1"], topo.hosts["h3"]
        c1, c2 = h1.containers
        assert (str(c1.address), str(c2.address)) == ("10.10.1.2", "10.10.1.3")
        route = run(c1.exec_argv(["ip", "route", "show", "default"])).stdout
        assert "via 10.10.1.1" in route
        assert "mtu 1472" in run(c1.exec_argv(["ip", "link", "show", "eth0"])).stdout
        assert run(h1.exec_argv(["sysctl", "-n", "net.ipv4.ip_forward"])).stdout.strip() == "1"

        members = [EtcdMemberSpec(h.name, str(h.address), netns=h.netns) for h in topo.hosts.values()]
        with EtcdCluster(tmp_path / "etcd", members):
            env = {**os.environ, "ETCDCTL_API": "3"}
            put = ["etcdctl", f"--endpoints={members[0].client_url}", "put", "/lab/k", "v"]
            subprocess.run(h1.exec_argv(put), env=env, check=True, capture_output=True)
            get = ["etcdctl", f"--endpoints={members[2].client_url}", "get", "--print-value-only", "/lab/k"]
            out = subprocess.run(h3.exec_argv(get), env=env, check=True, capture_output=True, text=True).stdout
            assert out.strip() == "v"
            # A process left running in a container namespace is killed by the teardown.
            stray = subprocess.Popen(c2.exec_argv(["sleep", "300"]), start_new_session=True)
        prefix = topo.prefix
    assert list_namespaces(prefix) == []
    stray.wait(timeout=5)
    assert stray.returncode is not None


def test_hosts_join_and_leave_a_running_topology() -> None:
    with Topology() as topo:
        topo.build(2)
        h3 = topo.add_host()
        assert run(h3.exec_argv(["ip", "-br", "addr", "show", "eth0"])).stdout.split()[2] == "10.99.0.3/24"
        assert _ping_ok(topo.hosts["h1"], "10.99.0.3")
        topo.remove_host("h2")
        assert f"{topo.prefix}-h2" not in list_namespaces(topo.prefix)
        assert _ping_ok(h3, "10.99.0.1")


def _ping_ok(host: Host, dst: str) -> bool:
    out = run(host.exec_argv(probe_argv("ping", dst, "--count", "2", "--interval", "0.05"))).stdout
    result = json.loads(out)
    return bool(result["received"] == result["sent"])


def test_failure_half_way_leaves_nothing() -> None:
    with pytest.raises(RuntimeError), Topology() as topo:
        topo.build(2)
        topo.add_containers("h1", IPv4Interface("10.10.1.1/24"), 1472, 1)
        prefix = topo.prefix
        raise RuntimeError("a test step failed")
    assert list_namespaces(prefix) == []


def test_cluster_whose_daemon_cannot_start_removes_everything(tmp_path: Path) -> None:
    # The daemons start, then exit on the config; etcd and the namespaces are up by then.
    cluster = Cluster(hosts=2, workdir=tmp_path, config={"Network": "10.10.0.0/16", "Backend": {"Type": "nope"}})
    with pytest.raises(LabError, match=r"(?s)exited.*nope"):
        cluster.start(timeout=30)
    assert list_namespaces(cluster.topology.prefix) == []
    assert cluster.daemons == {}
    assert cluster.etcd is not None
    assert all(cluster.etcd.pid(m.name) is None for m in cluster.etcd.members)


def test_sigterm_removes_the_topology_and_a_forked_child_does_not() -> None:
    script = (
        "import os, sys, time\n"
        "from flannelpy.lab.topology import Topology\n"
        "t = Topology()\n"
        "t.build(2)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    sys.exit(0)  # runs atexit in a forked child (pyroute2 forks): must leave the topology alone\n"
        "os.waitpid(child, 0)\n"
        "print('PREFIX=' + t.prefix, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    prefix = next(line for line in proc.stdout if line.startswith("PREFIX=")).strip().removeprefix("PREFIX=")
    assert len(list_namespaces(prefix)) == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 5
    while list_namespaces(prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list_namespaces(prefix) == []
