"""One flannel node: config -> lease -> backend -> routes -> subnet file, and the loops that keep them.

`Node` is the library API (``import flannelpy; node = flannelpy.Node(...)``) and the daemon is a thin
wrapper that adds flags, signals and exit codes around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flannelpy.backend.base import Backend, ExternalInterface, create_backend
from flannelpy.config import NetworkConfig
from flannelpy.errors import FlannelError
from flannelpy.routes import RouteTable
from flannelpy.subnet.lease import Lease
from flannelpy.subnet.manager import RENEW_RETRY, SubnetManager
from flannelpy.subnet.registry import Registry

log = structlog.get_logger()


STOP_GRACE = 10.0  # seconds stop() waits for the loops before it goes on without them


async def cancel_tasks(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel and wait, cancelling again while they last: a cancellation can be lost in a library. gRPC's aio
    calls end a task cancelled while a stream is being set up as if nothing happened, and the next read then
    waits for ever (a SIGTERM during start-up hung the daemon)."""
    for task in tasks:
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + STOP_GRACE
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.5)
        if not pending:
            break
        if asyncio.get_running_loop().time() >= deadline:
            log.warning("Loops did not stop; going on without them", loops=sorted(t.get_name() for t in pending))
            break
        for task in pending:
            task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a loop's failure at stop is not news


@dataclass
class NodeOptions:
    prefix: str = "/coreos.com/network"
    subnet_file: Path | None = Path("/run/flannel/subnet.env")
    ip_masq: bool = False
    iptables_forward_rules: bool = True
    iptables_resync: float = 5.0
    renew_margin_minutes: int = 60
    lease_ttl: int = 86400  # 24 h as flanneld; shorter only in tests (documented in docs/operations.md)


@dataclass
class LeaseEvent:
    """One batch from the lease watch, as applied to the route table."""

    added: list[Lease]
    removed: list[Lease]
    at: float = field(default_factory=time.time)


