"""Namespace fixtures for the udp backend tests (root).

udp_pair: two hosts (namespaces) joined by one veth, 10.99.0.1 and 10.99.0.2 on `eth0`; behind each host
one "container" namespace on a veth whose host end holds the subnet's first address, as docker0 does
with --bip (10.10.1.1/24 and 10.10.2.1/24), default route via it. A UdpBackend runs in each host as a
subprocess (tests/netns/udp_node.py) with the two leases fed by hand. Every name carries a per-run
prefix; everything is removed (processes by PID, then namespaces) even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE_SCRIPT = Path(__file__).with_name("udp_node.py")
NETWORK = "10.10.0.0/16"
PORT = 8285
LeaseSpec = tuple[str, str, str | None]  # subnet, PublicIP, BackendType


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def nsexec(ns: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)


def kill_netns(ns: str) -> None:
    """Stop what still runs in ns (by PID), then delete it."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    sh("ip", "netns", "del", ns, check=False)


class Node:
    """A UdpBackend running in a host namespace, driven over its stdin/stdout."""

    def __init__(self, ns: str, spec: dict[str, Any]) -> None:
        self.ns = ns
        self.spec = spec
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(NODE_SCRIPT), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=REPO, env=env,
        )
        self.ready = self._read()
        if "error" in self.ready:
            raise AssertionError(f"node in {ns} failed to start: {self.ready['error']}\n{self.logs()}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"node in {self.ns} exited ({self.proc.poll()}):\n{self.logs()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def logs(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def apply(self, added: Sequence[LeaseSpec] = (), removed: Sequence[LeaseSpec] = ()) -> None:
        self.call(op="apply", added=list(added), removed=list(removed))

    def counters(self) -> dict[str, int]:
        reply = self.call(op="counters")
        assert not reply["failed"], f"data path of {self.ns} stopped:\n{self.logs()}"
        out: dict[str, int] = reply["counters"]
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, AssertionError, ValueError):
                self.call(op="stop")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()


@dataclass
class Pair:
    prefix: str
    datapath: str
    mode: str  # as given to build_pair
    hosts: list[str] = field(default_factory=list)  # host namespaces
    containers: list[str] = field(default_factory=list)  # container namespaces
    nodes: list[Node] = field(default_factory=list)
    public_ips = ("10.99.0.1", "10.99.0.2")
    subnets = ("10.10.1.0/24", "10.10.2.0/24")
    container_ips = ("10.10.1.2", "10.10.2.2")

    def lease(self, i: int) -> tuple[str, str, None]:
        return (self.subnets[i], self.public_ips[i], None)


def build_pair(prefix: str, datapath: str, stack: contextlib.ExitStack, mtu: int = 1500) -> Pair:
    """datapath: "compiled" (offloads as the backend defaults), "python", or "compiled-<FLANNELPY_OFFLOAD
    value>" such as "compiled-0" (offloads off) or "compiled-tso,gso"; "@1" or "@2" at the end sets the
    data-path threads (default: the backend's choice for this machine); "+rt" last, SCHED_RR priority 1."""
    mode = datapath
    datapath, _, rt = datapath.partition("+")
    datapath, _, threads = datapath.partition("@")
    datapath, _, offload = datapath.partition("-")
    pair = Pair(prefix, datapath, mode)
    for i in range(2):
        for ns in (f"{prefix}-h{i + 1}", f"{prefix}-c{i + 1}"):
            sh("ip", "netns", "add", ns)
            stack.callback(kill_netns, ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        pair.hosts.append(f"{prefix}-h{i + 1}")
        pair.containers.append(f"{prefix}-c{i + 1}")
    h1, h2 = pair.hosts
    sh("ip", "-n", h1, "link", "add", "eth0", "mtu", str(mtu), "type", "veth", "peer", "name", "eth0",
       "netns", h2, "mtu", str(mtu))
    for i, host in enumerate(pair.hosts):
        sh("ip", "-n", host, "addr", "add", f"{pair.public_ips[i]}/24", "dev", "eth0")
        sh("ip", "-n", host, "link", "set", "eth0", "up")
        nsexec(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Container side: the host end holds the subnet's .1 as docker0 does with --bip.
        cont = pair.containers[i]
        gw = pair.subnets[i].replace(".0/24", ".1")
        sh("ip", "-n", host, "link", "add", "c0", "mtu", str(mtu - 28), "type", "veth", "peer", "name",
           "eth0", "netns", cont, "mtu", str(mtu - 28))
        sh("ip", "-n", host, "addr", "add", f"{gw}/24", "dev", "c0")
        sh("ip", "-n", host, "link", "set", "c0", "up")
        sh("ip", "-n", cont, "addr", "add", f"{pair.container_ips[i]}/24", "dev", "eth0")
        sh("ip", "-n", cont, "link", "set", "eth0", "up")
        sh("ip", "-n", cont, "route", "add", "default", "via", gw)
    for i, host in enumerate(pair.hosts):
        node = Node(host, {"network": NETWORK, "subnet": pair.subnets[i], "iface": "eth0",
                           "datapath": datapath, "offload": offload or None,
                           "threads": int(threads) if threads else None, "rtprio": 1 if rt == "rt" else None})
        stack.callback(node.stop)
        pair.nodes.append(node)
    pair.nodes[0].apply(added=[pair.lease(1)])
    pair.nodes[1].apply(added=[pair.lease(0)])
    return pair


def new_prefix() -> str:
    return f"fu{os.getpid() % 10000}{secrets.token_hex(2)}"


@pytest.fixture(scope="module", params=["compiled"])
def udp_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Two udp-backend hosts with a container each, shared by a module's tests (which leave the routes
    as they found them and compare counters before/after); datapath compiled unless parametrized."""
    with contextlib.ExitStack() as stack:
        yield build_pair(new_prefix(), request.param, stack)


@pytest.fixture
def fresh_udp_pair() -> Iterator[Pair]:
    """Like udp_pair, but for one test only (for tests that stop nodes or need untouched counters)."""
    with contextlib.ExitStack() as stack:
        yield build_pair(new_prefix(), "compiled", stack)


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
