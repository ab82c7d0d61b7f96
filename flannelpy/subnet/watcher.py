"""Pure lease-set diffing: watch events and post-compaction snapshots -> (added, removed).

The watcher knows every lease it has announced. `update` turns a batch of events into the net change for
that batch; `reset` diffs a fresh snapshot against what it knows. Our own lease and leases that do not
belong to the network are never announced; the latter are listed in `ignored` for the caller to log.

Leases sharing a PublicIP (a stale second lease of a host, or a misconfigured one): exactly one of them is
announced, the same on every host, chosen from etcd alone by `lease_for_public_ip` (the oldest key); the others
are listed once in `duplicates` and announced when the one in use goes away. Leases carrying our own PublicIP
are never announced here. This is the one place that feeds every backend (udp route table, vxlan, host-gw).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flannelpy.config import NetworkConfig
from flannelpy.subnet.lease import Lease


class LeaseEventType(enum.Enum):
    ADDED = "added"  # created or renewed (a renewal is announced again)
    REMOVED = "removed"  # deleted or expired


@dataclass(frozen=True)
class LeaseEvent:
    type: LeaseEventType
    subnet: IPv4Network
    lease: Lease | None = None  # required for ADDED; a removal needs only the subnet

    @classmethod
    def added(cls, lease: Lease) -> LeaseEvent:
        return cls(LeaseEventType.ADDED, lease.subnet, lease)

    @classmethod
    def removed(cls, subnet: IPv4Network) -> LeaseEvent:
        return cls(LeaseEventType.REMOVED, subnet)


Diff = tuple[list[Lease], list[Lease]]


def lease_for_public_ip(leases: Iterable[Lease]) -> Lease:
    """Among live leases sharing a PublicIP, the one routed cluster-wide: the key created first (lowest etcd
    create revision; the subnet breaks ties). Every daemon sees the same revisions, so all choose the same one,
    and a daemon starting with that PublicIP reuses it (SubnetManager.acquire_lease)."""
    return min(leases, key=lambda lease: (lease.created, lease.subnet))


class LeaseWatcher:
    def __init__(self, config: NetworkConfig, own_subnet: IPv4Network | None,
                 own_ip: IPv4Address | None = None) -> None:
        self.config = config
        self.own_subnet = own_subnet
        self.own_ip = own_ip
        self.leases: dict[IPv4Network, Lease] = {}  # announced: what the backends route
        self.known: dict[IPv4Network, Lease] = {}  # every acceptable lease, shared PublicIPs included
        self._by_ip: dict[IPv4Address, set[IPv4Network]] = {}
        # (lease, why) rejected by the last reset/update; the caller logs and clears it.
        self.ignored: list[tuple[Lease, str]] = []
        # (lease, the lease used instead or None for our own PublicIP) newly passed over by the last
        # reset/update; the caller logs and clears it. Each is listed once until that changes.
        self.duplicates: list[tuple[Lease, Lease | None]] = []
        self._passed_over: dict[IPv4Network, IPv4Network | None] = {}

    def _why_not(self, lease: Lease) -> str | None:
        network = self.config.network
        if network is None:
            return "the network config has no IPv4 Network"
        if lease.subnet.prefixlen != self.config.subnet_len:
            return f"prefix length /{lease.subnet.prefixlen} differs from SubnetLen /{self.config.subnet_len}"
        if not lease.subnet.subnet_of(network):
            return f"subnet lies outside Network {network}"
        return None

    def _accept(self, lease: Lease) -> bool:
        if lease.subnet == self.own_subnet:
            return False
        why = self._why_not(lease)
        if why is not None:
            self.ignored.append((lease, why))
            return False
        return True

    def _chosen(self, ip: IPv4Address) -> IPv4Network | None:
        subnets = self._by_ip.get(ip)
        if not subnets or ip == self.own_ip:
            return None
        return lease_for_public_ip(self.known[s] for s in subnets).subnet

    def _routed(self, subnet: IPv4Network) -> Lease | None:
        lease = self.known.get(subnet)
        if lease is None or self._chosen(lease.attrs.public_ip) != subnet:
            return None
        return lease

    def _index(self, lease: Lease) -> None:
        self._drop(lease.subnet)
        self.known[lease.subnet] = lease
        self._by_ip.setdefault(lease.attrs.public_ip, set()).add(lease.subnet)

    def _drop(self, subnet: IPv4Network) -> None:
        old = self.known.pop(subnet, None)
        if old is not None:
            peers = self._by_ip[old.attrs.public_ip]
            peers.discard(subnet)
            if not peers:
                del self._by_ip[old.attrs.public_ip]

    def _note_passed_over(self, subnets: Iterable[IPv4Network]) -> None:
        for subnet in subnets:
            lease = self.known.get(subnet)
            if lease is None or subnet in self.leases:
                self._passed_over.pop(subnet, None)
                continue
            chosen = self._chosen(lease.attrs.public_ip)
            if subnet not in self._passed_over or self._passed_over[subnet] != chosen:
                self._passed_over[subnet] = chosen
                self.duplicates.append((lease, self.known[chosen] if chosen is not None else None))

    def reset(self, snapshot: list[Lease]) -> Diff:
        """Replace the known set with a full snapshot; report what changed."""
        self.known, self._by_ip = {}, {}
        for lease in snapshot:
            if self._accept(lease):
                self._index(lease)
        fresh: dict[IPv4Network, Lease] = {}
        for subnet in self.known:
            routed = self._routed(subnet)
            if routed is not None:
                fresh[subnet] = routed
        added = [lease for subnet, lease in sorted(fresh.items())
                 if not _same(self.leases.get(subnet), lease)]
        removed = [lease for subnet, lease in sorted(self.leases.items()) if subnet not in fresh]
        self.leases = fresh
        self._note_passed_over(sorted(set(self.known) | set(self._passed_over)))
        return added, removed

    def update(self, events: list[LeaseEvent]) -> Diff:
        """Apply a batch of events; a subnet appears at most once, in added or in removed."""
        touched_put: set[IPv4Network] = set()
        ips: set[IPv4Address] = set()
        affected: set[IPv4Network] = set()
        for ev in events:
            affected.add(ev.subnet)
            old = self.known.get(ev.subnet)
            if old is not None:
                ips.add(old.attrs.public_ip)
            if ev.type is LeaseEventType.ADDED:
                assert ev.lease is not None
                if self._accept(ev.lease):
                    self._index(ev.lease)
                    ips.add(ev.lease.attrs.public_ip)
                    touched_put.add(ev.subnet)
                    continue
                if ev.subnet == self.own_subnet:
                    continue
            # Removed, or a known lease rewritten into one we do not accept: gone for routing.
            self._drop(ev.subnet)
            touched_put.discard(ev.subnet)
        # A change to one lease of a PublicIP can pass the route to, or take it from, its other leases (a lease
        # announced before is still known under its PublicIP, or was touched by this batch).
        for ip in ips:
            affected |= self._by_ip.get(ip, set())
        added: list[Lease] = []
        removed: list[Lease] = []
        for subnet in sorted(affected):
            old, new = self.leases.get(subnet), self._routed(subnet)
            if new is not None:
                if subnet in touched_put or old is None or not _same(old, new):
                    added.append(new)
                self.leases[subnet] = new
            elif old is not None:
                removed.append(old)
                del self.leases[subnet]
        self._note_passed_over(sorted(affected))
        return added, removed


def _same(old: Lease | None, new: Lease) -> bool:
    return old is not None and old.attrs == new.attrs and old.ipv6_subnet == new.ipv6_subnet \
        and old.etcd_lease_id == new.etcd_lease_id and old.revision == new.revision
