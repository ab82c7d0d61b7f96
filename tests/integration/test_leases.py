"""Subnet leases against a real etcd: concurrent claims, restarts, revocation, garbage, the seed's prefix."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network

import pytest
from structlog.testing import capture_logs

from flannelpy.errors import LeaseRevokedError
from flannelpy.lab.etcd import EtcdCluster
from flannelpy.subnet.lease import Lease, LeaseAttrs
from flannelpy.subnet.manager import SubnetManager
from flannelpy.subnet.registry import Claim, EtcdRegistry, KeyValue
from tests.integration.conftest import etcdctl

CONFIG_JSON = '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'


def host(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.50.{n}"))


class BarrierRegistry(EtcdRegistry):
    """Holds the first listing of the subnets until every host has made it: all hosts then see the
    same free subnets, as hosts started at the same moment do."""

    def __init__(self, endpoints: list[str], barrier: asyncio.Barrier) -> None:
        super().__init__(endpoints)
        self.barrier: asyncio.Barrier | None = barrier

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        result = await super().list_prefix(prefix)
        if self.barrier is not None:
            barrier, self.barrier = self.barrier, None
            await barrier.wait()
        return result


async def start_hosts(etcd: EtcdCluster, prefix: str, count: int) -> list[Lease]:
    """`count` hosts, each with its own etcd connection, claiming at the same moment. They all use the
    same random seed, so they go for the same subnet and must sort the races out."""
    barrier = asyncio.Barrier(count)
    registries = [BarrierRegistry(etcd.endpoints, barrier) for _ in range(count)]
    try:
        managers = [SubnetManager(r, prefix, rng=random.Random(7)) for r in registries]
        config = await managers[0].get_network_config()
        return list(await asyncio.gather(*(m.acquire_lease(config, host(i + 1))
                                           for i, m in enumerate(managers))))
    finally:
        for r in registries:
            await r.close()


@pytest.mark.parametrize("count", [2, 10])
async def test_hosts_starting_together_never_share_a_subnet(etcd: EtcdCluster, prefix: str, count: int) -> None:
    etcdctl(etcd, "put", f"{prefix}/config", CONFIG_JSON)
    with capture_logs() as logs:
        leases = await start_hosts(etcd, prefix, count)
    assert len({le.subnet for le in leases}) == count
    # What etcd holds: one key per host, each with that host's PublicIP, each on its own etcd lease.
    stored = json.loads(etcdctl(etcd, "get", "--prefix", f"{prefix}/subnets/", "-w", "json"))
    assert len(stored["kvs"]) == count
    for lease in leases:
        out = etcdctl(etcd, "get", f"{prefix}/subnets/{lease.key}", "--print-value-only")
        assert json.loads(out)["PublicIP"] == str(lease.attrs.public_ip)
    assert len({le.etcd_lease_id for le in leases}) == count
    # Same seed, same view: every host but one lost the first race, and retried.
    assert sum(e["event"].startswith("another host claimed the subnet first") for e in logs) >= count - 1


async def test_lost_race_retries_and_revokes_the_unused_etcd_lease(etcd: EtcdCluster, prefix: str) -> None:
    class RacedRegistry(EtcdRegistry):
        raced: list[str] = []

        async def create_with_lease(self, key: str, value: bytes, ttl: float) -> Claim | None:
            if not self.raced:  # another host writes the key just before our transaction
                self.raced.append(key)
                etcdctl(etcd, "put", key, host(99).to_json().decode())
            return await super().create_with_lease(key, value, ttl)

    leases_before = etcdctl(etcd, "lease", "list").count("\n")
    reg = RacedRegistry(etcd.endpoints)
    try:
        m = SubnetManager(reg, prefix)
        etcdctl(etcd, "put", f"{prefix}/config", CONFIG_JSON)
        lease = await m.acquire_lease(await m.get_network_config(), host(1))
    finally:
        await reg.close()
    assert RacedRegistry.raced and f"{prefix}/subnets/{lease.key}" != RacedRegistry.raced[0]
    assert json.loads(etcdctl(etcd, "get", RacedRegistry.raced[0], "--print-value-only"))["PublicIP"] == \
        "192.168.50.99"
    # Only our lease was added: the one granted for the lost claim was revoked.
    assert etcdctl(etcd, "lease", "list").count("\n") == leases_before + 1


async def test_restart_gets_its_subnet_back_by_public_ip(etcd: EtcdCluster, prefix: str,
                                                         registry: EtcdRegistry) -> None:
    etcdctl(etcd, "put", f"{prefix}/config", CONFIG_JSON)
    m = SubnetManager(registry, prefix)
    config = await m.get_network_config()
    first = await m.acquire_lease(config, host(1))
    other = await m.acquire_lease(config, host(2))
    again = await SubnetManager(registry, prefix).acquire_lease(config, host(1))
    assert again.subnet == first.subnet != other.subnet
    assert again.etcd_lease_id == first.etcd_lease_id  # one etcd lease per subnet, refreshed


async def test_restart_gets_its_subnet_back_from_the_subnet_file(etcd: EtcdCluster, prefix: str,
                                                                 registry: EtcdRegistry) -> None:
    etcdctl(etcd, "put", f"{prefix}/config", CONFIG_JSON)
    m = SubnetManager(registry, prefix)
    config = await m.get_network_config()
    first = await m.acquire_lease(config, host(1))
    etcdctl(etcd, "del", f"{prefix}/subnets/{first.key}")  # e.g. an operator cleaned up
    again = await SubnetManager(registry, prefix).acquire_lease(config, host(1), prev_subnet=first.subnet)
    assert again.subnet == first.subnet
    assert etcdctl(etcd, "get", f"{prefix}/subnets/{first.key}", "--print-value-only").strip()


async def test_deleted_own_lease_stops_renewal_and_watch(etcd: EtcdCluster, prefix: str,
                                                         registry: EtcdRegistry) -> None:
    etcdctl(etcd, "put", f"{prefix}/config", CONFIG_JSON)
    m = SubnetManager(registry, prefix)
    config = await m.get_network_config()
    lease = await m.acquire_lease(config, host(1))
    first_diff = asyncio.Event()

    async def watch() -> None:
        async for _ in m.watch_leases(config, lease):
            first_diff.set()

    keeper = asyncio.create_task(m.keep_lease(lease))
    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(first_diff.wait(), 10)
    etcdctl(etcd, "del", f"{prefix}/subnets/{lease.key}")
    for task in (watcher, keeper):
        with pytest.raises(LeaseRevokedError, match="Lease has been revoked"):
            await asyncio.wait_for(task, 20)


async def test_garbage_under_subnets_does_not_crash(etcd: EtcdCluster, prefix: str,
                                                     registry: EtcdRegistry) -> None:
    etcdctl(etcd, "put", f"{prefix}/config", CONFIG_JSON)
    for key, value in [("10.5.3.0-24", "{oops"), ("not-a-subnet", "{}"), ("10.5.4.0-24", "[]"),
                       ("10.5.5.0-24", '{"PublicIP":"999.1.1.1"}'), ("10.99.0.0-24", '{"PublicIP":"1.1.1.1"}')]:
        etcdctl(etcd, "put", f"{prefix}/subnets/{key}", value)
    m = SubnetManager(registry, prefix)
    config = await m.get_network_config()
    lease = await m.acquire_lease(config, host(1), prev_subnet=IPv4Network("10.5.50.0/24"))
    assert lease.subnet == IPv4Network("10.5.50.0/24")  # so the keys written below are never ours
    it = m.watch_leases(config, lease)
    assert await asyncio.wait_for(it.__anext__(), 10) == ([], [])
    await registry.put(f"{prefix}/subnets/10.5.6.0-24", b"\x00\xff binary")
    etcdctl(etcd, "put", f"{prefix}/subnets/10.5.7.0-24", host(7).to_json().decode())
    added, removed = await asyncio.wait_for(it.__anext__(), 10)
    assert [str(le.subnet) for le in added] == ["10.5.7.0/24"] and removed == []
    await it.aclose()
    assert {str(le.subnet) for le in await m.list_leases()} == {str(lease.subnet), "10.5.7.0/24", "10.99.0.0/24"}


async def test_seed_prefix_and_config(etcd: EtcdCluster, registry: EtcdRegistry) -> None:
    # The seed tutorial's prefix and config; written with the v3 API as the missing-config hint says.
    prefix = "/flannel_use/network"
    etcdctl(etcd, "del", "--prefix", prefix + "/")
    etcdctl(etcd, "put", f"{prefix}/config", '{"Network":"10.10.0.0/16"}')
    m = SubnetManager(registry, prefix)
    config = await m.get_network_config()
    assert config.backend_type == "udp" and config.subnet_len == 24
    lease = await m.acquire_lease(config, host(1))
    assert lease.subnet.subnet_of(IPv4Network("10.10.0.0/16")) and lease.subnet.prefixlen == 24
    value = etcdctl(etcd, "get", f"{prefix}/subnets/{lease.key}", "--print-value-only")
    assert json.loads(value) == {"PublicIP": "192.168.50.1", "PublicIPv6": None}  # as flanneld writes it
    leases = await m.list_leases()
    assert [le.subnet for le in leases] == [lease.subnet]
    assert leases[0].expiration is not None
    etcdctl(etcd, "del", "--prefix", prefix + "/")


async def test_config_set_and_get_round_trip(etcd: EtcdCluster, prefix: str, registry: EtcdRegistry) -> None:
    m = SubnetManager(registry, prefix)
    assert await m.get_config_text() is None
    await m.set_config('{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}')
    assert json.loads(etcdctl(etcd, "get", f"{prefix}/config", "--print-value-only"))["Network"] == "10.7.0.0/16"
    assert (await m.get_network_config()).backend_type == "vxlan"


async def test_reservation_is_kept_permanent(etcd: EtcdCluster, prefix: str, registry: EtcdRegistry) -> None:
    etcdctl(etcd, "put", f"{prefix}/config", CONFIG_JSON)
    etcdctl(etcd, "put", f"{prefix}/subnets/10.5.33.0-24", host(1).to_json().decode())  # no etcd lease
    m = SubnetManager(registry, prefix)
    lease = await m.acquire_lease(await m.get_network_config(), host(1))
    assert lease.subnet == IPv4Network("10.5.33.0/24") and lease.is_reservation
    stored = json.loads(etcdctl(etcd, "get", f"{prefix}/subnets/10.5.33.0-24", "-w", "json"))
    assert "lease" not in stored["kvs"][0]  # still no etcd lease attached


def test_config_set_and_get_as_the_quickstart_writes_them(etcd: EtcdCluster, prefix: str) -> None:
    # As an operator runs it (a process of its own: the CLI sets up logging for the whole process).
    def flannelpy(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flannelpy", *args], capture_output=True, text=True,
                              timeout=60)

    endpoints = f"--etcd-endpoints={','.join(etcd.endpoints)}"
    # docs/quickstart.md and the daemon's missing-config hint: the flags between "set" and the JSON.
    done = flannelpy("config", "set", endpoints, f"--etcd-prefix={prefix}", '{"Network":"10.10.0.0/16"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(etcdctl(etcd, "get", "--print-value-only", f"{prefix}/config")) == {"Network": "10.10.0.0/16"}
    got = flannelpy("config", "get", endpoints, f"--etcd-prefix={prefix}")
    assert got.returncode == 0 and json.loads(got.stdout) == {"Network": "10.10.0.0/16"}, got.stderr


def test_config_and_leases_verbs_answer_mistakes_in_one_line(etcd: EtcdCluster, prefix: str) -> None:
    def flannelpy(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flannelpy", *args], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=60)

    endpoints = f"--etcd-endpoints={','.join(etcd.endpoints)}"
    cases = [
        # Not JSON, not a file (it was a FileNotFoundError traceback).
        (("config", "set", endpoints, "notjson"), 2, "'notjson' is neither a JSON object nor a file"),
        (("config", "set", endpoints, "--etcd-prefix=", '{"Network":"10.10.0.0/16"}'), 2, "--etcd-prefix must not"),
        # Parsed, but every daemon would stop on it at start: refused before writing.
        (("config", "set", endpoints, f"--etcd-prefix={prefix}",
          '{"Network":"10.17.0.0/16","Backend":{"Type":"udp","Port":0}}'), 2, "Backend.Port=0"),
        (("config", "set", endpoints, f"--etcd-prefix={prefix}",
          '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:16::/56"}'), 2, "IPv6-only"),
        # etcd not there (a RegistryUnavailableError traceback before).
        (("config", "get", "--etcd-endpoints=http://127.0.0.1:1"), 1, "error: etcd at http://127.0.0.1:1:"),
        (("leases", "--etcd-endpoints=http://127.0.0.1:1"), 1, "error: etcd at http://127.0.0.1:1:"),
    ]
    for args, code, says in cases:
        done = flannelpy(*args)
        assert (done.returncode, done.stderr.count("\n")) == (code, 1), (args, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert etcdctl(etcd, "get", f"{prefix}/config") == ""  # nothing written by the refused ones

    # Unknown keys are written (flanneld ignores them) with a warning; the key printed is the one written.
    done = flannelpy("config", "set", endpoints, f"--etcd-prefix={prefix}/", '{"Network":"10.10.0.0/16","Extra":1}')
    assert done.returncode == 0 and done.stdout == f"wrote {prefix}/config\n", done
    assert "unknown key Extra ignored" in done.stderr

    # A reader that stops early (`flannelpy leases | head -1`): no BrokenPipeError traceback.
    for i in range(1, 4):
        etcdctl(etcd, "put", f"{prefix}/subnets/10.10.{i}.0-24", '{"PublicIP":"10.99.0.1","PublicIPv6":null}')
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as closed:
        done = flannelpy("leases", endpoints, f"--etcd-prefix={prefix}", stdout=closed.fileno())
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
