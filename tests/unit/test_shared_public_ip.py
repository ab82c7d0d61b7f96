"""Leases sharing a PublicIP: exactly one is routed, the same on every host (the oldest key), the others are
reported once and take over when it goes; a daemon with that PublicIP reuses the routed one."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from structlog.testing import capture_logs

from flannelpy.config import parse_config
from flannelpy.subnet.lease import Lease, LeaseAttrs
from flannelpy.subnet.manager import SubnetManager
from flannelpy.subnet.watcher import LeaseEvent, LeaseWatcher, lease_for_public_ip
from flannelpy.testing import MemoryRegistry

CONFIG = parse_config('{"Network":"10.5.0.0/16"}')
SHARED = "192.168.0.50"


def lease(n: int, ip: str = "", created: int = 0, rev: int = 1) -> Lease:
    return Lease(IPv4Network(f"10.5.{n}.0/24"), LeaseAttrs(IPv4Address(ip or f"192.168.0.{n}")), revision=rev,
                 created=created)


def subnets(leases: list[Lease]) -> list[int]:
    return [int(str(le.subnet).split(".")[2]) for le in leases]


def watcher(own: int = 1, own_ip: str = "192.168.0.1") -> LeaseWatcher:
    return LeaseWatcher(CONFIG, IPv4Network(f"10.5.{own}.0/24"), IPv4Address(own_ip))


@pytest.mark.parametrize(("created", "chosen"), [
    pytest.param({2: 10, 3: 20, 4: 30}, 2, id="the oldest key"),
    pytest.param({2: 30, 3: 20, 4: 10}, 4, id="whatever its subnet"),
    pytest.param({2: 10, 3: 10}, 2, id="a tie goes to the lower subnet"),
])
def test_rule_is_the_oldest_key(created: dict[int, int], chosen: int) -> None:
    leases = [lease(n, SHARED, c) for n, c in created.items()]
    assert subnets([lease_for_public_ip(leases)]) == [chosen]
    assert lease_for_public_ip(reversed(leases)) == lease_for_public_ip(leases)  # order of listing is irrelevant


def test_every_host_routes_the_same_one_whatever_it_saw_first() -> None:
    old, new = lease(3, SHARED, created=10), lease(7, SHARED, created=40)
    listed = watcher()
    added, _ = listed.reset([new, old, lease(2)])
    assert subnets(added) == [2, 3]
    watched = watcher()
    watched.reset([lease(2)])
    a1, r1 = watched.update([LeaseEvent.added(old)])
    a2, r2 = watched.update([LeaseEvent.added(new)])
    assert (subnets(a1), r1, a2, r2) == ([3], [], [], [])
    assert listed.leases == watched.leases
    assert [(subnets([x]), subnets([u] if u else [])) for x, u in watched.duplicates] == [([7], [3])]


def test_an_older_lease_appearing_takes_the_route_from_a_newer_one() -> None:
    # A key re-created keeps nothing of its past: what counts is the create revision etcd reports.
    w = watcher()
    w.reset([lease(7, SHARED, created=40)])
    added, removed = w.update([LeaseEvent.added(lease(3, SHARED, created=10))])
    assert (subnets(added), subnets(removed)) == ([3], [7])


def test_the_next_one_takes_over_when_the_routed_one_goes() -> None:
    w = watcher()
    w.reset([lease(3, SHARED, created=10), lease(7, SHARED, created=40), lease(9, SHARED, created=50)])
    assert subnets(list(w.leases.values())) == [3]
    added, removed = w.update([LeaseEvent.removed(IPv4Network("10.5.3.0/24"))])
    assert (subnets(added), subnets(removed)) == ([7], [3])
    added, removed = w.update([LeaseEvent.removed(IPv4Network("10.5.7.0/24"))])
    assert (subnets(added), subnets(removed)) == ([9], [7])


def test_a_lease_moving_to_another_public_ip_frees_the_route_for_the_next() -> None:
    w = watcher()
    w.reset([lease(3, SHARED, created=10), lease(7, SHARED, created=40)])
    added, removed = w.update([LeaseEvent.added(lease(3, "192.168.0.3", created=10, rev=2))])
    assert (subnets(added), subnets(removed)) == ([3, 7], [])
    assert {le.subnet: str(le.attrs.public_ip) for le in added}[IPv4Network("10.5.7.0/24")] == SHARED


def test_renewals_of_either_change_nothing_and_are_not_reported_again() -> None:
    w = watcher()
    w.reset([lease(3, SHARED, created=10), lease(7, SHARED, created=40)])
    assert len(w.duplicates) == 1
    w.duplicates.clear()
    added, removed = w.update([LeaseEvent.added(lease(7, SHARED, created=40, rev=5))])
    assert (added, removed, w.duplicates) == ([], [], [])
    added, removed = w.update([LeaseEvent.added(lease(3, SHARED, created=10, rev=6))])
    assert (subnets(added), removed, w.duplicates) == ([3], [], [])  # a renewal is announced again
    w.reset([lease(3, SHARED, created=10), lease(7, SHARED, created=40)])  # a resync after a reconnect
    assert w.duplicates == []


def test_leases_with_our_own_public_ip_are_never_routed() -> None:
    w = watcher(own=1, own_ip=SHARED)
    added, _ = w.reset([lease(3, SHARED, created=1), lease(2)])
    assert subnets(added) == [2]
    assert [(subnets([x]), u) for x, u in w.duplicates] == [([3], None)]
    added, removed = w.update([LeaseEvent.added(lease(4, SHARED, created=99))])
    assert (added, removed) == ([], [])


def test_one_batch_swapping_the_routed_lease() -> None:
    w = watcher()
    w.reset([lease(3, SHARED, created=10)])
    added, removed = w.update([LeaseEvent.added(lease(7, SHARED, created=40)),
                               LeaseEvent.removed(IPv4Network("10.5.3.0/24"))])
    assert (subnets(added), subnets(removed)) == ([7], [3])


# -- through etcd (the in-memory registry): create revisions, the log, the daemon's own reuse ----------

SUBNETS = "/coreos.com/network/subnets/"


async def test_a_second_lease_of_a_peer_is_logged_once_and_never_routed() -> None:
    reg = MemoryRegistry()
    peer = LeaseAttrs(IPv4Address(SHARED)).to_json()
    await reg.put(f"{SUBNETS}10.5.3.0-24", peer)
    mgr = SubnetManager(reg)
    me = await mgr.acquire_lease(CONFIG, LeaseAttrs(IPv4Address("192.168.0.1")))
    with capture_logs() as logs:
        stream = mgr.watch_leases(CONFIG, me)
        added, _ = await anext(stream)
        assert subnets(added) == [3]
        await reg.put(f"{SUBNETS}10.5.200.0-24", peer)  # the impostor, newer
        await reg.put(f"{SUBNETS}10.5.201.0-24", LeaseAttrs(IPv4Address("192.168.0.9")).to_json())
        added, removed = await anext(stream)
        assert (subnets(added), removed) == ([201], [])
        await reg.put(f"{SUBNETS}10.5.200.0-24", peer)  # rewritten: still ignored, not logged again
        await reg.delete(f"{SUBNETS}10.5.3.0-24")  # the real one goes: the other one is used now
        added, removed = await anext(stream)
        assert (subnets(added), subnets(removed)) == ([200], [3])
        await stream.aclose()  # type: ignore[attr-defined]
    ignored = [e for e in logs if e["event"] == "lease ignored: another lease has the same public IP"]
    assert [(e["subnet"], e["used"]) for e in ignored] == [("10.5.200.0/24", "10.5.3.0/24")]


async def test_a_daemon_reuses_the_lease_the_others_route() -> None:
    reg = MemoryRegistry()
    mine = LeaseAttrs(IPv4Address(SHARED)).to_json()
    await reg.put(f"{SUBNETS}10.5.9.0-24", mine, reg.grant(86400))  # oldest
    await reg.put(f"{SUBNETS}10.5.4.0-24", mine, reg.grant(86400))
    got = await SubnetManager(reg).acquire_lease(CONFIG, LeaseAttrs(IPv4Address(SHARED)),
                                                 prev_subnet=IPv4Network("10.5.4.0/24"))
    assert got.subnet == IPv4Network("10.5.9.0/24")
    others = LeaseWatcher(CONFIG, IPv4Network("10.5.1.0/24"), IPv4Address("192.168.0.1"))
    kvs, _ = await reg.list_prefix(SUBNETS)
    others.reset([Lease.from_kv(kv.key, kv.value, created=kv.create_revision) for kv in kvs])
    assert list(others.leases) == [got.subnet]
