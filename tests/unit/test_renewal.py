"""Lease renewal timing and revocation (SubnetManager.keep_lease) with an injected clock."""

from __future__ import annotations

import asyncio
import contextlib
from ipaddress import IPv4Address

import pytest

from flannelpy.config import parse_config
from flannelpy.errors import ExitCode, LeaseRevokedError
from flannelpy.subnet.lease import Lease, LeaseAttrs
from flannelpy.subnet.manager import SubnetManager
from flannelpy.testing import FakeClock, MemoryRegistry

PREFIX = "/coreos.com/network"
SUBNETS = PREFIX + "/subnets/"
CONFIG = parse_config('{"Network":"10.5.0.0/16"}')
ME = LeaseAttrs(IPv4Address("192.168.0.1"))
TTL = 86400.0
MARGIN = 3600.0


class RecordingRegistry(MemoryRegistry):
    """Records when each refresh happened; fails the first `fail` refreshes; stops after `stop_after`."""

    def __init__(self, clock: FakeClock, fail: int = 0, stop_after: int = 3) -> None:
        super().__init__(clock)
        self.refreshes: list[tuple[float, int]] = []
        self.fail = fail
        self.stop_after = stop_after
        self.done = asyncio.Event()

    async def refresh_lease(self, lease_id: int) -> float | None:
        self.refreshes.append((self.clock(), lease_id))
        if len(self.refreshes) >= self.stop_after:
            self.done.set()
        if self.fail:
            self.fail -= 1
            self.unavailable = True
            try:
                return await super().refresh_lease(lease_id)
            finally:
                self.unavailable = False
        return await super().refresh_lease(lease_id)


