"""The control plane's route table: which lease (peer) owns each remote subnet (pure).

One writer (the watch loop) applies (added, removed) batches; readers look up a subnet or an address.
Every lease of a network has the same prefix length, so a lookup is one dict probe per distinct length.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from flannelpy.subnet.lease import Lease


class RouteTable:
    def __init__(self, leases: Iterable[Lease] = ()) -> None:
        self._routes: dict[IPv4Network, Lease] = {}
        self._prefixlens: Counter[int] = Counter()
        self.version = 0  # bumped by every apply() that changed something
        self.apply(list(leases), [])

    def apply(self, added: Iterable[Lease], removed: Iterable[Lease]) -> bool:
        """Remove, then add (a subnet in both ends up present). Returns whether anything changed."""
        changed = False
        for lease in removed:
            if self._routes.pop(lease.subnet, None) is not None:
                self._prefixlens[lease.subnet.prefixlen] -= 1
                if not self._prefixlens[lease.subnet.prefixlen]:
                    del self._prefixlens[lease.subnet.prefixlen]
                changed = True
        for lease in added:
            old = self._routes.get(lease.subnet)
            if old is None:
                self._prefixlens[lease.subnet.prefixlen] += 1
            if old != lease or old.revision != lease.revision:
                changed = True
            self._routes[lease.subnet] = lease
        if changed:
            self.version += 1
        return changed

    def get(self, subnet: IPv4Network) -> Lease | None:
        return self._routes.get(subnet)

    def lookup(self, ip: IPv4Address | str) -> Lease | None:
        """The lease whose subnet contains ip, if any."""
        addr = int(IPv4Address(ip))
        for plen in self._prefixlens:
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            lease = self._routes.get(IPv4Network((addr & mask, plen)))
            if lease is not None:
                return lease
        return None

    def leases(self) -> list[Lease]:
        return [self._routes[s] for s in sorted(self._routes)]

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, subnet: object) -> bool:
        return subnet in self._routes
