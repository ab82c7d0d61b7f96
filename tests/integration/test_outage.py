"""etcd going away under a running control plane: stopped and restarted, compacted while we were cut off,
a frozen member in a three-member cluster."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from flannelpy.config import NetworkConfig
from flannelpy.lab.etcd import EtcdCluster, EtcdMemberSpec, free_port
from flannelpy.subnet.lease import Lease
from flannelpy.subnet.manager import SubnetManager
from flannelpy.subnet.registry import EtcdRegistry
from tests.integration.conftest import TcpProxy, etcdctl
from tests.integration.test_leases import CONFIG_JSON, host

Diff = tuple[list[Lease], list[Lease]]


async def next_diff(it: AsyncIterator[Diff], timeout: float = 60) -> tuple[list[str], list[str]]:
    added, removed = await asyncio.wait_for(it.__anext__(), timeout)
    return [str(le.subnet) for le in added], [str(le.subnet) for le in removed]


async def claim(endpoints: list[str], prefix: str, config: NetworkConfig, n: int) -> Lease:
    """Another host claims a subnet over its own connection."""
    reg = EtcdRegistry(endpoints)
    try:
        return await SubnetManager(reg, prefix).acquire_lease(config, host(n))
    finally:
        await reg.close()


async def wait_for_log(logs: list[dict[str, object]], event: str, after: int, timeout: float = 60) -> None:
    for _ in range(int(timeout * 10)):
        if any(str(e["event"]).startswith(event) for e in logs[after:]):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {event!r} log line after the outage")


async def test_etcd_stopped_and_started_again(private_etcd: EtcdCluster, prefix: str) -> None:
    etcdctl(private_etcd, "put", f"{prefix}/config", CONFIG_JSON)
    reg = EtcdRegistry(private_etcd.endpoints)
    # Renewal due 10 s after the claim, so it falls inside the outage; failures retried every 2 s.
    m = SubnetManager(reg, prefix, lease_ttl=60, renew_margin=50, renew_retry=2)
    config = await m.get_network_config()
    lease = await m.acquire_lease(config, host(1))
    it = m.watch_leases(config, lease)
    keeper = asyncio.create_task(m.keep_lease(lease))
    try:
        assert await next_diff(it) == ([], [])
        with capture_logs() as logs:
            private_etcd.kill_member("etcd0")
            await asyncio.sleep(25)
            private_etcd.start_member("etcd0")
            restarted = len(logs)
            other = await claim(private_etcd.endpoints, prefix, config, 2)  # added while we reconnect
            assert await next_diff(it) == ([str(other.subnet)], [])
            await wait_for_log(logs, "Lease renewed", after=restarted)
        assert any(str(e["event"]).startswith("Lease renewal failed") for e in logs)  # it did try meanwhile
        assert not keeper.done()
        assert reg.reconnects >= 1 and reg.last_success is not None
        # Still the same etcd lease, refreshed, and our key still on it.
        ttl = etcdctl(private_etcd, "lease", "timetolive", f"{lease.etcd_lease_id:x}", "--keys")
        assert f"{prefix}/subnets/{lease.key}" in ttl
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await it.aclose()
        await reg.close()


@contextlib.asynccontextmanager
async def behind_a_proxy(cluster: EtcdCluster,
                         prefix: str) -> AsyncIterator[tuple[TcpProxy, EtcdRegistry, SubnetManager, NetworkConfig]]:
    """Our manager reaches etcd through a proxy the test can cut (proxy.stop()) while etcd runs on; `direct`
    is a connection of its own, for what happens meanwhile."""
    etcdctl(cluster, "put", f"{prefix}/config", CONFIG_JSON)
    proxy = TcpProxy("127.0.0.1", int(cluster.endpoints[0].rsplit(":", 1)[1]))
    await proxy.start()
    reg = EtcdRegistry([proxy.endpoint], max_backoff=1.0)
    direct = EtcdRegistry(cluster.endpoints)
    try:
        m = SubnetManager(reg, prefix)
        yield proxy, direct, m, await m.get_network_config()
    finally:
        await proxy.stop()
        await reg.close()
        await direct.close()


async def test_compaction_while_cut_off_relists_with_a_correct_diff(private_etcd: EtcdCluster,
                                                                    prefix: str) -> None:
    async with behind_a_proxy(private_etcd, prefix) as (proxy, direct, m, config):
        two = await claim(private_etcd.endpoints, prefix, config, 2)
        three = await claim(private_etcd.endpoints, prefix, config, 3)
        lease = await m.acquire_lease(config, host(1))
        it = m.watch_leases(config, lease)
        assert sorted((await next_diff(it))[0]) == sorted([str(two.subnet), str(three.subnet)])
        await proxy.stop()  # we are cut off; etcd runs on
        etcdctl(private_etcd, "del", f"{prefix}/subnets/{two.key}")
        four = await claim(private_etcd.endpoints, prefix, config, 4)
        _, revision = await direct.list_prefix(prefix)
        await direct.compact(revision)
        with capture_logs() as logs:
            await proxy.start()
            assert await next_diff(it) == ([str(four.subnet)], [str(two.subnet)])
        assert any("compacted" in str(e["event"]) for e in logs)
        await it.aclose()


async def test_a_delete_compacted_at_the_resume_revision_is_not_lost(private_etcd: EtcdCluster,
                                                                      prefix: str) -> None:
    # The only change while we were cut off is a delete, and etcd compacts at its very revision: a watch
    # from that revision is accepted but no longer holds the delete (its tombstone went with the compaction).
    async with behind_a_proxy(private_etcd, prefix) as (proxy, direct, m, config):
        two = await claim(private_etcd.endpoints, prefix, config, 2)
        lease = await m.acquire_lease(config, host(1))
        it = m.watch_leases(config, lease)
        assert (await next_diff(it))[0] == [str(two.subnet)]
        await proxy.stop()
        etcdctl(private_etcd, "del", f"{prefix}/subnets/{two.key}")
        _, revision = await direct.list_prefix(prefix)
        await direct.compact(revision)  # the delete's own revision
        await proxy.start()
        assert await next_diff(it, timeout=30) == ([], [str(two.subnet)])
        await it.aclose()


async def test_frozen_member_is_left_for_another(tmp_path: Path, prefix: str) -> None:
    members = [EtcdMemberSpec(f"m{i}", "127.0.0.1", free_port(), free_port()) for i in range(3)]
    with EtcdCluster(tmp_path / "etcd", members) as cluster:
        etcdctl(cluster, "put", f"{prefix}/config", CONFIG_JSON)
        reg = EtcdRegistry(cluster.endpoints, dial_timeout=2, request_timeout=2)
        try:
            m = SubnetManager(reg, prefix)
            config = await m.get_network_config()
            lease = await m.acquire_lease(config, host(1))
            it = m.watch_leases(config, lease)
            assert await next_diff(it) == ([], [])
            assert reg.endpoint == cluster.endpoints[0]
            cluster.pause_member("m0")  # SIGSTOP: its sockets stay open but nothing answers
            try:
                other = await claim(cluster.endpoints[1:], prefix, config, 2)
                assert await next_diff(it) == ([str(other.subnet)], [])  # the watch moved on
                leases = await m.list_leases()  # and so do plain requests
                assert {le.subnet for le in leases} == {lease.subnet, other.subnet}
                assert reg.endpoint != cluster.endpoints[0]
            finally:
                cluster.resume_member("m0")
            await it.aclose()
        finally:
            await reg.close()


async def test_config_wait_survives_etcd_being_down(private_etcd: EtcdCluster, prefix: str) -> None:
    reg = EtcdRegistry(private_etcd.endpoints)
    try:
        m = SubnetManager(reg, prefix)
        task = asyncio.create_task(m.get_network_config())
        await asyncio.sleep(1.5)
        private_etcd.kill_member("etcd0")
        await asyncio.sleep(3)
        private_etcd.start_member("etcd0")
        assert not task.done()  # still waiting for the config, not crashed
        etcdctl(private_etcd, "put", f"{prefix}/config", CONFIG_JSON)
        config = await asyncio.wait_for(task, 30)
        assert str(config.network) == "10.5.0.0/16"
    finally:
        await reg.close()


async def test_a_quiet_watch_keeps_etcd_counted_as_reached(etcd: EtcdCluster, prefix: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # /readyz fails once etcd has not answered for 60 s; on an idle cluster only the watch talks to etcd,
    # and etcd's own progress notifications come after 10 quiet minutes. The watch asks for progress.
    import flannelpy.subnet.registry as registry_module

    monkeypatch.setattr(registry_module, "PROGRESS_EVERY", 0.3)
    reg = EtcdRegistry(etcd.endpoints)
    try:
        _, revision = await reg.list_prefix(prefix)

        async def watch() -> None:
            async for _ in reg.watch_prefix(prefix + "/subnets/", revision + 1):
                pass

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)
        seen = reg.last_success
        await asyncio.sleep(1.5)  # nothing under the prefix changes, no other request is made
        assert reg.last_success is not None and seen is not None and reg.last_success > seen + 0.5
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    finally:
        await reg.close()


async def test_calls_in_flight_when_another_fails_over_fail_over_too(private_etcd: EtcdCluster,
                                                                     prefix: str) -> None:
    # The first call's failover closes the shared channel; grpc cancels the other call on it, which must
    # come out as "etcd unavailable" (retried by its caller), not as a cancellation that ends a loop.
    reg = EtcdRegistry(private_etcd.endpoints, dial_timeout=2, request_timeout=3)
    try:
        await reg.put(f"{prefix}/k", b"v")
        private_etcd.pause_member("etcd0")
        try:
            first = asyncio.create_task(reg.get(f"{prefix}/k"))
            await asyncio.sleep(1.5)
            second = asyncio.create_task(reg.list_prefix(f"{prefix}/"))
            results = await asyncio.gather(first, second, return_exceptions=True)
        finally:
            private_etcd.resume_member("etcd0")
        assert [type(r).__name__ for r in results] == ["RegistryUnavailableError"] * 2, results
        assert (await reg.get(f"{prefix}/k")) is not None  # and the registry works again
    finally:
        await reg.close()


async def test_an_etcd_restored_to_an_earlier_revision_is_listed_again(private_etcd: EtcdCluster,
                                                                       prefix: str) -> None:
    # etcd rebuilt (or restored from an older snapshot): its revision starts over below the one our watch
    # resumes from. A watch from the old revision would stay silent until etcd counted up to it, so a host
    # that joined meanwhile would be reachable from nowhere.
    etcdctl(private_etcd, "put", f"{prefix}/config", CONFIG_JSON)
    reg = EtcdRegistry(private_etcd.endpoints)
    m = SubnetManager(reg, prefix)
    config = await m.get_network_config()
    lease = await m.acquire_lease(config, host(1))
    for i in range(30):  # history: the revision the watch resumes from ends up well above a fresh etcd's
        etcdctl(private_etcd, "put", f"{prefix}-other/{i}", "x")
    it = m.watch_leases(config, lease)
    try:
        assert await next_diff(it) == ([], [])
        private_etcd.kill_member("etcd0")
        shutil.rmtree(private_etcd.data_dir("etcd0"))
        with capture_logs() as logs:
            private_etcd.start_member("etcd0")
            etcdctl(private_etcd, "put", f"{prefix}/config", CONFIG_JSON)
            other = await claim(private_etcd.endpoints, prefix, config, 2)
            assert await next_diff(it, timeout=30) == ([str(other.subnet)], [])
        assert any(str(e["event"]).startswith("etcd revision went back") for e in logs)
    finally:
        await it.aclose()
        await reg.close()


async def test_an_unreachable_first_endpoint_is_named_in_the_log(etcd: EtcdCluster, prefix: str) -> None:
    # A member down or black-holed costs up to the dial timeout before the next one is tried: the log says so
    # (start-up seemed to stall for seconds without a word).
    dead = f"http://127.0.0.1:{free_port()}"
    reg = EtcdRegistry([dead, *etcd.endpoints])
    try:
        with capture_logs() as logs:
            assert await reg.get(f"{prefix}/nothing") is None
        skipped = [e for e in logs if e["event"] == "etcd endpoint unreachable; trying the next one"]
        assert [(e["endpoint"], e["next"]) for e in skipped] == [(dead, etcd.endpoints[0])], logs
    finally:
        await reg.close()


async def test_a_resumed_watch_says_so_without_waiting_for_an_event(private_etcd: EtcdCluster, prefix: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # "etcd watch resumed" came with the next event or progress report, up to 20 s after etcd was back.
    monkeypatch.setattr("flannelpy.subnet.registry.PROGRESS_EVERY", 3600.0)  # no progress report to lean on
    reg = EtcdRegistry(private_etcd.endpoints)
    watch = reg.watch_prefix(f"{prefix}/subnets/", 1)
    getter = asyncio.ensure_future(anext(watch))
    try:
        await asyncio.sleep(1)
        with capture_logs() as logs:
            private_etcd.kill_member("etcd0")
            private_etcd.start_member("etcd0")
            await wait_for_log(logs, "etcd watch resumed", after=0, timeout=30)
        assert not getter.done()  # no event came: the line did not wait for one
    finally:
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getter
        await watch.aclose()
        await reg.close()


async def test_a_listing_larger_than_64_mib_is_read(private_etcd: EtcdCluster, prefix: str) -> None:
    # 48 values of 1.45 MB (70 MB; etcd's largest request is 1.5 MiB) under subnets/ by a hostile or broken writer:
    # gRPC's default cap refused the listing, and every daemon failed at start.
    reg = EtcdRegistry(private_etcd.endpoints)
    try:
        blob = b"x" * 1_450_000
        for i in range(48):
            await reg.put(f"{prefix}/subnets/junk-{i}", blob)
        kvs, _ = await reg.list_prefix(f"{prefix}/subnets/")
        assert len(kvs) == 48
    finally:
        await reg.close()
