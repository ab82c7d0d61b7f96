"""Desired kernel state for vxlan / host-gw leases, and the diff against actual state (pure, no root)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from flannelpy.backend.netlink import Link, VxlanInfo, VxlanSpec
from flannelpy.backend.reconcile import (
    RTPROT_KERNEL,
    FdbEntry,
    KernelState,
    Neighbour,
    Ownership,
    Plan,
    Route,
    delta,
    desired_hostgw,
    desired_vxlan,
    parse_vtep,
    plan,
)
from flannelpy.backend.vxlan import device_incompatibility
from flannelpy.subnet.lease import Lease, LeaseAttrs

NET = IPv4Network("10.5.0.0/16")
OWN = IPv4Network("10.5.1.0/24")
VTEP, IFACE, BRIDGE = 7, 2, 5
LAN = [IPv4Network("10.99.0.0/24")]


def N(s: str) -> IPv4Network:
    return IPv4Network(s)


def A(s: str) -> IPv4Address:
    return IPv4Address(s)


def vx(subnet: str, ip: str, mac: str, vni: int | None = 1) -> Lease:
    data: dict[str, object] = {"VtepMAC": mac}
    if vni is not None:
        data["VNI"] = vni
    return Lease(N(subnet), LeaseAttrs(A(ip), backend_type="vxlan", backend_data=data))


def hg(subnet: str, ip: str) -> Lease:
    return Lease(N(subnet), LeaseAttrs(A(ip), backend_type="host-gw"))


def udp(subnet: str, ip: str) -> Lease:
    return Lease(N(subnet), LeaseAttrs(A(ip)))


def vxlan_state(leases: list[Lease], direct: bool = False) -> tuple[KernelState, list[str]]:
    state, skipped = desired_vxlan(leases, own_subnet=OWN, vtep_index=VTEP, iface_index=IFACE, vni=1,
                                   direct_routing=direct, connected=LAN)
    return state, [f"{s.subnet} {s.reason}" for s in skipped]


VX_OWNER = Ownership(NET, 24, OWN, vtep_index=VTEP)
HG_OWNER = Ownership(NET, 24, OWN, iface_index=IFACE)


# ---- desired state ----


def test_vxlan_desired_state_is_flanneld_programming() -> None:
    state, skipped = vxlan_state([vx("10.5.2.0/24", "10.99.0.2", "0A:00:00:00:00:02")])
    assert skipped == []
    assert state.routes == {Route(N("10.5.2.0/24"), A("10.5.2.0"), VTEP, onlink=True)}
    assert state.neighbours == {Neighbour(A("10.5.2.0"), "0a:00:00:00:00:02", VTEP)}
    assert state.fdb == {FdbEntry("0a:00:00:00:00:02", A("10.99.0.2"), VTEP)}


def test_vxlan_own_lease_is_never_routed() -> None:
    state, skipped = vxlan_state([vx(str(OWN), "10.99.0.1", "0a:00:00:00:00:01")])
    assert state == KernelState() and skipped == []


def test_lease_with_our_own_public_ip_is_not_routed() -> None:
    mine = A("10.99.0.1")
    state, skipped = desired_vxlan([vx("10.5.2.0/24", "10.99.0.1", "0a:00:00:00:00:02")], own_subnet=OWN,
                                   own_ip=mine, vtep_index=VTEP, iface_index=IFACE, vni=1,
                                   direct_routing=False, connected=LAN)
    assert state == KernelState() and [s.reason for s in skipped] == ["lease announces this host's own public IP"]
    state, skipped = desired_hostgw([hg("10.5.2.0/24", "10.99.0.1")], own_subnet=OWN, own_ip=mine,
                                    iface_index=IFACE, connected=LAN)
    assert state == KernelState() and len(skipped) == 1


def test_vxlan_ignores_other_backends_and_bad_backend_data() -> None:
    leases = [
        hg("10.5.3.0/24", "10.99.0.3"),
        udp("10.5.4.0/24", "10.99.0.4"),
        vx("10.5.5.0/24", "10.99.0.5", "not-a-mac"),
        Lease(N("10.5.6.0/24"), LeaseAttrs(A("10.99.0.6"), backend_type="vxlan")),
        vx("10.5.7.0/24", "10.99.0.7", "0a:00:00:00:00:07", vni=9),
        vx("10.5.8.0/24", "10.99.0.8", "0a:00:00:00:00:08", vni=None),  # no VNI: accepted
        # Not a unicast MAC: the kernel refuses the fdb entry, so the route would lead nowhere.
        vx("10.5.9.0/24", "10.99.0.9", "00:00:00:00:00:00"),
        vx("10.5.10.0/24", "10.99.0.10", "ff:ff:ff:ff:ff:ff"),
        vx("10.5.11.0/24", "10.99.0.11", "01:00:5e:00:00:01"),
    ]
    state, skipped = vxlan_state(leases)
    assert skipped == [
        "10.5.3.0/24 backend type mismatch",
        "10.5.4.0/24 backend type mismatch",
        "10.5.5.0/24 BackendData has no valid VtepMAC",
        "10.5.6.0/24 BackendData has no valid VtepMAC",
        "10.5.7.0/24 VNI mismatch",
        "10.5.9.0/24 BackendData has no valid VtepMAC",
        "10.5.10.0/24 BackendData has no valid VtepMAC",
        "10.5.11.0/24 BackendData has no valid VtepMAC",
    ]
    assert {r.dst for r in state.routes} == {N("10.5.8.0/24")}


def test_vxlan_direct_routing_only_for_directly_connected_peers() -> None:
    near = vx("10.5.2.0/24", "10.99.0.2", "0a:00:00:00:00:02")
    far = vx("10.5.3.0/24", "192.0.2.3", "0a:00:00:00:00:03")
    state, _ = vxlan_state([near, far], direct=True)
    assert state.routes == {
        Route(N("10.5.2.0/24"), A("10.99.0.2"), IFACE),
        Route(N("10.5.3.0/24"), A("10.5.3.0"), VTEP, onlink=True),
    }
    assert {n.ip for n in state.neighbours} == {A("10.5.3.0")}
    assert {e.dst for e in state.fdb} == {A("192.0.2.3")}


def test_hostgw_routes_reachable_peers_and_reports_the_rest() -> None:
    state, skipped = desired_hostgw(
        [hg("10.5.2.0/24", "10.99.0.2"), hg("10.5.3.0/24", "192.0.2.3"),
         vx("10.5.4.0/24", "10.99.0.4", "0a:00:00:00:00:04"), hg(str(OWN), "10.99.0.1")],
        own_subnet=OWN, iface_index=IFACE, connected=LAN,
    )
    assert state.routes == {Route(N("10.5.2.0/24"), A("10.99.0.2"), IFACE)}
    assert state.neighbours == frozenset() and state.fdb == frozenset()
    assert [(str(s.subnet), s.reason.split(";")[0]) for s in skipped] == [
        ("10.5.3.0/24", "peer is not on a directly connected network"),
        ("10.5.4.0/24", "backend type mismatch"),
    ]


def test_parse_vtep_is_case_insensitive_on_keys() -> None:
    lease = Lease(N("10.5.2.0/24"), LeaseAttrs(A("10.99.0.2"), backend_type="vxlan",
                                               backend_data={"vtepmac": "AA:bb:cc:dd:ee:ff", "vni": 1}))
    assert parse_vtep(lease) == ("aa:bb:cc:dd:ee:ff", 1)


# ---- diff ----


def test_plan_adds_missing_and_removes_only_owned_stale_entries() -> None:
    desired, _ = vxlan_state([vx("10.5.2.0/24", "10.99.0.2", "0a:00:00:00:00:02")])
    stale_route = Route(N("10.5.9.0/24"), A("10.5.9.0"), VTEP, onlink=True)
    foreign = [
        Route(N("172.16.0.0/24"), A("10.5.9.0"), VTEP, onlink=True),  # outside the Network
        Route(N("10.5.9.0/24"), A("10.99.0.9"), IFACE),  # other device (no DirectRouting)
        Route(N("10.5.1.0/24"), None, BRIDGE, proto=RTPROT_KERNEL),  # own subnet's bridge
        Route(N("10.5.1.0/24"), A("10.5.1.0"), VTEP, onlink=True),  # own subnet, even on the VTEP
        Route(N("0.0.0.0/0"), A("10.99.0.254"), IFACE),
    ]
    actual = KernelState(
        routes=frozenset([stale_route, *foreign]),
        neighbours=frozenset([
            Neighbour(A("10.5.9.0"), "0a:00:00:00:00:09", VTEP),
            Neighbour(A("10.5.10.0"), "0a:00:00:00:00:10", VTEP, permanent=False),  # learned, not ours
            Neighbour(A("10.99.0.9"), "0a:00:00:00:00:09", IFACE),
        ]),
        fdb=frozenset([
            FdbEntry("0a:00:00:00:00:09", A("10.99.0.9"), VTEP),
            FdbEntry("00:00:00:00:00:00", A("10.99.0.9"), VTEP),  # flooding entry someone added
            FdbEntry("0a:00:00:00:00:0b", A("10.99.0.11"), VTEP, permanent=False),  # learned by the kernel
        ]),
    )
    p = plan(desired, actual, VX_OWNER)
    assert p.del_routes == (stale_route,)
    assert p.del_neighbours == (Neighbour(A("10.5.9.0"), "0a:00:00:00:00:09", VTEP),)
    assert p.del_fdb == (FdbEntry("0a:00:00:00:00:09", A("10.99.0.9"), VTEP),)
    assert set(p.add_routes) == desired.routes
    assert set(p.add_neighbours) == desired.neighbours
    assert set(p.add_fdb) == desired.fdb


def test_plan_is_empty_when_kernel_matches() -> None:
    desired, _ = vxlan_state([vx("10.5.2.0/24", "10.99.0.2", "0a:00:00:00:00:02")])
    # A route read back from the kernel carries a metric and protocol; equal all the same.
    routes = {Route(r.dst, r.gateway, r.ifindex, r.onlink, priority=100, proto=4) for r in desired.routes}
    actual = KernelState(frozenset(routes), desired.neighbours, desired.fdb)
    assert plan(desired, actual, VX_OWNER).empty


def test_plan_replaces_changed_entries() -> None:
    desired, _ = vxlan_state([vx("10.5.2.0/24", "10.99.0.3", "0a:00:00:00:00:22")])
    actual = KernelState(
        routes=frozenset([Route(N("10.5.2.0/24"), A("10.5.2.0"), VTEP, onlink=False)]),
        neighbours=frozenset([Neighbour(A("10.5.2.0"), "0a:00:00:00:00:02", VTEP)]),
        fdb=frozenset([FdbEntry("0a:00:00:00:00:02", A("10.99.0.2"), VTEP)]),
    )
    p = plan(desired, actual, VX_OWNER)
    assert p.del_routes == (Route(N("10.5.2.0/24"), A("10.5.2.0"), VTEP),)
    assert p.add_routes == (Route(N("10.5.2.0/24"), A("10.5.2.0"), VTEP, onlink=True),)
    assert p.del_neighbours == (Neighbour(A("10.5.2.0"), "0a:00:00:00:00:02", VTEP),)
    assert p.add_neighbours == (Neighbour(A("10.5.2.0"), "0a:00:00:00:00:22", VTEP),)
    assert p.del_fdb == (FdbEntry("0a:00:00:00:00:02", A("10.99.0.2"), VTEP),)
    assert p.add_fdb == (FdbEntry("0a:00:00:00:00:22", A("10.99.0.3"), VTEP),)


def test_hostgw_ownership_is_lease_shaped_gateway_routes_on_the_iface() -> None:
    desired, _ = desired_hostgw([hg("10.5.2.0/24", "10.99.0.2")], own_subnet=OWN, iface_index=IFACE,
                                connected=LAN)
    stale = Route(N("10.5.9.0/24"), A("10.99.0.9"), IFACE)
    kept = [
        Route(N("10.5.9.0/25"), A("10.99.0.9"), IFACE),  # not a whole lease subnet
        Route(N("10.5.8.0/24"), None, IFACE),  # no gateway: not a host-gw route
        Route(N("10.5.7.0/24"), A("10.99.0.7"), BRIDGE),  # another device
        Route(N("192.168.0.0/24"), A("10.99.0.9"), IFACE),  # outside the Network
        Route(N("10.99.0.0/24"), None, IFACE, proto=RTPROT_KERNEL),
    ]
    p = plan(desired, KernelState(frozenset([stale, *kept])), HG_OWNER)
    assert p.del_routes == (stale,)
    assert p.add_routes == (Route(N("10.5.2.0/24"), A("10.99.0.2"), IFACE),)


def test_vxlan_replaces_a_route_via_the_public_ip_only_where_it_blocks_one_of_ours() -> None:
    # Left by DirectRouting (or host-gw) before: without it, the VTEP route to that subnet could not be added.
    desired, _ = vxlan_state([vx("10.5.2.0/24", "10.99.0.2", "02:00:00:00:00:02")])
    blocking = Route(N("10.5.2.0/24"), A("10.99.0.2"), IFACE)
    kept = [
        Route(N("10.5.77.0/24"), A("10.99.0.2"), IFACE),  # no lease of ours wants 10.5.77.0/24: not ours
        Route(N("10.5.2.0/25"), A("10.99.0.2"), IFACE),  # not a whole lease subnet
        Route(N("10.5.2.0/24"), A("10.99.0.2"), BRIDGE),  # another device
    ]
    owner = Ownership(NET, 24, OWN, vtep_index=VTEP, replace_index=IFACE)
    p = plan(desired, KernelState(frozenset([blocking, *kept])), owner)
    assert p.del_routes == (blocking,)
    assert p.add_routes == (Route(N("10.5.2.0/24"), A("10.5.2.0"), VTEP, onlink=True),)
    assert plan(desired, KernelState(frozenset([blocking])), Ownership(NET, 24, OWN, vtep_index=VTEP)).del_routes == ()


def test_a_vtep_route_left_on_another_device_makes_way_for_ours() -> None:
    # flannel.1 of a VNI no longer in use (VNI changed, or the host switched to host-gw) still holds
    # `<subnet> via <subnet>.0 onlink` routes: the kernel refuses ours to the same subnet while they stand.
    old_vtep = 9
    left = Route(N("10.5.2.0/24"), A("10.5.2.0"), old_vtep, onlink=True)
    unwanted = Route(N("10.5.3.0/24"), A("10.5.3.0"), old_vtep, onlink=True)  # no lease of ours wants it now
    foreign = Route(N("10.5.2.0/24"), A("10.5.2.1"), BRIDGE)  # another shape: not flannel's
    desired, _ = vxlan_state([vx("10.5.2.0/24", "10.99.0.2", "02:00:00:00:00:02")])
    p = plan(desired, KernelState(frozenset([left, unwanted])), VX_OWNER)
    assert p.del_routes == (left,)
    assert plan(desired, KernelState(frozenset([foreign])), VX_OWNER).del_routes == ()
    hostgw, _ = desired_hostgw([hg("10.5.2.0/24", "10.99.0.2")], own_subnet=OWN, iface_index=IFACE, connected=LAN)
    assert plan(hostgw, KernelState(frozenset([left, unwanted])), HG_OWNER).del_routes == (left,)


def test_two_leases_with_one_vtep_mac_route_the_newest_only() -> None:
    # A host changed its PublicIP: same device (MAC), a new subnet; its old lease lives until its TTL.
    old = dataclasses.replace(vx("10.5.2.0/24", "10.99.0.2", "02:00:00:00:00:02"), created=10)
    new = dataclasses.replace(vx("10.5.9.0/24", "10.99.0.9", "02:00:00:00:00:02"), created=20)
    for order in ([old, new], [new, old]):
        state, skipped = vxlan_state(order)
        assert state.fdb == {FdbEntry("02:00:00:00:00:02", A("10.99.0.9"), VTEP)}
        assert {r.dst for r in state.routes} == {N("10.5.9.0/24")}
        assert skipped == ["10.5.2.0/24 another lease announces the same VtepMAC; the newest is routed"]


def test_delta_programs_only_what_changed() -> None:
    old_lease = vx("10.5.2.0/24", "10.99.0.2", "0a:00:00:00:00:02")
    new_lease = vx("10.5.2.0/24", "10.99.0.2", "0a:00:00:00:00:22")  # the host rebooted: new VTEP MAC
    before, _ = vxlan_state([old_lease])
    after, _ = vxlan_state([new_lease])
    d = delta(before, after, VX_OWNER)
    assert d.del_routes == () and d.add_routes == ()  # the route does not change
    assert d.del_neighbours == (Neighbour(A("10.5.2.0"), "0a:00:00:00:00:02", VTEP),)
    assert d.add_neighbours == (Neighbour(A("10.5.2.0"), "0a:00:00:00:00:22", VTEP),)
    assert d.del_fdb == (FdbEntry("0a:00:00:00:00:02", A("10.99.0.2"), VTEP),)
    assert d.add_fdb == (FdbEntry("0a:00:00:00:00:22", A("10.99.0.2"), VTEP),)
    gone = delta(before, KernelState(), VX_OWNER)
    assert set(gone.del_routes) == before.routes and set(gone.del_fdb) == before.fdb
    assert set(gone.del_neighbours) == before.neighbours and not gone.add_routes
    assert delta(after, after, VX_OWNER).empty


# ---- property: applying a plan converges, and never touches what is not ours ----


def apply_plan(actual: KernelState, p: Plan) -> KernelState:
    """What the kernel holds after execute_plan (replace semantics: one neighbour per key)."""
    routes = set(actual.routes) - set(p.del_routes)
    for r in p.add_routes:  # route add: fails (EEXIST) while any route holds the destination
        if not any(x.dst == r.dst for x in routes):
            routes.add(r)
    neigh = {n.key: n for n in actual.neighbours if n not in p.del_neighbours}
    for n in p.add_neighbours:  # neighbour replace
        neigh[n.key] = n
    fdb = {e: e for e in actual.fdb if e not in p.del_fdb}
    for e in p.add_fdb:  # fdb replace
        fdb.pop(e, None)
        fdb[e] = e
    return KernelState(frozenset(routes), frozenset(neigh.values()), frozenset(fdb))


subnets = st.integers(min_value=1, max_value=12).map(lambda i: N(f"10.5.{i}.0/24"))
outside = st.integers(min_value=1, max_value=5).map(lambda i: N(f"172.16.{i}.0/24"))
macs = st.integers(min_value=1, max_value=6).map(lambda i: f"0a:00:00:00:00:{i:02x}")
peer_ips = st.integers(min_value=1, max_value=6).map(lambda i: A(f"10.99.0.{i}"))
ifindexes = st.sampled_from([VTEP, IFACE, BRIDGE])
leases = st.builds(
    lambda s, ip, mac, kind: vx(str(s), str(ip), mac) if kind == "vxlan" else hg(str(s), str(ip)),
    subnets, peer_ips, macs, st.sampled_from(["vxlan", "host-gw"]),
)
routes_st = st.builds(
    lambda dst, gw, idx, onlink: Route(dst, gw, idx, onlink),
    st.one_of(subnets, outside), st.one_of(st.none(), peer_ips, subnets.map(lambda n: n.network_address)),
    ifindexes, st.booleans(),
)
neigh_st = st.builds(lambda s, mac, idx, perm: Neighbour(s.network_address, mac, idx, perm),
                     subnets, macs, ifindexes, st.booleans())
fdb_st = st.builds(FdbEntry, macs, peer_ips, ifindexes, st.booleans())


@settings(max_examples=200, deadline=None)
@given(
    lease_list=st.lists(leases, max_size=6, unique_by=lambda x: x.subnet),
    actual_routes=st.lists(routes_st, max_size=8, unique_by=lambda r: (r.dst, r.ifindex)),
    actual_neigh=st.lists(neigh_st, max_size=6, unique_by=lambda n: n.key),
    actual_fdb=st.lists(fdb_st, max_size=6),
    direct=st.booleans(),
    backend=st.sampled_from(["vxlan", "host-gw"]),
)
def test_plan_converges_and_spares_foreign_entries(
    lease_list: list[Lease], actual_routes: list[Route], actual_neigh: list[Neighbour],
    actual_fdb: list[FdbEntry], direct: bool, backend: str,
) -> None:
    if backend == "vxlan":
        desired, _ = vxlan_state(lease_list, direct=direct)
        owner = Ownership(NET, 24, OWN, vtep_index=VTEP, iface_index=IFACE if direct else 0)
    else:
        desired, _ = desired_hostgw(lease_list, own_subnet=OWN, iface_index=IFACE, connected=LAN)
        owner = HG_OWNER
    actual = KernelState(frozenset(actual_routes), frozenset(actual_neigh), frozenset(actual_fdb))
    after = apply_plan(actual, plan(desired, actual, owner))
    # Everything desired is there (but a route never displaces one that is not ours), and nothing of
    # ours that is not desired survives.
    blocked = {r.dst for r in actual.routes if not owner.owns_route(r) and r not in desired.routes}
    assert {r for r in desired.routes if r.dst not in blocked} <= after.routes
    assert desired.neighbours <= after.neighbours
    assert desired.fdb <= after.fdb
    assert not any(owner.owns_route(r) for r in after.routes - desired.routes)
    assert not any(owner.owns_neighbour(n) for n in after.neighbours - desired.neighbours)
    assert not any(owner.owns_fdb(e) for e in after.fdb - desired.fdb)
    after_fdb = {e: e for e in after.fdb}
    assert all(after_fdb[e].permanent for e in desired.fdb)  # a learned twin was made permanent
    # Routes that are not ours are all still there; other entries unless replaced in place.
    for r in actual.routes:
        if not owner.owns_route(r):
            assert r in after.routes
    desired_neigh_keys = {n.key for n in desired.neighbours}
    for n in actual.neighbours:
        if not owner.owns_neighbour(n) and n.key not in desired_neigh_keys:
            assert n in after.neighbours
    # A second round has nothing left to do but retry the blocked routes.
    again = plan(desired, after, owner)
    assert {r.dst for r in again.add_routes} <= blocked
    assert dataclasses.replace(again, add_routes=()).empty


# ---- the VTEP device ----


def link(kind: str | None = "vxlan", **vx_over: object) -> Link:
    info = dict(vni=1, local=A("10.99.0.1"), link=IFACE, port=8472, learning=False, gbp=False)
    info.update(vx_over)
    return Link(index=VTEP, name="flannel.1", kind=kind, mac="0a:00:00:00:00:01", mtu=1450, up=True,
                vxlan=VxlanInfo(**info) if kind == "vxlan" else None)  # type: ignore[arg-type]


SPEC = VxlanSpec("flannel.1", 1, A("10.99.0.1"), IFACE)


def test_compatible_device_is_reused() -> None:
    assert device_incompatibility(link(), SPEC) is None
    assert device_incompatibility(link(link=0), SPEC) is None  # no underlying device given: fine


def test_incompatible_device_reasons() -> None:
    assert "VNI 7" in str(device_incompatibility(link(vni=7), SPEC))
    assert "local address 10.99.0.9" in str(device_incompatibility(link(local=A("10.99.0.9")), SPEC))
    assert "destination port 4789" in str(device_incompatibility(link(port=4789), SPEC))
    assert "learning on" in str(device_incompatibility(link(learning=True), SPEC))
    assert "GBP on" in str(device_incompatibility(link(gbp=True), SPEC))
    assert "type veth" in str(device_incompatibility(link(kind="veth"), SPEC))
    spec4789 = VxlanSpec("flannel.1", 1, A("10.99.0.1"), IFACE, port=4789)
    assert device_incompatibility(link(port=4789), spec4789) is None
    assert "destination port 8472" in str(device_incompatibility(link(), spec4789))


def test_a_vni_above_16_bits_meets_flanneld_s_16_bit_lease_field() -> None:
    # flanneld writes uint16(VNI) into BackendData and cannot read more: with VNI 70000 its leases say 4464,
    # and so do ours (VxlanBackend.lease_attrs); either must be routed by a node with VNI 70000.
    leases = [vx("10.5.2.0/24", "10.99.0.2", "02:00:00:00:00:02", vni=70000 & 0xFFFF),
              vx("10.5.3.0/24", "10.99.0.3", "02:00:00:00:00:03", vni=70000),
              vx("10.5.4.0/24", "10.99.0.4", "02:00:00:00:00:04", vni=4465)]
    state, skipped = desired_vxlan(leases, own_subnet=OWN, vtep_index=VTEP, iface_index=IFACE, vni=70000,
                                   direct_routing=False, connected=LAN)
    assert {r.dst for r in state.routes} == {N("10.5.2.0/24"), N("10.5.3.0/24")}
    assert [(str(s.subnet), s.reason) for s in skipped] == [("10.5.4.0/24", "VNI mismatch")]
