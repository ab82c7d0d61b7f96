"""Choosing and claiming a subnet (SubnetManager.acquire_lease) and the network config in the store,
against the in-memory registry."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from structlog.testing import capture_logs

from flannelpy.config import parse_config
from flannelpy.errors import ConfigError, ExitCode, FlannelError, OutOfSubnetsError
from flannelpy.subnet.lease import LeaseAttrs
from flannelpy.subnet.manager import SubnetManager
from flannelpy.testing import FakeClock, MemoryRegistry

PREFIX = "/coreos.com/network"
SUBNETS = PREFIX + "/subnets/"
CONFIG = parse_config('{"Network":"10.5.0.0/16"}')
ME = LeaseAttrs(IPv4Address("192.168.0.1"))


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.0.{n}"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reg(clock: FakeClock) -> MemoryRegistry:
    return MemoryRegistry(clock)


def manager(reg: MemoryRegistry, clock: FakeClock, seed: int = 1, **kw: object) -> SubnetManager:
    return SubnetManager(reg, PREFIX, clock=clock, sleep=clock.sleep, rng=random.Random(seed), **kw)  # type: ignore[arg-type]


async def hold(reg: MemoryRegistry, subnet: str, who: LeaseAttrs, ttl: float | None = 86400) -> int:
    """Write a lease as another host (or an operator's reservation, ttl=None) would."""
    net = IPv4Network(subnet)
    key = f"{SUBNETS}{net.network_address}-{net.prefixlen}"
    lease_id = reg.grant(ttl) if ttl else 0
    await reg.put(key, who.to_json(), lease_id)
    return lease_id


async def test_fresh_lease_is_claimed_with_an_etcd_lease(reg: MemoryRegistry, clock: FakeClock) -> None:
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME)
    assert CONFIG.contains_subnet(lease.subnet)
    kv = await reg.get(SUBNETS + lease.key)
    assert kv is not None and kv.lease == lease.etcd_lease_id != 0
    assert json.loads(kv.value) == {"PublicIP": "192.168.0.1", "PublicIPv6": None}
    assert await reg.lease_ttl(kv.lease) == 86400
    assert lease.expiration == clock() + 86400


async def test_lease_with_our_public_ip_is_reused_on_the_same_etcd_lease(reg: MemoryRegistry,
                                                                       clock: FakeClock) -> None:
    lease_id = await hold(reg, "10.5.77.0/24", ME)
    clock.advance(5000)
    me_vxlan = LeaseAttrs(ME.public_ip, backend_type="vxlan", backend_data={"VNI": 1, "VtepMAC": "aa:bb"})
    with capture_logs() as logs:
        lease = await manager(reg, clock).acquire_lease(CONFIG, me_vxlan, prev_subnet=IPv4Network("10.5.9.0/24"))
    assert lease.subnet == IPv4Network("10.5.77.0/24")
    assert lease.etcd_lease_id == lease_id
    assert await reg.lease_ttl(lease_id) == 86400  # fresh TTL
    kv = await reg.get(SUBNETS + "10.5.77.0-24")
    assert kv is not None and kv.lease == lease_id
    assert json.loads(kv.value)["BackendType"] == "vxlan"  # value rewritten
    assert any(e["event"].startswith("Found lease for current IP, reusing") for e in logs)


async def test_reservation_is_reused_and_stays_permanent(reg: MemoryRegistry, clock: FakeClock) -> None:
    await hold(reg, "10.5.42.0/24", ME, ttl=None)
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME)
    assert lease.subnet == IPv4Network("10.5.42.0/24")
    assert lease.is_reservation and lease.expiration is None
    kv = await reg.get(SUBNETS + "10.5.42.0-24")
    assert kv is not None and kv.lease == 0  # never converted into a 24 h lease


async def test_a_dual_stack_reservation_of_ours_is_reused_under_its_own_key(reg: MemoryRegistry,
                                                                         clock: FakeClock) -> None:
    # An operator's reservation is not ours to delete: renewal-free, it stays under its key.
    key = SUBNETS + "10.5.85.0-24&fd00:6:0:2f::-64"
    await reg.put(key, ME.to_json())
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME)
    assert SUBNETS + lease.key == key and str(lease.ipv6_subnet) == "fd00:6:0:2f::/64"
    assert [kv.key for kv in (await reg.list_prefix(SUBNETS))[0]] == [key]  # no second key for the subnet


async def test_a_dual_stack_lease_of_ours_becomes_an_ipv4_only_one_of_the_same_subnet(reg: MemoryRegistry,
                                                                                       clock: FakeClock) -> None:
    # Left by a dual-stack flanneld on this host. Under that key flannelpy's value (no BackendV6Data) makes
    # dual-stack flanneld peers skip the lease, and IPv4-only vxlan ones crash on it: flanneld itself deletes
    # such a lease when its config has no IPv6. The IPv4 subnet is kept.
    await reg.put(SUBNETS + "10.5.85.0-24&fd00:6:0:2f::-64", ME.to_json(), reg.grant(86400))
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME)
    assert lease.subnet == IPv4Network("10.5.85.0/24") and lease.ipv6_subnet is None
    assert [kv.key for kv in (await reg.list_prefix(SUBNETS))[0]] == [SUBNETS + "10.5.85.0-24"]