class EventStream:
    """An async iterator of LeaseEvents; `aclose()` (or leaving `async with`) unsubscribes."""

    def __init__(self, subscribers: list[asyncio.Queue[LeaseEvent]]) -> None:
        self._subscribers = subscribers
        self._queue: asyncio.Queue[LeaseEvent] = asyncio.Queue()
        subscribers.append(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> LeaseEvent:
        if self._queue not in self._subscribers:
            raise StopAsyncIteration
        return await self._queue.get()

    async def aclose(self) -> None:
        if self._queue in self._subscribers:
            self._subscribers.remove(self._queue)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def renew_timing(lease_ttl: float, margin: float) -> tuple[float, float]:
    """(renew margin, retry interval) in seconds for a lease TTL.

    The margin flag counts whole minutes (at least 1), so a test-only --subnet-lease-ttl of seconds is
    below it: such a lease is renewed when two thirds of its TTL are left and a failed renewal is retried
    every tenth of the TTL (at least 1 s), so a lease outlives a few failed renewals.
    """
    if margin < lease_ttl:
        return margin, RENEW_RETRY
    return lease_ttl * 2 / 3, max(1.0, min(RENEW_RETRY, lease_ttl / 10))


class Node:
    """Runs one host's share of the overlay. Start it, read its state, stop it.

    >>> node = Node(registry, iface)            # doctest: +SKIP
    >>> await node.start()                      # lease held, backend up, subnet file written
    >>> node.lease.subnet, len(node.routes)
    >>> await node.stop()                       # lease stays, so a restart gets the same subnet
    """

    def __init__(
        self,
        registry: Registry,
        iface: ExternalInterface,
        options: NodeOptions | None = None,
        *,
        backend_factory: Callable[[NetworkConfig, ExternalInterface], Backend] | None = None,
    ) -> None:
        self.registry = registry
        self.iface = iface
        self.options = options or NodeOptions()
        margin, retry = renew_timing(self.options.lease_ttl, self.options.renew_margin_minutes * 60.0)
        self.manager = SubnetManager(
            registry,
            self.options.prefix,
            lease_ttl=self.options.lease_ttl,
            renew_margin=margin,
            renew_retry=retry,
        )
        self._backend_factory = backend_factory or create_backend
        self.config: NetworkConfig | None = None
        self.backend: Backend | None = None
        self._lease: Lease | None = None
        self.routes = RouteTable()
        self.subnet_file_written = False
        self.last_event_at: float | None = None
        self._iptables: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._subscribers: list[asyncio.Queue[LeaseEvent]] = []
        self._first_snapshot = asyncio.Event()
        self._done: asyncio.Future[None] | None = None

    # ---- state for health checks, metrics and embedding programs ----

    @property
    def lease(self) -> Lease | None:
        """Our lease: the one acquired at start, with the expiration of its latest renewal."""
        own = self.manager.own_lease
        if own is not None and self._lease is not None and own.subnet == self._lease.subnet:
            return own
        return self._lease

    @lease.setter
    def lease(self, lease: Lease | None) -> None:
        self._lease = lease

    @property
    def ready(self) -> bool:
        return self.lease is not None and self.backend is not None and self.subnet_file_written

    def counters(self) -> dict[str, int]:
        return self.backend.counters() if self.backend is not None else {}

    @property
    def iptables_errors(self) -> dict[str, int]:
        """Failed iptables/nft commands by kind ("read", "write"); empty when no rules are managed."""
        return dict(self._iptables.errors) if self._iptables is not None else {}

    def events(self) -> EventStream:
        """Lease batches as they are applied, from this call on (subscribed at once, not at first read)."""
        return EventStream(self._subscribers)

    # ---- life cycle ----

    async def start(self) -> None:
        """Acquire the lease and bring the backend up; returns when the node is ready."""
        self._done = asyncio.get_running_loop().create_future()
        self._first_snapshot.clear()  # a start after a stop waits for its own watch's first batch
        self.config = await self.manager.get_network_config()
        log.info("Network config", network=str(self.config.network), subnet_len=self.config.subnet_len,
                 backend=self.config.backend.type)
        for key in self.config.unknown_keys:
            log.warning("Unknown key in network config, ignored", key=key)
        self.backend = self._backend_factory(self.config, self.iface)
        attrs = await self.backend.lease_attrs()
        prev = self._previous_subnet()
        self.lease = await self.manager.acquire_lease(self.config, attrs, prev)
        log.info("Acquired lease", subnet=str(self.lease.subnet), public_ip=str(attrs.public_ip))
        await self.backend.start(self.lease)
        log.info("Backend ready", backend=self.config.backend.type, mtu=self.backend.mtu)
        if self.options.ip_masq or self._wants_forward_rules():
            await self._start_iptables()
        self._spawn(self._watch(), "watch")
        self._spawn(self.manager.keep_lease(self.lease), "renew")
        self._spawn(self.backend.run(), "backend")
        try:
            # Routes to the peers that exist now are in place before containers are told to start.
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._first_snapshot.wait())
            pending: list[asyncio.Future[Any]] = [waiter, self._done]
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if self._done.done():
                waiter.cancel()
                self._done.result()
            self._write_subnet_file()
        except BaseException:
            # A start that fails (or is cancelled) stops what it started: its loops would otherwise renew the
            # lease and watch etcd for ever in a program that retries start().
            await self.stop()
            raise

    async def wait(self) -> None:
        """Until a background loop fails (its exception is raised here) or stop() is called."""
        assert self._done is not None, "start() first"
        await self._done

    async def stop(self) -> None:
        """Stop loops and the backend; the lease stays in etcd so a restart gets the same subnet."""
        tasks, self._tasks = self._tasks, []  # what _task_done finds no longer listed was stopped by us
        await cancel_tasks(tasks)
        iptables, self._iptables = self._iptables, None  # a second stop() (after a failed start) has none left
        if iptables is not None:
            with contextlib.suppress(Exception):
                await iptables.remove()
        if self.backend is not None:
            await self.backend.stop()
        if self._done is not None:
            if not self._done.done():
                self._done.set_result(None)
            elif not self._done.cancelled():
                self._done.exception()  # seen: a stop() after a failure is the caller's answer to it

    # ---- internals ----

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._done is None or self._done.done() or task not in self._tasks:
            return
        if task.cancelled():  # not by stop(): a loop must not end unnoticed, whatever ended it
            self._done.set_exception(RuntimeError(f"{task.get_name()} loop was cancelled"))
            # wait() still raises it; no "never retrieved" noise when a program's loop closes without stop().
            self._done.exception()
            return
        exc = task.exception()
        if exc is not None:
            self._done.set_exception(exc)
        elif task.get_name() in ("watch", "renew"):
            self._done.set_exception(RuntimeError(f"{task.get_name()} loop ended unexpectedly"))

    async def _watch(self) -> None:
        assert self.config is not None and self.lease is not None and self.backend is not None
        async for added, removed in self.manager.watch_leases(self.config, self.lease):
            self.routes.apply(added, removed)
            await self.backend.apply(added, removed)
            self.last_event_at = time.time()
            event = LeaseEvent(added, removed)
            for q in self._subscribers:
                q.put_nowait(event)
            if added or removed:
                log.info("Lease changes applied", added=[str(x.subnet) for x in added],
                         removed=[str(x.subnet) for x in removed], routes=len(self.routes))
            self._first_snapshot.set()

    def _previous_subnet(self) -> Any:
        if self.options.subnet_file is None:
            return None
        from flannelpy.host.subnet_file import previous_subnet

        return previous_subnet(self.options.subnet_file)

    def _write_subnet_file(self) -> None:
        assert self.config is not None and self.lease is not None and self.backend is not None
        if self.options.subnet_file is not None:
            from flannelpy.host.subnet_file import write_subnet_file

            try:
                write_subnet_file(self.options.subnet_file, self.config, self.lease, self.backend.mtu,
                                  self.options.ip_masq)
            except OSError as e:
                raise FlannelError(f"cannot write the subnet file {self.options.subnet_file}: "
                                   f"{e.strerror or e}; make its directory writable or choose another path "
                                   "with --subnet-file") from None
        self.subnet_file_written = True

    def _wants_forward_rules(self) -> bool:
        # flanneld installs FLANNEL-FWD whenever --iptables-forward-rules is on (the default), with or
        # without --ip-masq, so Docker's FORWARD DROP policy does not eat overlay traffic.
        return self.options.iptables_forward_rules

    async def _start_iptables(self) -> None:
        from flannelpy.host.iptables import IptablesManager

        assert self.config is not None and self.lease is not None
        self._iptables = IptablesManager(
            self.config, self.lease, masq=self.options.ip_masq,
            forward=self.options.iptables_forward_rules, resync=self.options.iptables_resync,
        )
        await self._iptables.install()
        self._spawn(self._iptables.run(), "iptables")
