"""What the vxlan and host-gw netns tests share: three hosts with a container each, backends started in the
hosts' namespaces with the leases fed by hand (as the daemon's lease watch would), and the operator's view
of the kernel (`ip -j`, ping).

A test file keeps only what is its own: the backend class and config, the container MTU, and the entries it
expects; its fixtures are two lines each, `lab` from three_hosts() and `nodes` from Nodes (see test_vxlan.py).

Namespaces and links come from flannelpy.lab.topology (per-run unique names, removed even when a test
fails); every backend started here is stopped (run() task cancelled, netlink sockets closed) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from flannelpy.backend.base import ExternalInterface
from flannelpy.backend.kernel import KernelBackend
from flannelpy.config import NetworkConfig
from flannelpy.lab.topology import Host, Topology
from flannelpy.subnet.lease import Lease

NETWORK = "10.5.0.0/16"
FAST = 0.2  # resync interval in these tests (flanneld's is 10 s)


def sh(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in {netns}: {proc.stderr or proc.stdout}")
    return proc


def js(netns: str, *argv: str) -> list[dict[str, Any]]:
    out = sh(netns, *argv).stdout.strip()
    return json.loads(out) if out else []


def routes(netns: str) -> set[str]:
    """`ip route` lines in a canonical form: "10.5.2.0/24 via 10.99.0.2 dev eth0",
    "10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink"."""
    out = set()
    for r in js(netns, "ip", "-j", "route", "show"):
        dst = r["dst"] if "/" in r["dst"] or r["dst"] == "default" else f"{r['dst']}/32"
        line = dst + (f" via {r['gateway']}" if "gateway" in r else "") + f" dev {r['dev']}"
        if "onlink" in r.get("flags", []):
            line += " onlink"
        out.add(line)
    return out


def ping(src_netns: str, dst: IPv4Address | str) -> bool:
    return sh(src_netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", str(dst), check=False).returncode == 0


def external_iface(host: Host, public_ip: IPv4Address | None = None) -> ExternalInterface:
    link = js(host.netns, "ip", "-j", "link", "show", host.iface)[0]
    return ExternalInterface(name=host.iface, index=link["ifindex"], ip=host.address,
                             public_ip=public_ip or host.address, mtu=link["mtu"])


def subnet_of(host: Host) -> IPv4Network:
    return IPv4Network(f"10.5.{host.index}.0/24")


def three_hosts(container_mtu: int) -> Iterator[Topology]:
    """Hosts h1..h3 on one link (10.99.0.1-3/24 on eth0), each with a container in 10.5.<index>.0/24 behind
    a bridge holding the subnet's first address, as docker0 with --bip."""
    with Topology() as topo:
        topo.build(3)
        for host in topo.hosts.values():
            topo.add_containers(host.name, IPv4Interface(f"10.5.{host.index}.1/24"), mtu=container_mtu, count=1)
        yield topo


@dataclass
class Node:
    host: Host
    backend: Any  # the test file's backend class (a KernelBackend)
    lease: Lease
    task: asyncio.Task[None] | None = None

    @property
    def ns(self) -> str:
        return self.host.netns

    @property
    def container_ns(self) -> str:
        return self.host.containers[0].netns

    @property
    def container_ip(self) -> IPv4Address:
        return self.host.containers[0].address


class Nodes:
    """Backends of one kind started on lab hosts; all of them are stopped when the `async with` ends."""

    def __init__(self, backend: type[KernelBackend], config: NetworkConfig) -> None:
        self.backend = backend
        self.config = config
        self.nodes: list[Node] = []

    async def __aenter__(self) -> Nodes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for n in self.nodes:
            await self.stop(n)

    async def start(self, host: Host, config: NetworkConfig | None = None, *, run: bool = False) -> Node:
        """Lease attributes from the backend, the lease (subnet 10.5.<index>.0/24), start(); run(): the
        resync loop as a task."""
        backend = self.backend(config or self.config, external_iface(host), netns=host.netns,  # type: ignore[abstract]
                               resync_interval=FAST)
        lease = Lease(subnet_of(host), await backend.lease_attrs())
        await backend.start(lease)
        node = Node(host, backend, lease)
        if run:
            node.task = asyncio.create_task(backend.run())
        self.nodes.append(node)
        return node

    async def stop(self, node: Node) -> None:
        if node.task is not None:
            node.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await node.task
            node.task = None
        await node.backend.stop()

    async def mesh(self) -> None:
        """Every node learns every other node's lease (the daemon's first snapshot)."""
        for n in self.nodes:
            await n.backend.apply([m.lease for m in self.nodes if m is not n], [])


async def resynced(backend: KernelBackend, rounds: int = 2) -> None:
    """Until the run() loop has done `rounds` reconciles since this call (so one full round started after it)."""
    start = backend.reconciles
    for _ in range(500):
        if backend.reconciles >= start + rounds:
            return
        await asyncio.sleep(FAST / 4)
    raise AssertionError("the reconcile loop did not run")