async def test_a_lease_of_another_size_takes_every_subnet_it_overlaps(reg: MemoryRegistry,
                                                                      clock: FakeClock) -> None:
    # SubnetLen went from 24 to 25 while an older host keeps renewing its /24: neither half is free (as in
    # flanneld), from the random choice or from the subnet file.
    other = LeaseAttrs(IPv4Address("10.99.0.77"))
    narrow = parse_config('{"Network":"10.5.0.0/16","SubnetLen":25,"SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0"}')
    await hold(reg, "10.5.1.0/24", other)
    lease = await manager(reg, clock).acquire_lease(narrow, ME, prev_subnet=IPv4Network("10.5.1.128/25"))
    assert lease.subnet == IPv4Network("10.5.2.0/25")
    third = LeaseAttrs(IPv4Address("10.99.0.78"))
    with pytest.raises(OutOfSubnetsError):
        await manager(reg, clock).acquire_lease(narrow, third)


async def test_our_lease_that_does_not_fit_is_deleted(reg: MemoryRegistry, clock: FakeClock) -> None:
    narrow = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.100.0","SubnetMax":"10.5.110.0"}')
    await hold(reg, "10.5.7.0/24", ME)
    lease = await manager(reg, clock).acquire_lease(narrow, ME)
    assert narrow.contains_subnet(lease.subnet)
    assert await reg.get(SUBNETS + "10.5.7.0-24") is None


async def test_prev_subnet_is_taken_when_free(reg: MemoryRegistry, clock: FakeClock) -> None:
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME, prev_subnet=IPv4Network("10.5.200.0/24"))
    assert lease.subnet == IPv4Network("10.5.200.0/24")


async def test_prev_subnet_held_by_another_host_is_not_taken(reg: MemoryRegistry, clock: FakeClock) -> None:
    await hold(reg, "10.5.200.0/24", attrs(2))
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME, prev_subnet=IPv4Network("10.5.200.0/24"))
    assert lease.subnet != IPv4Network("10.5.200.0/24")
    kv = await reg.get(SUBNETS + "10.5.200.0-24")
    assert kv is not None and LeaseAttrs.from_json(kv.value) == attrs(2)


async def test_prev_subnet_outside_config_is_ignored(reg: MemoryRegistry, clock: FakeClock) -> None:
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME, prev_subnet=IPv4Network("10.9.3.0/24"))
    assert CONFIG.contains_subnet(lease.subnet)


async def test_random_choice_among_first_100_free(reg: MemoryRegistry, clock: FakeClock) -> None:
    for n in range(1, 21):  # 10.5.1.0 .. 10.5.20.0 taken
        await hold(reg, f"10.5.{n}.0/24", attrs(100 + n))
    chosen = set()
    for seed in range(30):
        r = MemoryRegistry(clock)
        for kv in (await reg.list_prefix(SUBNETS))[0]:
            await r.put(kv.key, kv.value)
        lease = await manager(r, clock, seed=seed).acquire_lease(CONFIG, ME)
        third = int(str(lease.subnet.network_address).split(".")[2])
        assert 21 <= third <= 120, lease.subnet  # the first 100 free ones
        chosen.add(third)
    assert len(chosen) > 5  # spread out, so hosts starting together rarely collide


async def test_out_of_subnets(reg: MemoryRegistry, clock: FakeClock) -> None:
    small = parse_config('{"Network":"10.5.0.0/24","SubnetLen":26}')
    for n, sub in enumerate(["10.5.0.64/26", "10.5.0.128/26", "10.5.0.192/26"]):
        await hold(reg, sub, attrs(10 + n))
    with pytest.raises(OutOfSubnetsError) as e:
        await manager(reg, clock).acquire_lease(small, ME)
    msg = str(e.value)
    assert "out of subnets: all 3 subnets of 10.5.0.0/24 between 10.5.0.64 and 10.5.0.192 are leased" in msg
    assert "flannelpy leases" in msg
    assert e.value.exit_code == ExitCode.OUT_OF_SUBNETS


async def test_lost_race_retries_with_another_subnet(reg: MemoryRegistry, clock: FakeClock) -> None:
    stolen: list[str] = []

    def other_host_wins(key: str) -> None:
        if not stolen:
            stolen.append(key)
            reg._put(key, attrs(2).to_json(), 0)

    reg.before_create = other_host_wins
    lease = await manager(reg, clock).acquire_lease(CONFIG, ME)
    assert stolen and SUBNETS + lease.key != stolen[0]
    kv = await reg.get(stolen[0])
    assert kv is not None and LeaseAttrs.from_json(kv.value) == attrs(2)  # the winner keeps it
    # The etcd lease granted for the lost claim was revoked: only ours is left.
    assert list(reg._leases) == [lease.etcd_lease_id]


