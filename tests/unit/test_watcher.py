"""Lease-set diffing (LeaseWatcher) and the route table it feeds, table-driven."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from structlog.testing import capture_logs

from flannelpy.config import parse_config
from flannelpy.routes import RouteTable
from flannelpy.subnet.lease import Lease, LeaseAttrs
from flannelpy.subnet.manager import SubnetManager
from flannelpy.subnet.watcher import LeaseEvent, LeaseWatcher
from flannelpy.testing import MemoryRegistry

CONFIG = parse_config('{"Network":"10.5.0.0/16"}')
OWN = IPv4Network("10.5.1.0/24")


def lease(n: int, ip: str = "", rev: int = 1, plen: int = 24, net: str = "10.5") -> Lease:
    subnet = IPv4Network(f"{net}.{n}.0/{plen}")
    return Lease(subnet, LeaseAttrs(IPv4Address(ip or f"192.168.0.{n}")), revision=rev)


def add(n: int, **kw: object) -> LeaseEvent:
    return LeaseEvent.added(lease(n, **kw))  # type: ignore[arg-type]


def rm(n: int) -> LeaseEvent:
    return LeaseEvent.removed(IPv4Network(f"10.5.{n}.0/24"))


def subnets(leases: list[Lease]) -> list[int]:
    return [int(str(le.subnet).split(".")[2]) for le in leases]


UPDATE_CASES = [
    # (known before, events, added, removed)
    pytest.param([], [add(2)], [2], [], id="new lease"),
    pytest.param([2], [add(2, rev=5)], [2], [], id="renewal is announced again"),
    pytest.param([2], [rm(2)], [], [2], id="deleted"),
    pytest.param([], [rm(2)], [], [], id="unknown deletion is nothing"),
    pytest.param([], [add(1)], [], [], id="own lease is not a route"),
    pytest.param([], [rm(1)], [], [], id="own deletion is not a route"),
    pytest.param([], [add(2), rm(2)], [], [], id="added and removed in one batch"),
    pytest.param([2], [rm(2), add(2, rev=9)], [2], [], id="replaced in one batch"),
    pytest.param([2], [add(2, rev=3), rm(2)], [], [2], id="renewed then removed"),
    pytest.param([], [add(2), add(3), add(4)], [2, 3, 4], [], id="several"),
    pytest.param([2, 3], [rm(3), add(4)], [4], [3], id="mixed"),
    pytest.param([], [LeaseEvent.added(lease(2, plen=25))], [], [], id="other prefix length ignored"),
    pytest.param([], [LeaseEvent.added(lease(2, net="10.6"))], [], [], id="outside the network ignored"),
]


@pytest.mark.parametrize(("known", "events", "added", "removed"), UPDATE_CASES)
def test_update(known: list[int], events: list[LeaseEvent], added: list[int], removed: list[int]) -> None:
    w = LeaseWatcher(CONFIG, OWN)
    w.reset([lease(n) for n in known])
    a, r = w.update(events)
    assert (subnets(a), subnets(r)) == (added, removed)
    assert not set(subnets(a)) & set(subnets(r))


def test_ignored_leases_are_reported_for_logging() -> None:
    w = LeaseWatcher(CONFIG, OWN)
    w.update([LeaseEvent.added(lease(2, net="10.6")), LeaseEvent.added(lease(3, plen=25))])
    reasons = [why for _, why in w.ignored]
    assert "outside Network" in reasons[0]
    assert "/25" in reasons[1]


RESET_CASES = [
    pytest.param([], [2, 3], [2, 3], [], id="first snapshot is all added"),
    pytest.param([2, 3], [2, 3], [], [], id="unchanged"),
    pytest.param([2, 3], [3, 4], [4], [2], id="one gone one new"),
    pytest.param([2, 3], [], [], [2, 3], id="all gone"),
    pytest.param([2], [1, 2], [], [], id="own lease never listed"),
]


@pytest.mark.parametrize(("known", "snapshot", "added", "removed"), RESET_CASES)
def test_reset(known: list[int], snapshot: list[int], added: list[int], removed: list[int]) -> None:
    w = LeaseWatcher(CONFIG, OWN)
    w.reset([lease(n) for n in known])
    a, r = w.reset([lease(n) for n in snapshot])
    assert (subnets(a), subnets(r)) == (added, removed)


def test_reset_reannounces_a_lease_that_changed() -> None:
    w = LeaseWatcher(CONFIG, OWN)
    w.reset([lease(2, rev=1), lease(3, rev=1)])
    a, r = w.reset([lease(2, ip="192.168.9.9", rev=7), lease(3, rev=1)])
    assert subnets(a) == [2] and r == []
    assert a[0].attrs.public_ip == IPv4Address("192.168.9.9")


def test_route_table_follows_watcher_output() -> None:
    w = LeaseWatcher(CONFIG, OWN)
    table = RouteTable()
    table.apply(*w.reset([lease(2), lease(3)]))
    assert len(table) == 2 and table.version == 1
    table.apply(*w.update([rm(2), add(4), add(3, ip="192.168.7.7", rev=2)]))
    assert [str(le.subnet) for le in table.leases()] == ["10.5.3.0/24", "10.5.4.0/24"]
    assert table.lookup("10.5.3.77").attrs.public_ip == IPv4Address("192.168.7.7")  # type: ignore[union-attr]
    assert table.lookup("10.5.2.1") is None
    assert table.version == 2


def test_route_table_lookup_and_counter() -> None:
    table = RouteTable([lease(2), lease(3)])
    assert table.lookup(IPv4Address("10.5.2.200")) == lease(2)
    assert table.lookup("10.5.1.1") is None  # own subnet: not a route
    assert table.lookup("192.168.0.1") is None
    assert table.get(IPv4Network("10.5.3.0/24")) == lease(3)
    v = table.version
    assert table.apply([], [lease(9)]) is False and table.version == v  # nothing changed
    assert table.apply([lease(2)], []) is False  # same lease again
    assert table.apply([lease(2, rev=2)], []) is True  # a renewal counts as a change
    assert table.apply([], [lease(2)]) is True and IPv4Network("10.5.2.0/24") not in table
    assert table.lookup("10.5.2.1") is None


def test_route_table_mixed_prefix_lengths() -> None:
    table = RouteTable([lease(2), Lease(IPv4Network("10.7.0.64/26"), LeaseAttrs(IPv4Address("1.2.3.4")))])
    assert table.lookup("10.7.0.100").attrs.public_ip == IPv4Address("1.2.3.4")  # type: ignore[union-attr]
    table.apply([], [lease(2)])
    assert table.lookup("10.5.2.1") is None and len(table) == 1


# -- SubnetManager.watch_leases over the in-memory registry ---------------------------------------

SUBNETS = "/coreos.com/network/subnets/"
ME = LeaseAttrs(IPv4Address("192.168.0.1"))


async def put_lease(reg: MemoryRegistry, n: int) -> None:
    await reg.put(f"{SUBNETS}10.5.{n}.0-24", LeaseAttrs(IPv4Address(f"192.168.0.{n}")).to_json(), reg.grant(86400))


async def next_diff(it: AsyncIterator[tuple[list[Lease], list[Lease]]]) -> tuple[list[int], list[int]]:
    added, removed = await asyncio.wait_for(it.__anext__(), 5)
    return subnets(added), subnets(removed)


async def own_lease(reg: MemoryRegistry) -> tuple[SubnetManager, Lease]:
    m = SubnetManager(reg)
    return m, await m.acquire_lease(CONFIG, ME, prev_subnet=OWN)


async def watching(reg: MemoryRegistry) -> tuple[SubnetManager, AsyncIterator[tuple[list[Lease], list[Lease]]]]:
    """Our lease taken and its watch past the (empty) first snapshot."""
    m, own = await own_lease(reg)
    it = m.watch_leases(CONFIG, own)
    assert await next_diff(it) == ([], [])
    return m, it


async def test_watch_starts_with_snapshot_then_changes() -> None:
    reg = MemoryRegistry()
    await put_lease(reg, 2)
    await put_lease(reg, 3)
    m, own = await own_lease(reg)
    it = m.watch_leases(CONFIG, own)
    assert await next_diff(it) == ([2, 3], [])  # own lease 10.5.1.0 is not a route
    await put_lease(reg, 4)
    assert await next_diff(it) == ([4], [])
    await reg.delete(SUBNETS + "10.5.2.0-24")
    assert await next_diff(it) == ([], [2])
    await it.aclose()


async def test_lease_created_between_list_and_watch_is_not_missed() -> None:
    reg = MemoryRegistry()
    m, own = await own_lease(reg)
    real_list = reg.list_prefix

    async def list_then_someone_writes(prefix: str) -> tuple[list, int]:  # type: ignore[type-arg]
        result = await real_list(prefix)
        await put_lease(reg, 7)  # lands after the snapshot, before the watch starts
        reg.list_prefix = real_list  # type: ignore[method-assign]
        return result

    reg.list_prefix = list_then_someone_writes  # type: ignore[method-assign]
    it = m.watch_leases(CONFIG, own)
    assert await next_diff(it) == ([], [])
    assert await next_diff(it) == ([7], [])
    await it.aclose()


async def test_compaction_relists_and_diffs() -> None:
    reg = MemoryRegistry()
    await put_lease(reg, 2)
    await put_lease(reg, 3)
    m, own = await own_lease(reg)
    it = m.watch_leases(CONFIG, own)
    assert await next_diff(it) == ([2, 3], [])
    # Changes the watch never reports (history compacted away), then the watch is cancelled.
    watchers, reg._watchers = reg._watchers, []
    await reg.delete(SUBNETS + "10.5.2.0-24")
    await put_lease(reg, 4)
    reg._watchers = watchers
    with capture_logs() as logs:
        reg.compact()
        assert await next_diff(it) == ([4], [2])
    assert any("compacted" in e["event"] for e in logs)
    await it.aclose()


async def test_broken_watch_relists() -> None:
    reg = MemoryRegistry()
    _, it = await watching(reg)
    watchers, reg._watchers = reg._watchers, []
    await put_lease(reg, 5)
    reg._watchers = watchers
    reg.break_watches()
    assert await next_diff(it) == ([5], [])
    await it.aclose()


async def test_garbage_is_logged_once_and_ignored() -> None:
    reg = MemoryRegistry()
    await reg.put(SUBNETS + "10.5.9.0-24", b"garbage")
    with capture_logs() as logs:
        m, own = await own_lease(reg)  # allocation sees the garbage first
        it = m.watch_leases(CONFIG, own)
        assert await next_diff(it) == ([], [])
        await reg.put(SUBNETS + "nonsense", b"{}")
        await reg.put(SUBNETS + "10.6.1.0-24", b'{"PublicIP":"1.2.3.4"}')  # outside the network
        await reg.put(SUBNETS + "10.5.8.0-25", b'{"PublicIP":"1.2.3.4"}')  # other prefix length
        await put_lease(reg, 2)
        assert await next_diff(it) == ([2], [])
        reg.break_watches()  # the re-list sees the same garbage at the same revisions
        await put_lease(reg, 3)
        assert await next_diff(it) == ([3], [])
    ignored = [e["key"] for e in logs if e["event"].startswith("ignoring an entry")]
    assert sorted(ignored) == sorted(SUBNETS + k for k in ("10.5.9.0-24", "nonsense", "10.6.1.0-24", "10.5.8.0-25"))
    await it.aclose()


async def test_known_lease_overwritten_with_garbage_is_removed() -> None:
    reg = MemoryRegistry()
    await put_lease(reg, 2)
    m, own = await own_lease(reg)
    it = m.watch_leases(CONFIG, own)
    assert await next_diff(it) == ([2], [])
    await reg.put(SUBNETS + "10.5.2.0-24", b"{broken")
    assert await next_diff(it) == ([], [2])
    await it.aclose()


async def test_a_key_rewritten_with_garbage_is_logged_once_and_forgotten_when_deleted() -> None:
    # One bad writer rewriting a key: one log line (not one per write), and the memory of it goes with the key
    # (it was kept per key and revision, for ever: 50,000 bad writes held 6 MB).
    reg = MemoryRegistry()
    m, it = await watching(reg)
    with capture_logs() as logs:
        for _ in range(100):
            await reg.put(SUBNETS + "10.5.9.0-24", b"garbage")
            await reg.put(SUBNETS + "nonsense", b"{}")
        await put_lease(reg, 2)
        assert await next_diff(it) == ([2], [])
    assert len([e for e in logs if e["event"].startswith("ignoring an entry")]) == 2
    await reg.delete(SUBNETS + "10.5.9.0-24")
    await reg.delete(SUBNETS + "nonsense")
    await put_lease(reg, 3)
    assert await next_diff(it) == ([3], [])
    assert m._reported == {}
    await it.aclose()


async def test_a_huge_bad_value_is_a_short_log_line() -> None:
    # The reason quotes the value: a PublicIP of a million characters made a 1 MB warning on every host.
    reg = MemoryRegistry()
    _, it = await watching(reg)
    with capture_logs() as logs:
        await reg.put(SUBNETS + "10.5.9.0-24", json.dumps({"PublicIP": "A" * 1_000_000}).encode())
        await put_lease(reg, 2)
        assert await next_diff(it) == ([2], [])
    [line] = [e for e in logs if e["event"].startswith("ignoring an entry")]
    assert len(line["reason"]) < 300 and line["key"] == SUBNETS + "10.5.9.0-24"
    await it.aclose()
