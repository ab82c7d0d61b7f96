"""What the kernel-forwarding backends (vxlan, host-gw) share: the remote lease set and reconciliation.

The kernel carries the traffic; the backend keeps routes, neighbours and fdb entries equal to what the
lease set asks for. On the first apply() (the lease snapshot) and every `resync_interval` seconds it
reads the kernel's entries back, diffs them against the desired state (flannelpy.backend.reconcile,
pure) and fixes both ways: missing entries are added, entries of ours for vanished leases are removed.
Later apply() calls program just the changed leases without reading the kernel (a full read and diff
with 10,000 peers takes ~0.4 s for host-gw and ~1 s for vxlan; flannelpy.backend.netlink decodes the
dumps itself and sends changes in batches, each refusal reported with its entry).

Until the first apply() (the daemon's initial lease snapshot) nothing is removed: a restarted daemon
must not drop the routes of live peers before it knows who they are.

The kernel state is left in place on stop(), as flanneld does, so containers keep talking while the
daemon restarts; the next start reconciles it. teardown() removes it.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections import Counter
from ipaddress import IPv4Network

import structlog

from flannelpy.backend.base import Backend, ExternalInterface
from flannelpy.backend.netlink import Netlink, execute_plan
from flannelpy.backend.reconcile import KernelState, Ownership, Plan, Route, Skipped, delta, plan
from flannelpy.config import NetworkConfig
from flannelpy.errors import ConfigError, InterfaceError
from flannelpy.subnet.lease import Lease

log = structlog.get_logger()

# flanneld re-checks host-gw routes every 10 s (routeCheckInterval); we reconcile both backends as often.
RESYNC_INTERVAL = 10.0
# Unrouted leases logged one by one per batch; the rest as one summary line (a host-gw daemon started among
# thousands of unreachable peers would otherwise log thousands of lines).
UNROUTED_LOGGED = 10


class KernelBackend(Backend, abc.ABC):
    def __init__(
        self,
        config: NetworkConfig,
        iface: ExternalInterface,
        *,
        netns: str | None = None,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        super().__init__(config, iface)
        if config.network is None:
            raise ConfigError(f"the {self.type} backend routes IPv4: the network config needs a Network "
                              '(e.g. "Network": "10.5.0.0/16") and EnableIPv4 true')
        self.network: IPv4Network = config.network
        self.resync_interval = resync_interval
        self.netns = netns
        self.nl = Netlink(netns)
        self._leases: dict[IPv4Network, Lease] = {}
        self._lock = asyncio.Lock()
        self._synced = False
        self._reported: set[tuple[IPv4Network, str]] = set()
        self._failures: set[str] = set()
        self.reconciles = 0
        self._counts: dict[str, int] = {}
        self.last_plan: Plan | None = None
        self._round_routes: list[Route] | None = None
        if config.enable_ipv6:
            log.warning("IPv6 is not routed by this backend; only the IPv4 Network is",
                        backend=self.type, ipv6_network=str(config.ipv6_network))

    # ---- what a backend provides ----

    @abc.abstractmethod
    async def _prepare(self) -> None:
        """Make sure the backend's devices exist and are configured (called under the lock)."""

    @abc.abstractmethod
    async def _desired(self, leases: list[Lease]) -> tuple[KernelState, list[Skipped], Ownership]:
        """Desired entries for these remote leases, the leases not routed, and what we own."""

    @abc.abstractmethod
    async def _actual(self) -> KernelState:
        """The kernel's entries that could be ours (on our devices)."""

    # ---- Backend ----

    async def apply(self, added: list[Lease], removed: list[Lease]) -> None:
        """The first call (the snapshot) runs a full reconcile; later ones program only what changed."""
        before: list[Lease] = []  # earlier versions of leases that went away or changed
        after: list[Lease] = []
        for lease in removed:
            old = self._leases.pop(lease.subnet, None)
            if old is not None:
                before.append(old)
        if removed:  # a lease that went is no longer "not routed" (the gauge), nor remembered as reported
            gone = {lease.subnet for lease in removed}
            self._reported = {r for r in self._reported if r[0] not in gone}
        for lease in added:
            if self.lease is not None and lease.subnet == self.lease.subnet:
                continue
            old = self._leases.get(lease.subnet)
            self._leases[lease.subnet] = lease
            if old is not None and old.attrs == lease.attrs:
                continue  # a renewal: nothing to program
            if old is not None:
                before.append(old)
            after.append(lease)
        if not self._synced:
            self._synced = True
            await self.reconcile()
        elif before or after:
            await self._apply_delta(before, after)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # A transient netlink failure must not end the loop; the next round retries.
                log.error("Reconcile failed, retrying", backend=self.type, error=str(e),
                          retry_in=self.resync_interval)

    async def stop(self) -> None:
        await self.nl.close()

    def counters(self) -> dict[str, int]:
        """Reconcile rounds, kernel entries added/removed (by kind), failed operations: counters, never down."""
        return {"reconciles": self.reconciles, **self._counts}

    @property
    def leases_not_routed(self) -> int:
        """Remote leases this backend does not route now (a gauge: it falls when they go or become routable)."""
        return len(self._reported)

    def _count(self, todo: Plan, failures: list[str], stale: bool) -> None:
        for key, value in todo.summary().items():
            self._counts[key] = self._counts.get(key, 0) + value
        if stale:  # removed by a full reconcile: left behind by a vanished lease or by hand
            n = len(todo.del_routes) + len(todo.del_neighbours) + len(todo.del_fdb)
            self._counts["stale_removed"] = self._counts.get("stale_removed", 0) + n
        self._counts["program_failures"] = self._counts.get("program_failures", 0) + len(failures)

    # ---- reconciliation ----

    @property
    def leases(self) -> list[Lease]:
        """The remote leases we know of (any backend type)."""
        return list(self._leases.values())

    async def reconcile(self) -> Plan:
        """One round: make the kernel match the lease set. Returns what was changed."""
        await self.nl.open()
        async with self._lock:
            await self._prepare()
            try:
                desired, skipped, owner = await self._desired(self.leases)
                self._report(skipped)
                actual = await self._actual()
            finally:
                self._round_routes = None
            todo = plan(desired, actual, owner)
            if not self._synced:
                todo = dataclasses.replace(todo, del_routes=(), del_neighbours=(), del_fdb=())
            todo, failures = await execute_plan(self.nl, todo)
            self.reconciles += 1
            self.last_plan = todo
            self._count(todo, failures, stale=True)
        for line in failures:
            if line not in self._failures:  # once while it persists, not every resync
                log.error("Could not program kernel entry", backend=self.type, failure=line)
        self._failures = set(failures)
        if not todo.empty:
            log.info("Reconciled kernel state", backend=self.type, **todo.summary())
            replaced = {r.dst for r in todo.add_routes}
            for r in todo.del_routes:
                log.info("Replaced a route in the way of ours" if r.dst in replaced
                         else "Removed route for a lease that no longer exists", backend=self.type, dst=str(r.dst),
                         gateway=str(r.gateway), ifindex=r.ifindex)
        return todo

    async def _apply_delta(self, before: list[Lease], after: list[Lease]) -> Plan:
        await self.nl.open()
        async with self._lock:
            await self._prepare()
            try:
                old, _, owner = await self._desired(before)
                new, skipped, _ = await self._desired(after)
            finally:
                self._round_routes = None
            self._log_unrouted([s for s in skipped if (s.subnet, s.reason) not in self._reported])
            self._reported |= {(s.subnet, s.reason) for s in skipped}
            todo = delta(old, new, owner)
            todo, failures = await execute_plan(self.nl, todo, exists_ok=True)
            self._count(todo, failures, stale=False)
        for line in failures:
            log.error("Could not program kernel entry", backend=self.type, failure=line)
        if not todo.empty:
            log.info("Programmed lease changes", backend=self.type, **todo.summary())
        return todo

    def _report(self, skipped: list[Skipped]) -> None:
        """Log each unrouted lease once while it stays unrouted for the same reason."""
        self._log_unrouted([s for s in skipped if (s.subnet, s.reason) not in self._reported])
        self._reported = {(s.subnet, s.reason) for s in skipped}

    def _log_unrouted(self, fresh: list[Skipped]) -> None:
        for s in fresh[:UNROUTED_LOGGED]:
            log.warning("Lease not routed", backend=self.type, subnet=str(s.subnet), reason=s.reason, **s.detail)
        rest = fresh[UNROUTED_LOGGED:]
        if rest:
            log.warning("More leases not routed", backend=self.type, count=len(rest),
                        reasons=dict(Counter(s.reason for s in rest)))

    # ---- shared checks ----

    async def _routes(self) -> list[Route]:
        """The main table's routes, dumped once per round (a reconcile, a lease batch): the connected networks
        and the actual state come from one read (with 10,000 leases a dump is 10,000 routes)."""
        if self._round_routes is None:
            self._round_routes = await self.nl.routes()
        return self._round_routes

    async def _iface_networks(self) -> list[IPv4Network]:
        """The networks a next hop on the interface may be in, as the kernel judges a gateway: the networks
        of its addresses and its on-link routes (`ip route add 10.98.0.0/24 dev eth0`, no address needed)."""
        nets = {a.network for a in await self.nl.ipv4_addresses(self.iface.index)}
        nets.update(r.dst for r in await self._routes() if r.ifindex == self.iface.index and r.gateway is None)
        return sorted(nets)

    async def _check_iface(self) -> None:
        link = await self.nl.link_by_index(self.iface.index)
        if link is None:
            raise InterfaceError(f"interface {self.iface.name} (index {self.iface.index}) does not exist; "
                                 "choose an existing interface with --iface")
        if link.name != self.iface.name:
            raise InterfaceError(f"interface index {self.iface.index} is {link.name}, not {self.iface.name} "
                                 "(was the interface re-created?); restart flannelpy to pick it again")
