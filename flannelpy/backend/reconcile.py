"""Kernel state the vxlan and host-gw backends want, and the diff against what the kernel has (pure).

Each backend turns its lease set into a `KernelState` (routes, neighbours, fdb entries). The kernel's
actual entries are read back, reduced to the ones we own (`Ownership`: on our device and pointing into
the Network) and diffed against the desired set. What we do not own is never in a plan, so a route
outside the Network or on another device cannot be touched (flannel issue #2554 is the reverse problem:
flanneld never removes anything, so routes to vanished hosts stay forever).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannelpy.subnet.lease import Lease

# rtnetlink numbers, kept here so this module stays free of pyroute2.
RTPROT_KERNEL = 2
RTPROT_BOOT = 3  # what `ip route add` and flanneld (vishvananda/netlink) write
RT_TABLE_MAIN = 254
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02


@dataclass(frozen=True)
class Route:
    """A unicast IPv4 route in the main table: `<dst> via <gateway> dev <ifindex> [onlink]`."""

    dst: IPv4Network
    gateway: IPv4Address | None
    ifindex: int
    onlink: bool = False
    # Read back from the kernel so a delete names the exact route; not part of equality.
    priority: int = field(default=0, compare=False)
    proto: int = field(default=RTPROT_BOOT, compare=False)

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway is not None else ""
        return f"{self.dst}{via} dev#{self.ifindex}{' onlink' if self.onlink else ''}"


@dataclass(frozen=True, order=True)
class Neighbour:
    """A permanent ARP entry: `<ip> lladdr <mac> dev <ifindex>` (the remote VTEP's inner address)."""

    ip: IPv4Address
    mac: str  # lower case, colon separated
    ifindex: int
    permanent: bool = field(default=True, compare=False)

    @property
    def key(self) -> tuple[int, IPv4Address]:
        # The kernel keeps one entry per (device, address); a second one replaces the first.
        return (self.ifindex, self.ip)


@dataclass(frozen=True, order=True)
class FdbEntry:
    """A VXLAN forwarding entry: `<mac> dst <dst> self permanent dev <ifindex>` (where a VTEP lives)."""

    mac: str
    dst: IPv4Address
    ifindex: int
    # False for entries the kernel learned (Learning=true): those are the kernel's, never removed.
    permanent: bool = field(default=True, compare=False)


@dataclass(frozen=True)
class KernelState:
    routes: frozenset[Route] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()


@dataclass(frozen=True)
class Plan:
    """What to change; deletions run before additions (an entry may be replaced by a corrected one)."""

    del_routes: tuple[Route, ...] = ()
    del_neighbours: tuple[Neighbour, ...] = ()
    del_fdb: tuple[FdbEntry, ...] = ()
    add_routes: tuple[Route, ...] = ()
    add_neighbours: tuple[Neighbour, ...] = ()
    add_fdb: tuple[FdbEntry, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.del_routes or self.del_neighbours or self.del_fdb
                    or self.add_routes or self.add_neighbours or self.add_fdb)

    def summary(self) -> dict[str, int]:
        return {
            "routes_added": len(self.add_routes), "routes_removed": len(self.del_routes),
            "neighbours_added": len(self.add_neighbours), "neighbours_removed": len(self.del_neighbours),
            "fdb_added": len(self.add_fdb), "fdb_removed": len(self.del_fdb),
        }


@dataclass(frozen=True)
class Ownership:
    """Which kernel entries are ours to remove.

    vtep_index: our VXLAN device (0 for host-gw): every route, permanent neighbour and fdb entry on it
      that points into the Network is ours.
    iface_index: the external interface when we install `<subnet> via <PublicIP>` there (host-gw,
      vxlan DirectRouting), else 0: only routes shaped like ours are ours (destination a whole lease
      subnet inside the Network, with a gateway).
    own_subnet: our lease, never touched (its route belongs to the container bridge).
    replace_index: an interface where a route shaped like ours is not ours, but is replaced when it is in
      the way of one we want to the same subnet (vxlan without DirectRouting: a route via a peer's PublicIP
      left by DirectRouting or host-gw; flanneld replaces it too).
    Also replaced when in the way, on any device but ours: a VTEP-shaped route (`<subnet> via <subnet>.0`,
    a shape no other software gives a route) that a vxlan backend with another VNI left on its old device
    (after a VNI change, or a switch to host-gw).
    """

    network: IPv4Network
    subnet_len: int
    own_subnet: IPv4Network | None
    vtep_index: int = 0
    iface_index: int = 0
    replace_index: int = 0

    def _in_network(self, dst: IPv4Network) -> bool:
        return dst.subnet_of(self.network) and dst != self.own_subnet

    def _lease_shaped_on(self, route: Route, ifindex: int) -> bool:
        return bool(ifindex and route.ifindex == ifindex and route.gateway is not None
                    and route.dst.prefixlen == self.subnet_len)

    def owns_route(self, route: Route) -> bool:
        if not self._in_network(route.dst) or route.proto == RTPROT_KERNEL:
            return False
        if self.vtep_index and route.ifindex == self.vtep_index:
            return True
        return self._lease_shaped_on(route, self.iface_index)

    def replaces_route(self, route: Route, wanted: Container[IPv4Network]) -> bool:
        """A route we do not own that stands where one of ours must go (`wanted`: their destinations)."""
        if not self._in_network(route.dst) or route.proto == RTPROT_KERNEL or route.dst not in wanted:
            return False
        vtep_shaped = (route.gateway == route.dst.network_address and route.dst.prefixlen == self.subnet_len
                       and route.ifindex != self.vtep_index)
        return vtep_shaped or self._lease_shaped_on(route, self.replace_index)

    def owns_neighbour(self, neigh: Neighbour) -> bool:
        return (
            bool(self.vtep_index)
            and neigh.ifindex == self.vtep_index
            and neigh.permanent
            and neigh.ip in self.network
            and (self.own_subnet is None or neigh.ip not in self.own_subnet)
        )

    def owns_fdb(self, entry: FdbEntry) -> bool:
        # The fdb dst is a public IP, outside the Network: on our device, every unicast entry is ours.
        return (
            bool(self.vtep_index) and entry.ifindex == self.vtep_index and entry.permanent
            and is_unicast_mac(entry.mac)
        )


def is_unicast_mac(mac: str) -> bool:
    first = int(mac.split(":", 1)[0], 16)
    return not first & 1 and mac != "00:00:00:00:00:00"


def plan(desired: KernelState, actual: KernelState, owner: Ownership) -> Plan:
    """Diff desired against actual: add what is missing, remove what we own and do not want."""
    actual_routes = set(actual.routes)
    wanted = {r.dst for r in desired.routes}
    del_routes = sorted((r for r in actual.routes if r not in desired.routes
                         and (owner.owns_route(r) or owner.replaces_route(r, wanted))), key=str)
    add_routes = sorted((r for r in desired.routes if r not in actual_routes), key=str)

    want_neigh = {n.key: n for n in desired.neighbours}
    have_neigh = {n.key: n for n in actual.neighbours}
    del_neigh = sorted(
        n for n in actual.neighbours
        if owner.owns_neighbour(n) and (n.key not in want_neigh or want_neigh[n.key].mac != n.mac)
    )
    add_neigh = sorted(
        n for n in desired.neighbours
        if n.key not in have_neigh or have_neigh[n.key].mac != n.mac or not have_neigh[n.key].permanent
    )

    have_fdb = {e: e for e in actual.fdb}
    del_fdb = sorted(e for e in actual.fdb if e not in desired.fdb and owner.owns_fdb(e))
    # A learned twin of a desired entry ages out: make it permanent.
    add_fdb = sorted(e for e in desired.fdb if e not in have_fdb or not have_fdb[e].permanent)
    return Plan(tuple(del_routes), tuple(del_neigh), tuple(del_fdb),
                tuple(add_routes), tuple(add_neigh), tuple(add_fdb))


def delta(before: KernelState, after: KernelState, owner: Ownership) -> Plan:
    """The change between what some leases asked for before and what they ask for now, without reading
    the kernel (lease events between full reconciles: O(changed leases), not O(all entries))."""
    after_neigh = {n.key: n for n in after.neighbours}
    return Plan(
        del_routes=tuple(sorted((r for r in before.routes - after.routes if owner.owns_route(r)), key=str)),
        del_neighbours=tuple(sorted(
            n for n in before.neighbours
            if owner.owns_neighbour(n) and (n.key not in after_neigh or after_neigh[n.key].mac != n.mac)
        )),
        del_fdb=tuple(sorted(e for e in before.fdb - after.fdb if owner.owns_fdb(e))),
        add_routes=tuple(sorted(after.routes - before.routes, key=str)),
        add_neighbours=tuple(sorted(after.neighbours - before.neighbours)),
        add_fdb=tuple(sorted(after.fdb - before.fdb)),
    )


# ---- desired state per backend ----


@dataclass(frozen=True)
class Skipped:
    """A remote lease we do not route, and why (logged once per lease and reason)."""

    subnet: IPv4Network
    reason: str
    detail: dict[str, str] = field(default_factory=dict)


def is_directly_connected(ip: IPv4Address, connected: Iterable[IPv4Network]) -> bool:
    return any(ip in net for net in connected)


def parse_vtep(lease: Lease) -> tuple[str, int | None] | None:
    """(VtepMAC lower case, VNI) from a vxlan lease's BackendData, or None when unusable."""
    data: Mapping[str, Any] = lease.attrs.backend_data or {}
    low = {str(k).lower(): v for k, v in data.items()}
    mac = low.get("vtepmac")
    if not isinstance(mac, str):
        return None
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        return None
    try:
        for p in parts:
            int(p, 16)
    except ValueError:
        return None
    if not is_unicast_mac(mac.lower()):
        return None  # the kernel refuses such an fdb entry: a route and neighbour alone would lead nowhere
    vni = low.get("vni")
    return mac.lower(), vni if isinstance(vni, int) and not isinstance(vni, bool) else None


def vtep_address(subnet: IPv4Network) -> IPv4Address:
    """The VTEP's inner address: the subnet's network address (flanneld puts `<subnet>.0/32` on flannel.N)."""
    return subnet.network_address


def _remote_leases(leases: Iterable[Lease], btype: str, own_subnet: IPv4Network | None,
                   own_ip: IPv4Address | None, skipped: list[Skipped]) -> Iterator[Lease]:
    """The leases a backend of type `btype` routes, in subnet order; the others go to `skipped` with why."""
    for lease in sorted(leases, key=lambda x: x.subnet):
        if lease.subnet == own_subnet:
            continue
        if lease.attrs.public_ip == own_ip:
            # An old lease of this host (or a misconfigured peer): routing it would loop back to us.
            skipped.append(Skipped(lease.subnet, "lease announces this host's own public IP",
                                   {"public_ip": str(own_ip)}))
            continue
        if lease.attrs.effective_backend != btype:
            skipped.append(Skipped(lease.subnet, "backend type mismatch",
                                   {"lease_backend": lease.attrs.effective_backend}))
            continue
        yield lease


def desired_vxlan(
    leases: Iterable[Lease],
    *,
    own_subnet: IPv4Network | None,
    own_ip: IPv4Address | None = None,
    vtep_index: int,
    iface_index: int,
    vni: int,
    direct_routing: bool,
    connected: Iterable[IPv4Network],
) -> tuple[KernelState, list[Skipped]]:
    """flanneld's vxlan programming for every remote vxlan lease."""
    connected = list(connected)
    routes: set[Route] = set()
    neighbours: set[Neighbour] = set()
    fdb: set[FdbEntry] = set()
    skipped: list[Skipped] = []
    via_vtep: list[tuple[Lease, str]] = []
    for lease in _remote_leases(leases, "vxlan", own_subnet, own_ip, skipped):
        vtep = parse_vtep(lease)
        if vtep is None:
            skipped.append(Skipped(lease.subnet, "BackendData has no valid VtepMAC",
                                   {"backend_data": repr(lease.attrs.backend_data)[:200]}))
            continue
        mac, lease_vni = vtep
        if lease_vni is not None and lease_vni != vni & 0xFFFF and lease_vni != vni:  # 16 bits in flanneld's
            skipped.append(Skipped(lease.subnet, "VNI mismatch",
                                   {"lease_vni": str(lease_vni), "our_vni": str(vni)}))
            continue
        public_ip = lease.attrs.public_ip
        if direct_routing and is_directly_connected(public_ip, connected):
            routes.add(Route(lease.subnet, public_ip, iface_index))
            continue
        via_vtep.append((lease, mac))
    # The fdb holds one destination per MAC: two leases announcing one VtepMAC (a host that changed its
    # PublicIP kept its device and took a new subnet; its old lease lives until its TTL) would overwrite each
    # other's entry at every resync. The newest lease (etcd create revision) is the host as it is now.
    newest: dict[str, Lease] = {}
    for lease, mac in via_vtep:
        if mac not in newest or (lease.created, lease.subnet) > (newest[mac].created, newest[mac].subnet):
            newest[mac] = lease
    for lease, mac in via_vtep:
        if newest[mac] is not lease:
            skipped.append(Skipped(lease.subnet, "another lease announces the same VtepMAC; the newest is routed",
                                   {"vtep_mac": mac, "routed": str(newest[mac].subnet)}))
            continue
        public_ip = lease.attrs.public_ip
        inner = vtep_address(lease.subnet)
        neighbours.add(Neighbour(inner, mac, vtep_index))
        fdb.add(FdbEntry(mac, public_ip, vtep_index))
        routes.add(Route(lease.subnet, inner, vtep_index, onlink=True))
    return KernelState(frozenset(routes), frozenset(neighbours), frozenset(fdb)), skipped


def desired_hostgw(
    leases: Iterable[Lease],
    *,
    own_subnet: IPv4Network | None,
    own_ip: IPv4Address | None = None,
    iface_index: int,
    connected: Iterable[IPv4Network],
) -> tuple[KernelState, list[Skipped]]:
    """flanneld's host-gw programming: `<subnet> via <PublicIP> dev <iface>` for every reachable peer."""
    connected = list(connected)
    routes: set[Route] = set()
    skipped: list[Skipped] = []
    for lease in _remote_leases(leases, "host-gw", own_subnet, own_ip, skipped):
        public_ip = lease.attrs.public_ip
        if not is_directly_connected(public_ip, connected):
            skipped.append(Skipped(
                lease.subnet, "peer is not on a directly connected network; host-gw needs layer 2 "
                "adjacency (use vxlan, or vxlan with DirectRouting)",
                {"public_ip": str(public_ip), "connected": ",".join(str(n) for n in connected)},
            ))
            continue
        routes.add(Route(lease.subnet, public_ip, iface_index))
    return KernelState(frozenset(routes)), skipped