async def test_losing_every_race_gives_up_after_a_bound(reg: MemoryRegistry, clock: FakeClock) -> None:
    reg.before_create = lambda key: reg._put(key, attrs(2).to_json(), 0)
    with pytest.raises(FlannelError, match="could not claim a subnet in 12 attempts"):
        await manager(reg, clock, claim_attempts=12).acquire_lease(CONFIG, ME)
    assert reg.calls.count("create") == 12


async def test_garbage_under_subnets_does_not_stop_allocation(reg: MemoryRegistry, clock: FakeClock) -> None:
    await reg.put(SUBNETS + "10.5.1.0-24", b"{not json")
    await reg.put(SUBNETS + "hello", b"world")
    await reg.put(SUBNETS + "10.5.2.0-24", b'{"PublicIP":"not-an-ip"}')
    await reg.put(SUBNETS + "10.5.3.0-24", b"[" * 100_000)  # deeper than the JSON parser's recursion limit
    await reg.put(SUBNETS + "10.5.4.0-24", b'{"PublicIP":true}')  # not 0.0.0.1, as ipaddress would read it
    await reg.put(SUBNETS + "10.5.5.0-24", b'{"PublicIP":"10.99.0.5","PublicIPv6":1}')
    with capture_logs() as logs:
        lease = await manager(reg, clock).acquire_lease(CONFIG, ME, prev_subnet=IPv4Network("10.5.1.0/24"))
    garbage = {SUBNETS + f"10.5.{i}.0-24" for i in range(1, 6)}
    assert SUBNETS + lease.key not in garbage  # keys occupied
    ignored = [e for e in logs if e["event"].startswith("ignoring an entry")]
    assert {e["key"] for e in ignored} == garbage | {SUBNETS + "hello"}


async def test_etcd_outage_during_acquire_is_waited_out(reg: MemoryRegistry, clock: FakeClock) -> None:
    reg.unavailable = True
    orig = clock.sleep

    async def sleep(s: float) -> None:
        if len(clock.sleeps) >= 3:
            reg.unavailable = False
        await orig(s)

    m = SubnetManager(reg, PREFIX, clock=clock, sleep=sleep)
    lease = await m.acquire_lease(CONFIG, ME)
    assert CONFIG.contains_subnet(lease.subnet)


async def test_ipv6_only_config_is_refused(reg: MemoryRegistry, clock: FakeClock) -> None:
    v6 = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56"}')
    with pytest.raises(ConfigError, match="EnableIPv4"):
        await manager(reg, clock).acquire_lease(v6, ME)


# -- network config in the store -------------------------------------------------------------------


async def test_missing_config_is_waited_for_with_a_v3_hint(reg: MemoryRegistry, clock: FakeClock) -> None:
    orig = clock.sleep

    async def sleep(s: float) -> None:
        if len(clock.sleeps) == 24:
            await reg.put(PREFIX + "/config", b'{"Network":"10.5.0.0/16"}')
        await orig(s)

    m = SubnetManager(reg, PREFIX, clock=clock, sleep=sleep)
    with capture_logs() as logs:
        config = await m.get_network_config()
    assert config.network == IPv4Network("10.5.0.0/16")
    assert set(clock.sleeps) == {1.0}  # retried every second
    missing = [e for e in logs if e["event"].startswith("flannel config not found in etcd store")]
    assert len(missing) == 3  # once per ~10 s over 25 s, not 25 times
    hint = missing[0]["fix"] + missing[0]["note"]
    assert "ETCDCTL_API=3 etcdctl put /coreos.com/network/config '{" in hint
    assert "flannelpy config set" in hint
    assert "etcdctl set" in hint and "v2" in hint


async def test_missing_config_hint_names_a_custom_prefix(reg: MemoryRegistry, clock: FakeClock) -> None:
    m = SubnetManager(reg, "/flannel_use/network/", clock=clock, sleep=clock.sleep)
    assert m.config_key == "/flannel_use/network/config"
    assert "etcdctl put /flannel_use/network/config" in m._config_hint()
    assert "flannelpy config set --etcd-prefix=/flannel_use/network" in m._config_hint()


async def test_invalid_config_in_store_is_a_config_error(reg: MemoryRegistry, clock: FakeClock) -> None:
    await reg.put(PREFIX + "/config", b'{"Network":"10.5.0.0/30"}')
    with pytest.raises(ConfigError, match=r"network is too small.*/coreos.com/network/config"):
        await manager(reg, clock).get_network_config()


async def test_set_config_validates_before_writing(reg: MemoryRegistry, clock: FakeClock) -> None:
    m = manager(reg, clock)
    with pytest.raises(ConfigError, match="SubnetLen"):
        await m.set_config('{"Network":"10.5.0.0/16","SubnetLen":40}')
    assert await m.get_config_text() is None
    await m.set_config('{"Network":"10.10.0.0/16"}\n')
    assert await m.get_config_text() == '{"Network":"10.10.0.0/16"}'
    assert (await m.get_network_config()).network == IPv4Network("10.10.0.0/16")


def test_bad_renew_margin_is_refused(reg: MemoryRegistry) -> None:
    with pytest.raises(ConfigError, match="renew margin"):
        SubnetManager(reg, lease_ttl=3600, renew_margin=3600)