async def run_until(coro_task: asyncio.Task[object], event: asyncio.Event, timeout: float = 5) -> None:
    done, _ = await asyncio.wait({coro_task, asyncio.ensure_future(event.wait())}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if coro_task in done:
        coro_task.result()  # raise what keep_lease raised
    coro_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await coro_task


async def acquire(reg: MemoryRegistry, clock: FakeClock, **kw: float) -> tuple[SubnetManager, Lease]:
    m = SubnetManager(reg, PREFIX, clock=clock, sleep=clock.sleep, lease_ttl=kw.get("ttl", TTL),
                      renew_margin=kw.get("margin", MARGIN))
    return m, await m.acquire_lease(CONFIG, ME)


async def test_renews_margin_before_expiry_on_the_same_etcd_lease() -> None:
    clock = FakeClock()
    reg = RecordingRegistry(clock, stop_after=3)
    t0 = clock()
    m, lease = await acquire(reg, clock)
    await run_until(asyncio.create_task(m.keep_lease(lease)), reg.done)
    assert [t - t0 for t, _ in reg.refreshes] == [TTL - MARGIN, 2 * (TTL - MARGIN), 3 * (TTL - MARGIN)]
    assert {lid for _, lid in reg.refreshes} == {lease.etcd_lease_id}  # one etcd lease, refreshed
    assert list(reg._leases) == [lease.etcd_lease_id]  # nothing orphaned
    kv = await reg.get(SUBNETS + lease.key)
    assert kv is not None and kv.lease == lease.etcd_lease_id


@pytest.mark.parametrize("margin", [60.0, 1439 * 60.0])
async def test_renew_margin_range(margin: float) -> None:
    clock = FakeClock()
    reg = RecordingRegistry(clock, stop_after=1)
    t0 = clock()
    m, lease = await acquire(reg, clock, margin=margin)
    await run_until(asyncio.create_task(m.keep_lease(lease)), reg.done)
    assert reg.refreshes[0][0] - t0 == TTL - margin


async def test_failed_renewal_is_retried_every_minute() -> None:
    clock = FakeClock()
    reg = RecordingRegistry(clock, fail=3, stop_after=5)
    t0 = clock()
    m, lease = await acquire(reg, clock)
    await run_until(asyncio.create_task(m.keep_lease(lease)), reg.done)
    due = TTL - MARGIN
    times = [t - t0 for t, _ in reg.refreshes]
    assert times[:4] == [due, due + 60, due + 120, due + 180]  # 3 failures, then success
    assert times[4] == due + 180 + TTL - MARGIN  # back on schedule from the successful renewal


async def test_etcd_lease_expired_meanwhile_is_recreated_when_free() -> None:
    clock = FakeClock()
    reg = RecordingRegistry(clock, stop_after=10)
    m, lease = await acquire(reg, clock)
    clock.advance(TTL + 5)  # e.g. etcd unreachable past the expiry; etcd then deleted the key
    reg.expire()
    assert await reg.get(SUBNETS + lease.key) is None
    task = asyncio.create_task(m.keep_lease(lease))
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    kv = await reg.get(SUBNETS + lease.key)
    assert kv is not None and kv.lease not in (0, lease.etcd_lease_id)
    assert LeaseAttrs.from_json(kv.value) == ME


async def test_etcd_lease_expired_and_subnet_taken_is_revoked() -> None:
    clock = FakeClock()
    reg = RecordingRegistry(clock)
    m, lease = await acquire(reg, clock)
    clock.advance(TTL + 5)
    reg.expire()
    await reg.put(SUBNETS + lease.key, LeaseAttrs(IPv4Address("192.168.0.9")).to_json())
    with pytest.raises(LeaseRevokedError, match=r"192\.168\.0\.9 claimed it") as e:
        await asyncio.wait_for(m.keep_lease(lease), 5)
    assert e.value.exit_code == ExitCode.LEASE_REVOKED


async def test_deleted_key_is_noticed_at_renewal() -> None:
    clock = FakeClock()
    reg = RecordingRegistry(clock)
    m, lease = await acquire(reg, clock)
    await reg.delete(SUBNETS + lease.key)  # the etcd lease itself lives on
    with pytest.raises(LeaseRevokedError, match="was deleted"):
        await asyncio.wait_for(m.keep_lease(lease), 5)


async def test_reservation_is_never_renewed() -> None:
    clock = FakeClock()
    reg = RecordingRegistry(clock)
    await reg.put(SUBNETS + "10.5.3.0-24", ME.to_json())
    m, lease = await acquire(reg, clock)
    assert lease.is_reservation
    task = asyncio.create_task(m.keep_lease(lease))
    for _ in range(20):
        clock.advance(TTL)
        await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert reg.refreshes == []
    kv = await reg.get(SUBNETS + "10.5.3.0-24")
    assert kv is not None and kv.lease == 0


@pytest.mark.parametrize("expired_first", [False, True])
async def test_a_lease_turned_into_a_reservation_is_kept_for_good(expired_first: bool) -> None:
    # An operator pins our subnet (`etcdctl put` of our value without a lease), before or after our etcd
    # lease ran out: from then on nothing is renewed, nothing is re-created and the daemon keeps running.
    clock = FakeClock()
    reg = RecordingRegistry(clock, stop_after=1000)
    m, lease = await acquire(reg, clock)
    if expired_first:
        clock.advance(TTL + 5)
        reg.expire()
    await reg.put(SUBNETS + lease.key, ME.to_json())
    task = asyncio.create_task(m.keep_lease(lease))
    for _ in range(20):
        clock.advance(TTL)
        await asyncio.sleep(0)
    assert not task.done(), task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert len(reg.refreshes) <= 2  # the renewal that found the reservation (and the re-claim's check)
    assert m.own_lease is not None and m.own_lease.is_reservation and m.own_lease.expiration is None
    kv = await reg.get(SUBNETS + lease.key)
    assert kv is not None and kv.lease == 0 and LeaseAttrs.from_json(kv.value) == ME


async def keep_and_watch(m: SubnetManager, lease: Lease) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    """keep_lease and a consumer of watch_leases running, both past their start."""
    async def consume() -> None:
        async for _ in m.watch_leases(CONFIG, lease):
            pass

    tasks = asyncio.create_task(m.keep_lease(lease)), asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    return tasks


async def own_deleted_while_watching(reservation: bool) -> None:
    clock = FakeClock()
    reg = MemoryRegistry(clock)
    if reservation:
        await reg.put(SUBNETS + "10.5.3.0-24", ME.to_json())
    # Real sleep: keep_lease waits ~23 h unless the watch wakes it.
    m = SubnetManager(reg, PREFIX, clock=clock)
    lease = await m.acquire_lease(CONFIG, ME)
    keeper, watcher = await keep_and_watch(m, lease)
    await reg.delete(SUBNETS + lease.key)
    for task in (keeper, watcher):
        with pytest.raises(LeaseRevokedError, match="Lease has been revoked"):
            await asyncio.wait_for(task, 5)


async def test_own_lease_gone_with_its_etcd_lease_is_recreated_not_revoked() -> None:
    """A paused etcd leader can revoke a lease whose renewals it did not see: the key vanishes while our
    clock says the lease is good. The etcd lease is gone too, so the key is claimed again."""
    clock = FakeClock()
    reg = MemoryRegistry(clock)
    m = SubnetManager(reg, PREFIX, clock=clock)
    lease = await m.acquire_lease(CONFIG, ME)
    keeper, watcher = await keep_and_watch(m, lease)
    await reg.revoke_lease(lease.etcd_lease_id)  # deletes the key with the lease
    kv = None
    for _ in range(100):
        kv = await reg.get(SUBNETS + lease.key)
        if kv is not None:
            break
        await asyncio.sleep(0.02)
    assert kv is not None and kv.lease not in (0, lease.etcd_lease_id)
    assert not keeper.done() and not watcher.done()
    for task in (keeper, watcher):
        task.cancel()


async def test_own_lease_deleted_while_watching_stops_renewal_and_watch() -> None:
    await own_deleted_while_watching(reservation=False)


async def test_own_reservation_deleted_while_watching_is_revoked() -> None:
    await own_deleted_while_watching(reservation=True)
