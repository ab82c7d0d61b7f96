"""Pure lease-set diffing: watch events and post-compaction snapshots -> (added, removed).

The watcher knows every lease it has announced. `update` turns a batch of events into the net change for
that batch; `reset` diffs a fresh snapshot against what it knows. Our own lease and leases that do not
belong to the network are never announced; the latter are listed in `ignored` for the caller to log.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Network

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


class LeaseWatcher:
    def __init__(self, config: NetworkConfig, own_subnet: IPv4Network | None) -> None:
        self.config = config
        self.own_subnet = own_subnet
        self.leases: dict[IPv4Network, Lease] = {}
        # (lease, why) rejected by the last reset/update; the caller logs and clears it.
        self.ignored: list[tuple[Lease, str]] = []

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

    def reset(self, snapshot: list[Lease]) -> Diff:
        """Replace the known set with a full snapshot; report what changed."""
        fresh = {lease.subnet: lease for lease in snapshot if self._accept(lease)}
        added = [lease for subnet, lease in sorted(fresh.items())
                 if not _same(self.leases.get(subnet), lease)]
        removed = [lease for subnet, lease in sorted(self.leases.items()) if subnet not in fresh]
        self.leases = fresh
        return added, removed

    def update(self, events: list[LeaseEvent]) -> Diff:
        """Apply a batch of events; a subnet appears at most once, in added or in removed."""
        before: dict[IPv4Network, Lease | None] = {}
        touched_put: set[IPv4Network] = set()
        for ev in events:
            if ev.subnet not in before:
                before[ev.subnet] = self.leases.get(ev.subnet)
            if ev.type is LeaseEventType.ADDED:
                assert ev.lease is not None
                if self._accept(ev.lease):
                    self.leases[ev.subnet] = ev.lease
                    touched_put.add(ev.subnet)
                elif ev.subnet != self.own_subnet:
                    # A known lease rewritten into one we do not accept is gone for routing.
                    self.leases.pop(ev.subnet, None)
                    touched_put.discard(ev.subnet)
            else:
                self.leases.pop(ev.subnet, None)
                touched_put.discard(ev.subnet)
        added: list[Lease] = []
        removed: list[Lease] = []
        for subnet in sorted(before):
            old, new = before[subnet], self.leases.get(subnet)
            if new is not None and subnet in touched_put:
                added.append(new)
            elif new is None and old is not None:
                removed.append(old)
        return added, removed


def _same(old: Lease | None, new: Lease) -> bool:
    return old is not None and old.attrs == new.attrs and old.ipv6_subnet == new.ipv6_subnet \
        and old.etcd_lease_id == new.etcd_lease_id and old.revision == new.revision
