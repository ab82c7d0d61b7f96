"""The library API: the documented example runs, and a Node behaves as the daemon does."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

import flannelpy
from flannelpy.errors import FlannelError, LeaseRevokedError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = b'{"Network": "10.5.0.0/16", "Backend": {"Type": "alloc"}}'


def _iface(n: int) -> flannelpy.ExternalInterface:
    ip = IPv4Address(f"192.0.2.{n}")
    return flannelpy.ExternalInterface(name="eth0", index=2, ip=ip, public_ip=ip, mtu=1500)


def _options(tmp_path: Path | None = None) -> flannelpy.NodeOptions:
    return flannelpy.NodeOptions(subnet_file=tmp_path / "subnet.env" if tmp_path else None,
                                 iptables_forward_rules=False)


async def started(config: bytes = CONFIG,
                  tmp_path: Path | None = None) -> tuple[flannelpy.MemoryRegistry, flannelpy.Node]:
    """A registry holding `config` and a node started on it (host 192.0.2.1)."""
    registry = flannelpy.MemoryRegistry()
    await registry.put("/coreos.com/network/config", config)
    node = flannelpy.Node(registry, _iface(1), _options(tmp_path))
    await node.start()
    return registry, node


def test_documented_example_runs_and_two_nodes_learn_each_other() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "embed.py")], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1, proc.stdout  # the answer alone: the node logs to stderr
    assert "Acquired lease" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["first"] != result["second"]
    assert result["first_learned"] == [result["second"]]
    assert result["first_routes"] == [result["second"]]
    assert result["ready"] is True


async def test_node_writes_the_subnet_file_and_keeps_its_lease_on_stop(tmp_path: Path) -> None:
    registry, node = await started(tmp_path=tmp_path)
    assert node.ready
    assert node.lease is not None
    text = (tmp_path / "subnet.env").read_text()
    assert f"FLANNEL_SUBNET={node.lease.subnet.network_address + 1}/24\n" in text
    await node.stop()
    kvs, _ = await registry.list_prefix("/coreos.com/network/subnets/")
    assert [kv.key.rsplit("/", 1)[-1] for kv in kvs] == [node.lease.key]

    again = flannelpy.Node(registry, _iface(1), _options(tmp_path))
    await again.start()
    assert again.lease is not None and again.lease.subnet == node.lease.subnet
    await again.stop()


async def test_a_node_with_ipv6_enabled_runs_on_an_ipv4_lease(tmp_path: Path) -> None:
    _, node = await started(b'{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/56", '
                            b'"Backend": {"Type": "alloc"}}', tmp_path)
    assert node.ready and node.lease is not None
    text = (tmp_path / "subnet.env").read_text()
    assert f"FLANNEL_SUBNET={node.lease.subnet.network_address + 1}/24\n" in text and "IPV6" not in text
    await node.stop()


async def revoke(registry: flannelpy.MemoryRegistry, node: flannelpy.Node) -> None:
    """Delete the node's lease key, as an operator would: its wait() raises LeaseRevokedError."""
    assert node.lease is not None
    await registry.delete(f"/coreos.com/network/subnets/{node.lease.key}")
    with pytest.raises(LeaseRevokedError):
        await asyncio.wait_for(node.wait(), 5)


async def test_node_wait_raises_when_its_lease_is_deleted() -> None:
    registry, node = await started()
    await revoke(registry, node)
    await node.stop()


async def test_a_node_started_again_after_a_revocation_watches_and_renews_again() -> None:
    registry, node = await started()
    await revoke(registry, node)
    await node.stop()

    await node.start()  # a fresh lease: the old revocation must not end the new loops
    peer = flannelpy.Node(registry, _iface(2), _options())
    await peer.start()
    assert peer.lease is not None
    for _ in range(100):
        if peer.lease.subnet in [le.subnet for le in node.routes.leases()]:
            break
        await asyncio.sleep(0.01)
    assert [le.subnet for le in node.routes.leases()] == [peer.lease.subnet]
    assert all(not t.done() for t in node._tasks if t.get_name() in ("watch", "renew")), node._tasks
    await revoke(registry, node)  # and a second revocation is reported again
    await node.stop()
    await peer.stop()


async def test_a_loop_cancelled_by_anything_but_stop_is_reported_by_wait() -> None:
    _, node = await started()
    next(t for t in node._tasks if t.get_name() == "watch").cancel()
    with pytest.raises(RuntimeError, match="watch loop was cancelled"):
        await asyncio.wait_for(node.wait(), 5)
    await node.stop()


async def test_events_report_a_peer_leaving() -> None:
    registry = flannelpy.MemoryRegistry()
    await registry.put("/coreos.com/network/config", CONFIG)
    a = flannelpy.Node(registry, _iface(1), _options())
    b = flannelpy.Node(registry, _iface(2), _options())
    await a.start()
    await b.start()
    assert b.lease is not None
    async with a.events() as events:
        await registry.delete(f"/coreos.com/network/subnets/{b.lease.key}")
        batch = await asyncio.wait_for(events.__anext__(), 5)
    assert [lease.subnet for lease in batch.removed] == [b.lease.subnet]
    assert len(a.routes) == 0
    await b.stop()
    await a.stop()


async def test_stop_ends_a_loop_whose_first_cancellation_was_lost() -> None:
    # gRPC's aio calls end a task cancelled while a stream is being set up as if nothing happened, and the
    # task then waits on the next read for ever: stop() cancels again (a SIGTERM during start-up hung there).
    from flannelpy.node import cancel_tasks

    swallowed = asyncio.Event()

    async def swallows_one_cancel() -> None:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await never  # the "next read"

    task = asyncio.ensure_future(swallows_one_cancel())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_tasks([task]), 30)  # a hang guard, not a timing: it ends or it hangs
    assert swallowed.is_set() and task.cancelled()


async def test_a_failed_start_stops_the_loops_it_started(tmp_path: Path) -> None:
    # A program that retries start() after a failure piled up watch and renewal loops (and etcd watches):
    # 100 failed starts left 600 tasks running, each renewing the lease.
    registry = flannelpy.MemoryRegistry()
    await registry.put("/coreos.com/network/config", CONFIG)
    (tmp_path / "a-directory").mkdir()  # the subnet file's path is a directory: start() fails at the end
    options = flannelpy.NodeOptions(subnet_file=tmp_path / "a-directory", iptables_forward_rules=False)
    before = len(asyncio.all_tasks())
    for _ in range(3):
        node = flannelpy.Node(registry, _iface(1), options)
        with pytest.raises(FlannelError, match="cannot write the subnet file"):
            await node.start()
    assert len(asyncio.all_tasks()) == before
    assert not registry._watchers  # no etcd watch left open
    await node.stop()  # still allowed
