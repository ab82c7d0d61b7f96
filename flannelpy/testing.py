"""In-memory fakes for unit tests and for embedding flannelpy in tests.

MemoryRegistry behaves like etcd as the subnet manager sees it: revisions, leases that expire by an
injected clock, prefix watches from a past revision, compaction. It can also fail on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from flannelpy.subnet.registry import (
    Claim,
    CompactedError,
    EventType,
    KeyValue,
    LeaseNotFoundError,
    RegistryUnavailableError,
    WatchEvent,
)


@dataclass
class _Lease:
    ttl: float
    expires: float
    keys: set[str] = field(default_factory=set)


class MemoryRegistry:
    """A Registry in memory. `clock` decides lease expiry; expiry happens on the next operation or
    when expire() is called."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.revision = 1
        self.compact_revision = 0
        self._data: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(0x1000)
        self._history: list[WatchEvent] = []
        self._watchers: list[tuple[str, asyncio.Queue[list[WatchEvent] | BaseException]]] = []
        # Fault injection.
        self.unavailable = False
        self.before_create: Callable[[str], None] | None = None  # runs inside create_with_lease
        self.calls: list[str] = []

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, op: str) -> None:
        self.calls.append(op)
        if self.unavailable:
            raise RegistryUnavailableError("no etcd endpoint answered (MemoryRegistry.unavailable is set)")
        self.expire()

    def _emit(self, events: list[WatchEvent]) -> None:
        self._history.extend(events)
        for prefix, queue in self._watchers:
            mine = [e for e in events if e.key.startswith(prefix)]
            if mine:
                queue.put_nowait(mine)

    def _put(self, key: str, value: bytes, lease: int) -> int:
        self.revision += 1
        old = self._data.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        if lease:
            if lease not in self._leases:
                raise LeaseNotFoundError("etcdserver: requested lease not found")
            self._leases[lease].keys.add(key)
        created = old.create_revision if old else self.revision
        self._data[key] = KeyValue(key, value, lease, self.revision, created, (old.version if old else 0) + 1)
        self._emit([WatchEvent(EventType.PUT, key, value, lease, self.revision, created)])
        return self.revision

    def _delete(self, keys: list[str]) -> None:
        if not keys:
            return
        self.revision += 1
        events = []
        for key in keys:
            kv = self._data.pop(key)
            if kv.lease in self._leases:
                self._leases[kv.lease].keys.discard(key)
            events.append(WatchEvent(EventType.DELETE, key, b"", 0, self.revision))
        self._emit(events)

    def expire(self) -> None:
        """Drop every lease whose time has come, deleting its keys (as etcd does)."""
        now = self.clock()
        for lease_id, lease in list(self._leases.items()):
            if lease.expires <= now:
                del self._leases[lease_id]
                self._delete(sorted(lease.keys))

    # -- Registry ------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._check("get")
        return self._data.get(key)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._check("put")
        return self._put(key, value, lease)

    async def delete(self, key: str) -> bool:
        self._check("delete")
        if key not in self._data:
            return False
        self._delete([key])
        return True

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._check("list")
        return [kv for k, kv in sorted(self._data.items()) if k.startswith(prefix)], self.revision

    def grant(self, ttl: float) -> int:
        lease_id = next(self._ids)
        self._leases[lease_id] = _Lease(ttl, self.clock() + ttl)
        return lease_id

    async def create_with_lease(self, key: str, value: bytes, ttl: float) -> Claim | None:
        self._check("create")
        lease_id = self.grant(ttl)
        if self.before_create is not None:
            self.before_create(key)  # e.g. another node wins the race here
        if key in self._data:
            del self._leases[lease_id]
            return None
        rev = self._put(key, value, lease_id)
        return Claim(lease_id, ttl, rev)

    async def revoke_lease(self, lease_id: int) -> None:
        self._check("revoke")
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self._delete(sorted(lease.keys))

    async def refresh_lease(self, lease_id: int) -> float | None:
        self._check("refresh")
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        lease.expires = self.clock() + lease.ttl
        return lease.ttl

    async def lease_ttl(self, lease_id: int) -> float | None:
        self._check("ttl")
        lease = self._leases.get(lease_id)
        return None if lease is None else max(0.0, lease.expires - self.clock())

    def compact(self, revision: int | None = None, *, cancel_watches: bool = True) -> None:
        """Forget history before `revision` (default: now). With cancel_watches, running watches end
        with CompactedError, as a watch that fell behind a compaction does."""
        rev = self.revision if revision is None else revision
        self.compact_revision = rev
        # As etcd: what is at the compact revision survives only as the keys' state, so a delete's
        # tombstone there is gone (a watch from that revision does not see it).
        self._history = [e for e in self._history
                         if e.revision > rev or (e.revision == rev and e.type is not EventType.DELETE)]
        if cancel_watches:
            for _, queue in self._watchers:
                queue.put_nowait(CompactedError(rev))

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        self._check("watch")
        if start_revision <= self.compact_revision:  # as EtcdRegistry: a tombstone there may be gone
            raise CompactedError(self.compact_revision)
        queue: asyncio.Queue[list[WatchEvent] | BaseException] = asyncio.Queue()
        past = [e for e in self._history if e.revision >= start_revision and e.key.startswith(prefix)]
        for _, group in itertools.groupby(past, key=lambda e: e.revision):
            queue.put_nowait(list(group))
        entry = (prefix, queue)
        self._watchers.append(entry)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._watchers.remove(entry)

    def break_watches(self, error: BaseException | None = None) -> None:
        """End every running watch with `error` (default RegistryUnavailableError)."""
        for _, queue in self._watchers:
            queue.put_nowait(error or RegistryUnavailableError("watch broken (MemoryRegistry)"))

    async def close(self) -> None:
        self.break_watches()


class FakeClock:
    """A clock and a sleep that advances it: `await clock.sleep(60)` returns at once, 60 s later."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
