"""Subnet leases as flanneld keeps them in etcd: read the config, choose and claim a subnet, renew it,
watch every lease of the network.

Differences from flanneld (each fixes a bug listed in the compat notes): a lost claim race is retried
with another subnet; renewal refreshes the same etcd lease instead of orphaning it; reservations stay
permanent; the watch starts at the revision of the snapshot it follows, so no lease is missed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import NoReturn

import structlog

from flannelpy.config import NetworkConfig, parse_config
from flannelpy.errors import ConfigError, FlannelError, LeaseRevokedError, OutOfSubnetsError
from flannelpy.ip import parse_subnet_key
from flannelpy.subnet.lease import Lease, LeaseAttrs
from flannelpy.subnet.registry import (
    CompactedError,
    EventType,
    HistoryRewoundError,
    KeyValue,
    LeaseNotFoundError,
    Registry,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
    WatchEvent,
)
from flannelpy.subnet.watcher import LeaseEvent, LeaseWatcher

log = structlog.get_logger()

REASON_MAX = 200  # characters of a bad entry's key or reason in a log line

DEFAULT_PREFIX = "/coreos.com/network"
EXAMPLE_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'
RENEW_RETRY = 60.0  # flanneld retries a failed renewal every minute
CONFIG_RETRY = 1.0
CONFIG_LOG_EVERY = 10.0
CANDIDATES = 100  # a random one of the first 100 free subnets, as flanneld
MAX_WAIT_STEP = 600.0  # re-check the clock at least this often (suspend, clock jumps)


class SubnetManager:
    def __init__(self, registry: Registry, prefix: str = DEFAULT_PREFIX, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 lease_ttl: float = 86400, renew_margin: float = 3600.0,
                 rng: random.Random | None = None, claim_attempts: int = 16,
                 renew_retry: float = RENEW_RETRY) -> None:
        prefix = "/" + prefix.strip().strip("/")
        if prefix == "/":
            raise ConfigError("--etcd-prefix must not be empty or '/'; the default is /coreos.com/network")
        if not 0 < renew_margin < lease_ttl:
            raise ConfigError(f"lease renew margin {renew_margin:g}s must be above 0 and below the lease "
                              f"TTL {lease_ttl:g}s")
        self.registry = registry
        self.prefix = prefix
        self.config_key = f"{prefix}/config"
        self.subnets_prefix = f"{prefix}/subnets/"
        self._clock = clock
        self._sleep = sleep
        self.lease_ttl = lease_ttl
        self.renew_margin = renew_margin
        self._rng = rng or random.Random()
        self.claim_attempts = claim_attempts
        self.renew_retry = renew_retry
        self._own: Lease | None = None
        self._revoked: str | None = None  # why our lease is gone, once it is
        self._renew_now = False
        self._wake = asyncio.Event()  # wakes keep_lease: revoked, or renew at once
        self._revoked_evt = asyncio.Event()  # ends watch_leases at once
        self._reported: dict[str, str] = {}  # key -> why it was last logged as unusable (keys in etcd only)

    # -- network config ------------------------------------------------------------------------

    def _config_hint(self) -> str:
        flag = "" if self.prefix == DEFAULT_PREFIX else f" --etcd-prefix={self.prefix}"
        # The etcd this daemon uses, so that the commands work as given (flags after the arguments: both
        # etcdctl and flannelpy take them there).
        ours, etcdctl = (getattr(self.registry, "hint_flags", ""), getattr(self.registry, "etcdctl_flags", ""))
        return (f"write it with the etcd v3 API: ETCDCTL_API=3 etcdctl put {self.config_key} "
                f"'{EXAMPLE_CONFIG}'{' ' + etcdctl if etcdctl else ''} or flannelpy config set{flag} "
                f"'{EXAMPLE_CONFIG}'{' ' + ours if ours else ''}")

    async def get_network_config(self) -> NetworkConfig:
        """Read <prefix>/config, waiting (retry every second) until it exists."""
        last_log = -float("inf")
        while True:
            try:
                kv = await self.registry.get(self.config_key)
            except RegistryUnavailableError as e:
                if self._clock() - last_log >= CONFIG_LOG_EVERY:
                    last_log = self._clock()
                    log.warning("etcd unreachable while reading the network config; retrying", error=str(e))
                await self._sleep(CONFIG_RETRY)
                continue
            if kv is not None:
                return self._parse_config(kv.value)
            if self._clock() - last_log >= CONFIG_LOG_EVERY:
                last_log = self._clock()
                log.warning(
                    "flannel config not found in etcd store. Did you create your config using etcdv3 API?",
                    key=self.config_key, fix=self._config_hint(),
                    note="`etcdctl set` (the v2 API, as in the seed tutorial) writes where v3 readers "
                         "such as flanneld and flannelpy never look")
            await self._sleep(CONFIG_RETRY)

    def _parse_config(self, value: bytes | str) -> NetworkConfig:
        try:
            config = parse_config(value)
        except ConfigError as e:
            raise ConfigError(f"{e} (network config at {self.config_key}; fix it with "
                              f"flannelpy config set)") from None
        if config.unknown_keys:
            log.warning("network config has keys flannel does not know; ignoring them",
                        keys=",".join(config.unknown_keys))
        return config

    async def set_config(self, text: str) -> NetworkConfig:
        """Validate and write the network config (what `flannelpy config set` does): what parses but would
        stop every daemon at start is refused too."""
        config = parse_config(text)
        if config.network is None:
            raise ConfigError("config key EnableIPv4=false: flannelpy leases and routes IPv4 subnets; IPv6-only "
                              "networks are not supported (set EnableIPv4 true with a Network)")
        await self.registry.put(self.config_key, text.strip().encode())
        log.info("network config written", key=self.config_key, network=str(config.network),
                 backend=config.backend_type)
        return config

    async def get_config_text(self) -> str | None:
        """The config exactly as stored, or None when there is none."""
        kv = await self.registry.get(self.config_key)
        return None if kv is None else kv.value.decode("utf-8", errors="replace")

    # -- parsing -------------------------------------------------------------------------------

    def _report_once(self, key: str, revision: int, why: str) -> None:
        # Once per key and reason: a writer that keeps rewriting a bad entry is not a log line per write, and
        # what is remembered goes with the key (deleted, or gone from a fresh listing), so it cannot pile up.
        if len(why) > REASON_MAX:  # the reason quotes the value: a 1 MB value is not a 1 MB log line
            why = why[:REASON_MAX] + "..."
        if self._reported.get(key) == why:
            return
        self._reported[key] = why
        shown = key if len(key) <= REASON_MAX else key[:REASON_MAX] + "..."
        log.warning("ignoring an entry under subnets/ that is not a usable lease", key=shown,
                    revision=revision, reason=why)

    def _parse(self, kv: KeyValue) -> Lease | None:
        try:
            return Lease.from_kv(kv.key, kv.value, etcd_lease_id=kv.lease, revision=kv.mod_revision,
                                 created=kv.create_revision)
        except ValueError as e:
            self._report_once(kv.key, kv.mod_revision, str(e))
            return None

    def _drain_ignored(self, watcher: LeaseWatcher) -> None:
        for lease, why in watcher.ignored:
            self._report_once(self.subnets_prefix + lease.key, lease.revision, why)
        watcher.ignored.clear()
        for lease, used in watcher.duplicates:
            if used is None:
                log.warning("lease ignored: it announces this host's own public IP", subnet=str(lease.subnet),
                            public_ip=str(lease.attrs.public_ip), key=self.subnets_prefix + lease.key,
                            fix="delete the stale lease key")
            else:
                log.warning("lease ignored: another lease has the same public IP", subnet=str(lease.subnet),
                            public_ip=str(lease.attrs.public_ip), used=str(used.subnet),
                            key=self.subnets_prefix + lease.key,
                            note="of leases sharing a PublicIP every host routes only the oldest",
                            fix="delete the stale lease key")
        watcher.duplicates.clear()

    @staticmethod
    def _subnet_of(key: str) -> IPv4Network | None:
        try:
            return parse_subnet_key(key)[0]
        except ValueError:
            return None

    # -- acquire -------------------------------------------------------------------------------

    async def _list(self) -> tuple[list[KeyValue], int]:
        """List the subnets prefix, waiting out an etcd outage."""
        delay = 1.0
        while True:
            try:
                return await self.registry.list_prefix(self.subnets_prefix)
            except RegistryUnavailableError as e:
                log.warning("etcd unreachable while listing leases; retrying", error=str(e),
                            retry_in=delay)
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)

    def _free_subnets(self, config: NetworkConfig, taken: set[IPv4Network]) -> Iterator[IPv4Network]:
        assert config.subnet_min is not None
        step = 1 << (32 - config.subnet_len)
        start = int(config.subnet_min)
        # A lease of another size (SubnetLen changed while older hosts keep theirs) takes every subnet it
        # overlaps, as in flanneld: each candidate is checked against the taken ranges.
        ranges = sorted((int(t.network_address), int(t.broadcast_address)) for t in taken)
        firsts = [first for first, _ in ranges]
        reach = list(itertools.accumulate((last for _, last in ranges), max))  # furthest end so far
        for i in range(config.subnet_count()):
            lo = start + i * step
            j = bisect.bisect_right(firsts, lo + step - 1)  # the ranges that start at or before our end
            if j and reach[j - 1] >= lo:
                continue
            yield IPv4Network((lo, config.subnet_len))

    def _out_of_subnets(self, config: NetworkConfig) -> OutOfSubnetsError:
        return OutOfSubnetsError(
            f"out of subnets: all {config.subnet_count()} subnets of {config.network} between "
            f"{config.subnet_min} and {config.subnet_max} are leased; free stale ones (list them with "
            f"`flannelpy leases`, delete with `ETCDCTL_API=3 etcdctl del {self.subnets_prefix}<subnet-key>`), "
            "wait for them to expire, or widen Network/SubnetMin/SubnetMax/SubnetLen in the network config")

    async def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs,
                            prev_subnet: IPv4Network | None = None) -> Lease:
        """Reuse the lease of our PublicIP, else prev_subnet, else a random free subnet; claim it atomically."""
        if config.network is None:
            raise ConfigError("config key EnableIPv4=false: flannelpy leases IPv4 subnets; IPv6-only "
                              "networks are not supported")
        if config.enable_ipv6:
            log.warning("IPv6 subnets are not leased by flannelpy yet; leasing IPv4 only (the subnet file gets "
                        "no FLANNEL_IPV6_* lines unless a dual-stack reservation of this host is reused)",
                        ipv6_network=str(config.ipv6_network))
        if prev_subnet is not None and not config.contains_subnet(prev_subnet):
            log.info("subnet from the subnet file does not fit the network config; ignoring it",
                     subnet=str(prev_subnet))
            prev_subnet = None
        value = attrs.to_json()
        lost = 0
        attempts = 0
        while attempts < self.claim_attempts:
            attempts += 1
            try:
                lease = await self._try_acquire(config, attrs, value, prev_subnet)
            except RegistryUnavailableError as e:
                attempts -= 1  # an outage is not a lost race; wait it out
                log.warning("etcd unreachable while acquiring a lease; retrying", error=str(e))
                await self._sleep(CONFIG_RETRY)
                continue
            if isinstance(lease, Lease):
                self._own = lease
                # A new lease after a revocation (a Node started again): the old one's signals must not
                # end the new watch and renewal at once.
                self._revoked = None
                self._revoked_evt.clear()
                self._wake.clear()
                self._renew_now = False
                return lease
            if lease == "lost":
                lost += 1
                prev_subnet = None
            elif lease == "gone":
                continue
        raise FlannelError(f"could not claim a subnet in {self.claim_attempts} attempts ({lost} lost races "
                           "to other hosts claiming the same subnet); start again")

    async def _try_acquire(self, config: NetworkConfig, attrs: LeaseAttrs, value: bytes,
                           prev_subnet: IPv4Network | None) -> Lease | str:
        kvs, _ = await self.registry.list_prefix(self.subnets_prefix)
        taken: set[IPv4Network] = set()
        leases: list[Lease] = []
        for kv in kvs:
            subnet = self._subnet_of(kv.key)
            if subnet is not None:
                taken.add(subnet)  # even a garbage value occupies the key
            lease = self._parse(kv)
            if lease is not None:
                leases.append(lease)

        # 1. A lease that already carries our PublicIP. Of several, the one every other host routes
        # (lease_for_public_ip, the oldest of those that fit); the others stay ignored everywhere.
        mine = [le for le in leases if le.attrs.public_ip == attrs.public_ip]
        mine.sort(key=lambda le: (config.contains_subnet(le.subnet), le.created, le.subnet))
        for lease in mine:
            if not config.contains_subnet(lease.subnet):
                if lease.is_reservation:
                    log.warning("reservation for current IP does not fit the network config; leaving it",
                                subnet=str(lease.subnet), public_ip=str(attrs.public_ip))
                    continue
                log.info("Found lease for current IP but it does not fit the network config, deleting",
                         subnet=str(lease.subnet), public_ip=str(attrs.public_ip))
                await self.registry.delete(self.subnets_prefix + lease.key)
                taken.discard(lease.subnet)
                continue
            if lease.ipv6_subnet is not None and not lease.is_reservation:
                # A dual-stack lease of flanneld's: flannelpy leases no IPv6, and under that key a value without
                # BackendV6Data makes dual-stack flanneld peers skip the lease (and IPv4-only vxlan ones panic).
                # Like flanneld with an IPv6-incompatible config: delete it; the same IPv4 subnet is claimed
                # again under an IPv4-only key.
                log.info("Found dual-stack lease for current IP; replacing it with an IPv4-only one",
                         key=self.subnets_prefix + lease.key, public_ip=str(attrs.public_ip))
                await self.registry.delete(self.subnets_prefix + lease.key)
                taken.discard(lease.subnet)
                prev_subnet = prev_subnet or lease.subnet
                continue
            key = self.subnets_prefix + lease.key
            if lease.is_reservation:
                if lease.attrs != attrs:
                    await self.registry.put(key, value)  # still no etcd lease: stays permanent
                log.info("Found reservation for current IP, reusing (permanent, never renewed)",
                         subnet=str(lease.subnet), public_ip=str(attrs.public_ip))
                return Lease(lease.subnet, attrs, lease.ipv6_subnet, None, 0, lease.revision)
            ttl = await self.registry.refresh_lease(lease.etcd_lease_id)
            if ttl is None:
                return "gone"  # expired just now; the key is gone too, list again
            try:
                rev = await self.registry.put(key, value, lease.etcd_lease_id)
            except LeaseNotFoundError:
                return "gone"
            log.info("Found lease for current IP, reusing", subnet=str(lease.subnet),
                     public_ip=str(attrs.public_ip), etcd_lease=f"{lease.etcd_lease_id:x}")
            return Lease(lease.subnet, attrs, None, self._clock() + ttl, lease.etcd_lease_id, rev)

        # 2. The subnet we had before (subnet file), 3. a random one of the first free ones.
        if prev_subnet is not None and not any(prev_subnet.overlaps(t) for t in taken):
            subnet = prev_subnet
            how = "subnet file"
        else:
            candidates = []
            for candidate in self._free_subnets(config, taken):
                candidates.append(candidate)
                if len(candidates) >= CANDIDATES:
                    break
            if not candidates:
                raise self._out_of_subnets(config)
            subnet = self._rng.choice(candidates)
            how = "free"
        key = self.subnets_prefix + Lease(subnet, attrs).key
        claim = await self.registry.create_with_lease(key, value, self.lease_ttl)
        if claim is None:
            log.info("another host claimed the subnet first; trying another", subnet=str(subnet))
            return "lost"
        log.info("Allocated lease", subnet=str(subnet), public_ip=str(attrs.public_ip), source=how,
                 etcd_lease=f"{claim.lease_id:x}", ttl=claim.ttl)
        return Lease(subnet, attrs, None, self._clock() + claim.ttl, claim.lease_id, claim.revision)

    # -- renew ---------------------------------------------------------------------------------

    def _revoke(self, why: str) -> LeaseRevokedError:
        if self._revoked is None:
            self._revoked = why
            log.error("Lease has been revoked", reason=why)
        self._wake.set()
        self._revoked_evt.set()
        return LeaseRevokedError(f"Lease has been revoked: {self._revoked}")

    async def _pause(self, seconds: float) -> None:
        """Sleep, but return early when keep_lease must act (revoked, or renew at once)."""
        if self._wake.is_set():
            return
        sleeper = asyncio.ensure_future(self._sleep(max(0.0, seconds)))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Not awaited: awaiting here could swallow a cancellation meant for keep_lease itself.
            sleeper.cancel()
            waker.cancel()

    def _check_revoked(self) -> None:
        if self._revoked is not None:
            raise LeaseRevokedError(f"Lease has been revoked: {self._revoked}")

    @property
    def own_lease(self) -> Lease | None:
        """Our lease as last acquired or renewed (its expiration moves with every renewal)."""
        return self._own

    async def keep_lease(self, lease: Lease) -> NoReturn:
        """Renew the lease renew_margin before it expires, forever; raises LeaseRevokedError."""
        self._own = lease
        if lease.is_reservation:
            log.info("lease is a reservation; it never expires and needs no renewal", subnet=str(lease.subnet))
            await self._hold_reservation()
        current = lease
        while True:
            if current.is_reservation or current.expiration is None:
                # Made a reservation under us (an operator's `etcdctl put` without a lease): kept for good.
                await self._hold_reservation()
            due = current.expiration - self.renew_margin
            while not self._renew_now and self._clock() < due:
                self._check_revoked()
                await self._pause(min(due - self._clock(), MAX_WAIT_STEP))
                if self._revoked is None and not self._renew_now:
                    self._wake.clear()
            self._check_revoked()
            self._renew_now = False
            self._wake.clear()
            try:
                current = await self._renew(current)
            except LeaseRevokedError:
                raise
            except RegistryAuthError:
                raise
            except RegistryError as e:
                log.warning("Lease renewal failed; retrying", subnet=str(current.subnet), error=str(e),
                            retry_in=self.renew_retry)
                await self._pause(self.renew_retry)
                self._check_revoked()
                self._renew_now = True  # retry at once after the pause, whatever the due time
                continue
            self._own = current

    async def _hold_reservation(self) -> NoReturn:
        """Nothing to renew; returns only by raising LeaseRevokedError (the key deleted or taken)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._check_revoked()

    async def _renew(self, current: Lease) -> Lease:
        key = self.subnets_prefix + current.key
        ttl = await self.registry.refresh_lease(current.etcd_lease_id)
        if ttl is None:
            return await self._recreate(current)
        kv = await self.registry.get(key)
        if kv is None:
            raise self._revoke(f"lease key {key} was deleted")
        if kv.lease != current.etcd_lease_id:
            holder = self._holder(kv)
            if holder != current.attrs.public_ip:
                raise self._revoke(f"lease key {key} now belongs to PublicIP {holder}")
            current = replace(current, etcd_lease_id=kv.lease)  # rewritten for us (e.g. by a restart)
            if kv.lease == 0:
                log.info("lease was turned into a reservation; no more renewals", subnet=str(current.subnet))
                return replace(current, expiration=None, revision=kv.mod_revision)
            ttl = await self.registry.refresh_lease(kv.lease)
            if ttl is None:
                return await self._recreate(current)
        renewed = replace(current, expiration=self._clock() + ttl)
        log.info("Lease renewed", subnet=str(current.subnet), ttl=ttl, etcd_lease=f"{current.etcd_lease_id:x}")
        return renewed

    @staticmethod
    def _holder(kv: KeyValue) -> IPv4Address | str:
        try:
            return LeaseAttrs.from_json(kv.value).public_ip
        except ValueError:
            return "(unparsable value)"

    async def _recreate(self, current: Lease) -> Lease:
        """Our etcd lease ran out (e.g. etcd was unreachable for too long): claim the key again."""
        key = self.subnets_prefix + current.key
        claim = await self.registry.create_with_lease(key, current.attrs.to_json(), self.lease_ttl)
        if claim is None:
            kv = await self.registry.get(key)
            holder = self._holder(kv) if kv is not None else "(nobody)"
            if kv is not None and holder == current.attrs.public_ip:
                if kv.lease == 0:
                    log.info("lease was turned into a reservation; no more renewals", subnet=str(current.subnet))
                    return replace(current, etcd_lease_id=0, revision=kv.mod_revision, expiration=None)
                # Another process with our PublicIP claimed it; keep refreshing that one.
                ttl = await self.registry.lease_ttl(kv.lease)
                if ttl is None:  # gone again already: retry after the usual pause, not in a tight loop
                    raise RegistryError(f"the etcd lease {kv.lease:x} holding {key} expired as it was read")
                return replace(current, etcd_lease_id=kv.lease, revision=kv.mod_revision,
                               expiration=self._clock() + ttl)
            raise self._revoke(f"our lease on {current.subnet} expired and PublicIP {holder} claimed it")
        log.warning("etcd lease had expired; lease re-created", subnet=str(current.subnet),
                    etcd_lease=f"{claim.lease_id:x}")
        return replace(current, etcd_lease_id=claim.lease_id, expiration=self._clock() + claim.ttl,
                       revision=claim.revision)

    # -- watch ---------------------------------------------------------------------------------

    def _own_event(self, own: Lease, kind: EventType, value: bytes) -> None:
        """Our own lease changed under us: deleted, expired or overwritten."""
        current = self._own if self._own is not None and self._own.subnet == own.subnet else own
        key = self.subnets_prefix + own.key
        if kind is EventType.DELETE:
            if current.expiration is not None and self._clock() >= current.expiration:
                log.warning("our lease expired; re-creating it", subnet=str(own.subnet))
                self._renew_now = True
                self._wake.set()
                return
            if not current.is_reservation:
                # Deleted by someone, or expired in etcd's eyes though not in ours (a leader that was paused
                # can revoke leases whose renewals it did not see). A refresh tells them apart: a live etcd
                # lease means the key was deleted (revoked, exit 4); a gone one means expiry (re-created).
                log.warning("our lease key disappeared; checking whether it expired or was deleted",
                            subnet=str(own.subnet))
                self._renew_now = True
                self._wake.set()
                return
            raise self._revoke(f"lease key {key} was deleted")
        try:
            holder: IPv4Address | str = LeaseAttrs.from_json(value).public_ip
        except ValueError:
            holder = "(unparsable value)"
        if holder != own.attrs.public_ip:
            raise self._revoke(f"lease key {key} was overwritten by PublicIP {holder}")

    def _to_events(self, batch: list[WatchEvent], own: Lease) -> list[LeaseEvent]:
        events: list[LeaseEvent] = []
        for ev in batch:
            if ev.type is EventType.DELETE:
                self._reported.pop(ev.key, None)
            subnet = self._subnet_of(ev.key)
            if subnet is None:
                if ev.type is EventType.PUT:
                    self._parse(KeyValue(ev.key, ev.value, ev.lease, ev.revision, ev.create_revision))  # says why
                continue
            if subnet == own.subnet:
                self._own_event(own, ev.type, ev.value)
                continue
            if ev.type is EventType.DELETE:
                events.append(LeaseEvent.removed(subnet))
                continue
            lease = self._parse(KeyValue(ev.key, ev.value, ev.lease, ev.revision, ev.create_revision))
            # A key whose value turned into garbage no longer routes anywhere.
            events.append(LeaseEvent.added(lease) if lease is not None else LeaseEvent.removed(subnet))
        return events

    async def watch_leases(self, config: NetworkConfig,
                           own: Lease) -> AsyncIterator[tuple[list[Lease], list[Lease]]]:
        """Yield (added, removed): first the whole current set as added, then changes as they happen."""
        watcher = LeaseWatcher(config, own.subnet, own.attrs.public_ip)
        first = True
        while True:
            kvs, rev = await self._list()
            present = {kv.key for kv in kvs}
            self._reported = {k: why for k, why in self._reported.items() if k in present}
            snapshot: list[Lease] = []
            own_seen: KeyValue | None = None
            for kv in kvs:
                if self._subnet_of(kv.key) == own.subnet:
                    own_seen = kv
                    continue
                lease = self._parse(kv)
                if lease is not None:
                    snapshot.append(lease)
            if own_seen is None:
                self._own_event(own, EventType.DELETE, b"")
            else:
                self._own_event(own, EventType.PUT, own_seen.value)
            added, removed = watcher.reset(snapshot)
            self._drain_ignored(watcher)
            if first or added or removed:
                first = False
                yield added, removed
            try:
                # From the snapshot's revision + 1: whatever changed after the list is in the watch.
                batches = aiter(self.registry.watch_prefix(self.subnets_prefix, rev + 1))
                try:
                    while (batch := await self._next_batch(batches)) is not None:
                        added, removed = watcher.update(self._to_events(batch, own))
                        self._drain_ignored(watcher)
                        if added or removed:
                            yield added, removed
                finally:
                    await batches.aclose()  # type: ignore[attr-defined]
                log.warning("lease watch ended; listing leases again")
            except HistoryRewoundError as e:
                log.warning("etcd revision went back (restored or rebuilt); listing leases again and diffing",
                            revision=e.compact_revision, watch_revision=e.resume)
            except CompactedError as e:
                log.warning("etcd history compacted past our watch; listing leases again and diffing",
                            compact_revision=e.compact_revision)
            except RegistryAuthError:
                raise
            except RegistryError as e:
                log.warning("lease watch broken; listing leases again", error=str(e))
                await self._sleep(CONFIG_RETRY)

    async def _next_batch(self, batches: AsyncIterator[list[WatchEvent]]) -> list[WatchEvent] | None:
        """The next watch batch, or LeaseRevokedError as soon as keep_lease revokes (no need to wait for
        another event); None when the watch ends."""
        self._check_revoked()
        getter = asyncio.ensure_future(anext(batches, None))
        revoked = asyncio.ensure_future(self._revoked_evt.wait())
        try:
            await asyncio.wait({getter, revoked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            revoked.cancel()
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await getter
        self._check_revoked()
        return getter.result()

    # -- operator view -------------------------------------------------------------------------

    async def list_leases(self) -> list[Lease]:
        """Every parsable lease with its expiration (None for reservations), sorted by subnet."""
        kvs, _ = await self.registry.list_prefix(self.subnets_prefix)
        out: list[Lease] = []
        now = self._clock()
        for kv in kvs:
            lease = self._parse(kv)
            if lease is None:
                continue
            if kv.lease:
                ttl = await self.registry.lease_ttl(kv.lease)
                if ttl is None:
                    continue  # expired while we listed
                lease = replace(lease, expiration=now + ttl)
            out.append(lease)
        return sorted(out, key=lambda le: le.subnet)
