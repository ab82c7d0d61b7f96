"""The udp backend's packet core: every verdict, against both implementations, plus a differential test.

`impl` is flannelpy.packet (the Python reference) or fastpath.core (compiled); both must behave alike.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpath.core as compiled
import flannelpy.packet as reference

IMPLS = [pytest.param(reference, id="python"), pytest.param(compiled, id="compiled")]

NET = int(IPv4Address("10.10.0.0"))
A = int(IPv4Address("10.10.1.0"))  # our subnet (not in the table)
B = int(IPv4Address("10.10.2.0"))
C = int(IPv4Address("10.10.3.0"))
PEER_B = int(IPv4Address("192.168.0.2"))
PEER_C = int(IPv4Address("192.168.0.3"))
STRANGER = int(IPv4Address("192.168.0.66"))
MTU = 1472


def ip(text: str) -> int:
    return int(IPv4Address(text))


def csum(data: bytes | bytearray) -> int:
    return reference.checksum(data)


def ipv4(src: str, dst: str, payload: bytes = b"\0" * 8, *, ttl: int = 64, proto: int = 17,
         frag: int = 0, options: bytes = b"", total: int | None = None, version: int = 4) -> bytearray:
    ihl = 5 + len(options) // 4
    length = ihl * 4 + len(payload) if total is None else total
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, length, 0x1234, frag, ttl, proto, 0,
                                IPv4Address(src).packed, IPv4Address(dst).packed) + options)
    hdr[10:12] = csum(hdr).to_bytes(2, "big")
    return hdr + payload


def header_valid(pkt: bytes | bytearray) -> bool:
    ihl = (pkt[0] & 15) * 4
    return csum(pkt[:ihl]) == 0


def make(impl: ModuleType, mtu: int = MTU) -> tuple[Any, Any]:
    table = impl.RouteTable(NET, 16, 24)
    table.set(B, PEER_B)
    table.set(C, PEER_C)
    return table, impl.PacketCore(table, mtu)


def name(impl: ModuleType, index: int) -> str:
    return str(impl.counter_name(index))


# --- route table -----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_route_table_set_lookup_remove(impl: ModuleType) -> None:
    t = impl.RouteTable(NET, 16, 24)
    assert len(t) == 0 and t.capacity == 256
    t.set(B, PEER_B)
    assert t.lookup(ip("10.10.2.77")) == PEER_B
    assert t.lookup(ip("10.10.3.77")) == 0
    assert t.lookup(ip("10.11.2.77")) == 0  # outside the network
    assert len(t) == 1
    t.set(B, PEER_C)  # the lease moved to another host
    assert t.lookup(ip("10.10.2.1")) == PEER_C and len(t) == 1
    t.remove(B)
    assert t.lookup(ip("10.10.2.1")) == 0 and len(t) == 0
    t.remove(B)  # removing an empty slot is fine
    assert len(t) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_route_table_changing_one_slot_leaves_the_others(impl: ModuleType) -> None:
    t = impl.RouteTable(NET, 16, 24)
    for i in range(1, 256):
        t.set(NET + (i << 8), ip("172.16.0.0") + i)
    t.set(NET + (7 << 8), ip("172.16.9.9"))
    t.remove(NET + (9 << 8))
    for i in range(1, 256):
        want = {7: ip("172.16.9.9"), 9: 0}.get(i, ip("172.16.0.0") + i)
        assert t.lookup(NET + (i << 8) + 5) == want
    assert len(t) == 254
    t.clear()
    assert len(t) == 0 and t.lookup(NET + (7 << 8)) == 0 and not t.is_peer(ip("172.16.9.9"))


@pytest.mark.parametrize("impl", IMPLS)
def test_route_table_knows_current_peers(impl: ModuleType) -> None:
    t = impl.RouteTable(NET, 16, 24)
    t.set(B, PEER_B)
    t.set(C, PEER_B)  # one host, two leases
    assert t.is_peer(PEER_B) and not t.is_peer(PEER_C)
    t.remove(B)
    assert t.is_peer(PEER_B)
    t.set(C, PEER_C)
    assert not t.is_peer(PEER_B) and t.is_peer(PEER_C)


@pytest.mark.parametrize("impl", IMPLS)
def test_route_table_peer_set_survives_churn(impl: ModuleType) -> None:
    # Thousands of hosts coming and going: the compiled set recycles deleted entries in place.
    t = impl.RouteTable(ip("10.0.0.0"), 8, 24)
    for round_ in range(6):
        for i in range(3000):
            t.set(ip("10.0.0.0") + (i << 8), ip("100.64.0.0") + round_ * 5000 + i)
        assert t.is_peer(ip("100.64.0.0") + round_ * 5000 + 2999)
        if round_:
            assert not t.is_peer(ip("100.64.0.0") + (round_ - 1) * 5000 + 5)
    for i in range(3000):
        t.remove(ip("10.0.0.0") + (i << 8))
    assert len(t) == 0 and not t.is_peer(ip("100.64.0.0") + 5 * 5000 + 7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("args", "problem"), [
    ((ip("10.10.0.1"), 16, 24), "host bits"),
    ((NET, 16, 42), "subnet length"),
    ((ip("10.0.0.0"), 4, 30), "2**24"),
    ((0, 0, 0), "subnet length >= 1"),  # one slot for every address: a shift by 32 in C
])
def test_route_table_rejects_bad_shapes(impl: ModuleType, args: tuple[int, int, int], problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("*", r"\*")):
        impl.RouteTable(*args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("subnet", "peer", "problem"), [
    (ip("10.11.2.0"), PEER_B, "outside the network"),
    (ip("10.10.2.128"), PEER_B, "boundary"),
    (B, 0, "unicast"),
    (B, 0xFFFFFFFF, "unicast"),
    (B, 1 << 32, "IPv4 address"),
    (-1, PEER_B, "IPv4 address"),
])
def test_route_table_rejects_bad_routes(impl: ModuleType, subnet: int, peer: int, problem: str) -> None:
    t = impl.RouteTable(NET, 16, 24)
    with pytest.raises(ValueError, match=problem):
        t.set(subnet, peer)
    assert len(t) == 0


# --- encap: TUN -> UDP -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_encap_forwards_to_the_peer_with_ttl_decremented(impl: ModuleType) -> None:
    _, core = make(impl)
    pkt = ipv4("10.10.1.2", "10.10.2.3", b"hello world!", ttl=64)
    before = bytes(pkt)
    verdict, peer = core.encap(pkt, bytearray(impl.ICMP_REPLY_MAX))
    assert (verdict, peer) == (impl.FORWARD, PEER_B)
    assert pkt[8] == 63
    assert header_valid(pkt)
    # The incremental update gives what a full recomputation gives.
    redo = bytearray(pkt[:20])
    redo[10:12] = b"\0\0"
    assert pkt[10:12] == csum(redo).to_bytes(2, "big")
    assert pkt[:8] == before[:8] and pkt[9] == before[9] and pkt[12:] == before[12:]
    c = core.counters()
    assert c["encap_packets"] == 1 and c["encap_bytes"] == len(pkt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("check", [0x0000, 0x0001, 0xFEFF, 0xFF00, 0xFFFE, 0xFFFF])
def test_encap_checksum_update_at_the_edges(impl: ModuleType, check: int) -> None:
    # Pick the identification field so the original checksum lands on each awkward value.
    _, core = make(impl)
    pkt = ipv4("10.10.1.2", "10.10.2.3", ttl=200)
    pkt[4:6] = b"\0\0"
    pkt[10:12] = b"\0\0"
    base = 0xFFFF - csum(pkt[:20])  # ones'-complement sum of the header with id=0
    ident = (0xFFFF - check - base) % 0xFFFF
    pkt[4:6] = ident.to_bytes(2, "big")
    pkt[10:12] = csum(pkt[:20]).to_bytes(2, "big")
    if check == 0xFFFF:
        pkt[10:12] = b"\xff\xff"  # -0: the other encoding of a zero checksum, also valid
    assert pkt[10:12] == check.to_bytes(2, "big") and header_valid(pkt)
    verdict, _ = core.encap(pkt, bytearray(impl.ICMP_REPLY_MAX))
    assert verdict == impl.FORWARD and pkt[8] == 199 and header_valid(pkt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("ttl", "forwarded"), [(0, False), (1, False), (2, True), (255, True)])
def test_encap_drops_when_ttl_would_reach_zero(impl: ModuleType, ttl: int, forwarded: bool) -> None:
    _, core = make(impl)
    pkt = ipv4("10.10.1.2", "10.10.2.3", ttl=ttl)
    verdict, value = core.encap(pkt, bytearray(impl.ICMP_REPLY_MAX))
    if forwarded:
        assert verdict == impl.FORWARD and pkt[8] == ttl - 1 and header_valid(pkt)
    else:
        assert verdict == impl.DROP and name(impl, value) == "encap_drop_ttl_expired"
        assert core.counters()["encap_drop_ttl_expired"] == 1


def _bad_packets() -> list[tuple[str, bytearray]]:
    good = ipv4("10.10.1.2", "10.10.2.3", b"x" * 12)
    short = bytearray(good[:19])
    v6 = bytearray(good)
    v6[0] = 0x65
    ihl4 = bytearray(good)
    ihl4[0] = 0x44
    ihl_long = bytearray(good[:24])
    ihl_long[0] = 0x47  # 28-byte header in a 24-byte packet
    ihl_long[2:4] = (24).to_bytes(2, "big")
    too_long = ipv4("10.10.1.2", "10.10.2.3", b"x" * 12, total=40)
    too_short = ipv4("10.10.1.2", "10.10.2.3", b"x" * 12, total=30)
    below_header = ipv4("10.10.1.2", "10.10.2.3", b"x" * 12, total=16)
    return [("short", short), ("not_ipv4", v6), ("bad_header", ihl4), ("bad_header", ihl_long),
            ("bad_length", too_long), ("bad_length", too_short), ("bad_length", below_header)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("reason", "pkt"), _bad_packets(), ids=lambda v: v if isinstance(v, str) else "")
def test_encap_drops_malformed_packets(impl: ModuleType, reason: str, pkt: bytearray) -> None:
    _, core = make(impl)
    before = bytes(pkt)
    verdict, value = core.encap(pkt, bytearray(impl.ICMP_REPLY_MAX))
    assert verdict == impl.DROP and name(impl, value) == f"encap_drop_{reason}"
    assert bytes(pkt) == before
    assert core.counters()[f"encap_drop_{reason}"] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_encap_drops_destinations_outside_the_network(impl: ModuleType) -> None:
    _, core = make(impl)
    verdict, value = core.encap(ipv4("10.10.1.2", "8.8.8.8"), bytearray(impl.ICMP_REPLY_MAX))
    assert verdict == impl.DROP and name(impl, value) == "encap_drop_outside_network"
    assert core.counters()["icmp_unreachable_sent"] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [b"", b"\x01\x01\x01\x00", b"\x01" * 40])
def test_encap_no_lease_answers_icmp_net_unreachable(impl: ModuleType, options: bytes) -> None:
    _, core = make(impl)
    pkt = ipv4("10.10.1.2", "10.10.9.9", b"ABCDEFGHIJKLMNOP", options=options, ttl=17)
    original = bytes(pkt)
    reply = bytearray(impl.ICMP_REPLY_MAX)
    verdict, n = core.encap(pkt, reply)
    assert verdict == impl.ICMP
    icmp = bytes(reply[:n])
    ihl = 20 + len(options)
    quote = original[: ihl + 8]
    assert n == 20 + 8 + len(quote)
    # IPv4 header: valid checksum, ICMP, sourced from the unreachable destination, to the sender.
    assert icmp[0] == 0x45 and int.from_bytes(icmp[2:4], "big") == n and icmp[9] == 1 and icmp[8] == 64
    assert csum(icmp[:20]) == 0
    assert icmp[12:16] == IPv4Address("10.10.9.9").packed and icmp[16:20] == IPv4Address("10.10.1.2").packed
    # ICMP: type 3 code 0, valid checksum, unused word zero, quotes the original header + 8 bytes.
    assert icmp[20] == 3 and icmp[21] == 0 and icmp[24:28] == b"\0\0\0\0"
    assert csum(icmp[20:]) == 0
    assert icmp[28:] == quote
    assert bytes(pkt) == original  # the offending packet is not rewritten
    c = core.counters()
    assert c["icmp_unreachable_sent"] == 1 and c["encap_drop_no_route"] == 1 and c["encap_packets"] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_encap_icmp_quotes_short_packets_whole(impl: ModuleType) -> None:
    _, core = make(impl)
    pkt = ipv4("10.10.1.2", "10.10.9.9", b"abc")
    reply = bytearray(impl.ICMP_REPLY_MAX)
    verdict, n = core.encap(pkt, reply)
    assert verdict == impl.ICMP and n == 28 + 23 and bytes(reply[28:n]) == bytes(pkt)
    assert csum(reply[20:n]) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("what", "kwargs", "src"), [
    *((f"icmp error type {t}", {"proto": 1, "payload": bytes([t, 0]) + b"\0" * 6}, "10.10.1.2")
      for t in (3, 4, 5, 11, 12)),
    *((f"icmp unknown type {t}", {"proto": 1, "payload": bytes([t, 0]) + b"\0" * 6}, "10.10.1.2")
      for t in (1, 2, 6, 7, 19, 255)),
    ("icmp without a type byte", {"proto": 1, "payload": b""}, "10.10.1.2"),
    ("non-first fragment", {"frag": 185}, "10.10.1.2"),
    ("non-first fragment, DF|MF bits", {"frag": 0x6000 | 1}, "10.10.1.2"),
    ("source 0.0.0.0", {}, "0.0.0.0"),
    ("loopback source", {}, "127.0.0.1"),
    ("multicast source", {}, "224.0.0.5"),
    ("broadcast source", {}, "255.255.255.255"),
])
def test_encap_no_icmp_for_icmp_fragments_or_bad_sources(impl: ModuleType, what: str, kwargs: dict[str, Any],
                                                          src: str) -> None:
    _, core = make(impl)
    reply = bytearray(impl.ICMP_REPLY_MAX)
    verdict, value = core.encap(ipv4(src, "10.10.9.9", **kwargs), reply)
    assert verdict == impl.DROP and name(impl, value) == "encap_drop_no_route", what
    assert reply == bytearray(impl.ICMP_REPLY_MAX)
    assert core.counters()["icmp_unreachable_sent"] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("icmp_type", [8, 0, 13, 17])  # echo request and reply, timestamp, address mask
def test_encap_icmp_queries_get_net_unreachable_as_from_linux(impl: ModuleType, icmp_type: int) -> None:
    # flanneld answers no ICMP at all, so `ping` to a subnet without a lease just times out; Linux answers
    # queries and never errors, and ping then prints "Destination Net Unreachable".
    _, core = make(impl)
    pkt = ipv4("10.10.1.2", "10.10.9.9", bytes([icmp_type, 0]) + b"\0" * 6, proto=1)
    reply = bytearray(impl.ICMP_REPLY_MAX)
    verdict, n = core.encap(pkt, reply)
    assert verdict == impl.ICMP and reply[20] == 3 and reply[21] == 0 and bytes(reply[28:n]) == bytes(pkt)


@pytest.mark.parametrize("impl", IMPLS)
def test_encap_first_fragment_still_gets_icmp(impl: ModuleType) -> None:
    _, core = make(impl)
    verdict, _ = core.encap(ipv4("10.10.1.2", "10.10.9.9", frag=0x2000), bytearray(impl.ICMP_REPLY_MAX))
    assert verdict == impl.ICMP  # MF set, offset 0


@pytest.mark.parametrize("impl", IMPLS)
def test_encap_route_changes_take_effect_at_once(impl: ModuleType) -> None:
    table, core = make(impl)
    reply = bytearray(impl.ICMP_REPLY_MAX)
    assert core.encap(ipv4("10.10.1.2", "10.10.9.9"), reply)[0] == impl.ICMP
    table.set(ip("10.10.9.0"), PEER_C)
    assert core.encap(ipv4("10.10.1.2", "10.10.9.9"), reply) == (impl.FORWARD, PEER_C)
    table.remove(ip("10.10.9.0"))
    assert core.encap(ipv4("10.10.1.2", "10.10.9.9"), reply)[0] == impl.ICMP


@pytest.mark.parametrize("impl", IMPLS)
def test_encap_rejects_bad_buffers(impl: ModuleType) -> None:
    _, core = make(impl)
    with pytest.raises(ValueError, match="reply buffer"):
        core.encap(ipv4("10.10.1.2", "10.10.2.3"), bytearray(20))
    with pytest.raises(ValueError, match="length"):
        core.encap(ipv4("10.10.1.2", "10.10.2.3"), bytearray(impl.ICMP_REPLY_MAX), 500)


# --- decap: UDP -> TUN -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_decap_delivers_from_the_lease_holder(impl: ModuleType) -> None:
    _, core = make(impl)
    pkt = ipv4("10.10.2.3", "10.10.1.2", b"payload!", ttl=63)
    verdict, n = core.decap(pkt, PEER_B)
    assert (verdict, n) == (impl.DELIVER, len(pkt))
    assert pkt[8] == 62 and header_valid(pkt)
    c = core.counters()
    assert c["decap_packets"] == 1 and c["decap_bytes"] == len(pkt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("src", "sender", "reason"), [
    ("10.10.2.3", STRANGER, "unknown_sender"),  # a host without a lease
    ("10.10.2.3", PEER_C, "spoofed_source"),  # a lease holder, but not this subnet's
    ("10.10.9.3", PEER_B, "spoofed_source"),  # a subnet nobody holds
    ("8.8.8.8", PEER_B, "spoofed_source"),  # outside the network
    ("10.10.1.5", PEER_B, "spoofed_source"),  # claims to come from our own subnet
])
def test_decap_drops_spoofed_and_unknown_senders(impl: ModuleType, src: str, sender: int, reason: str) -> None:
    _, core = make(impl)
    pkt = ipv4(src, "10.10.1.2")
    before = bytes(pkt)
    verdict, value = core.decap(pkt, sender)
    assert verdict == impl.DROP and name(impl, value) == f"decap_drop_{reason}"
    assert bytes(pkt) == before
    c = core.counters()
    assert c[f"decap_drop_{reason}"] == 1 and c["decap_packets"] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dst", ["10.99.0.1", "10.10.2.3", "8.8.8.8", "127.0.0.1"])
def test_decap_delivers_only_what_is_addressed_to_our_subnet(impl: ModuleType, dst: str) -> None:
    # A lease holder (or anyone who can send from its address) aimed inner packets at the host's own
    # addresses (etcd, the kubelet, with an overlay source) or at other networks through our forwarding.
    # A peer's data path only ever sends us what its routes send to our subnet.
    _, core = make(impl)
    assert core.decap(ipv4("10.10.2.3", dst), PEER_B)[0] == impl.DELIVER  # not set yet: no check
    core.set_own_subnet(int(IPv4Address("10.10.1.0")), 24)
    verdict, value = core.decap(ipv4("10.10.2.3", dst), PEER_B)
    assert verdict == impl.DROP and name(impl, value) == "decap_drop_wrong_destination"
    assert core.decap(ipv4("10.10.2.3", "10.10.1.2"), PEER_B)[0] == impl.DELIVER
    assert core.counters()["decap_drop_wrong_destination"] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_decap_sender_check_follows_route_changes(impl: ModuleType) -> None:
    table, core = make(impl)
    table.remove(B)
    assert core.decap(ipv4("10.10.2.3", "10.10.1.2"), PEER_B)[0] == impl.DROP
    table.set(B, PEER_B)
    assert core.decap(ipv4("10.10.2.3", "10.10.1.2"), PEER_B)[0] == impl.DELIVER


@pytest.mark.parametrize("impl", IMPLS)
def test_decap_drops_truncated_and_padded_datagrams(impl: ModuleType) -> None:
    _, core = make(impl)
    truncated = ipv4("10.10.2.3", "10.10.1.2", b"x" * 100)[:60]  # says 128 bytes, carries 60
    v, value = core.decap(truncated, PEER_B)
    assert v == impl.DROP and name(impl, value) == "decap_drop_truncated"
    padded = ipv4("10.10.2.3", "10.10.1.2", b"x" * 10) + b"\0" * 6  # two packets' worth would look so
    v, value = core.decap(padded, PEER_B)
    assert v == impl.DROP and name(impl, value) == "decap_drop_bad_length"


@pytest.mark.parametrize("impl", IMPLS)
def test_decap_drops_oversized_datagrams(impl: ModuleType) -> None:
    _, core = make(impl, mtu=1000)
    assert core.decap(ipv4("10.10.2.3", "10.10.1.2", b"x" * 980), PEER_B)[0] == impl.DELIVER  # exactly 1000
    big = ipv4("10.10.2.3", "10.10.1.2", b"x" * 981)
    v, value = core.decap(big, PEER_B)
    assert v == impl.DROP and name(impl, value) == "decap_drop_oversized"
    # The receive buffer held only part of it: the loop passes the real length.
    v, value = core.decap(big[:1001], PEER_B, 70000)
    assert v == impl.DROP and name(impl, value) == "decap_drop_oversized"
    assert core.counters()["decap_drop_oversized"] == 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("ttl", "delivered"), [(0, False), (1, False), (2, True)])
def test_decap_ttl(impl: ModuleType, ttl: int, delivered: bool) -> None:
    _, core = make(impl)
    pkt = ipv4("10.10.2.3", "10.10.1.2", ttl=ttl)
    verdict, value = core.decap(pkt, PEER_B)
    if delivered:
        assert verdict == impl.DELIVER and pkt[8] == ttl - 1 and header_valid(pkt)
    else:
        assert verdict == impl.DROP and name(impl, value) == "decap_drop_ttl_expired"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("reason", "pkt"), _bad_packets()[:4], ids=lambda v: v if isinstance(v, str) else "")
def test_decap_drops_malformed_packets(impl: ModuleType, reason: str, pkt: bytearray) -> None:
    _, core = make(impl)
    verdict, value = core.decap(pkt, PEER_B)
    assert verdict == impl.DROP and name(impl, value) == f"decap_drop_{reason}"


@pytest.mark.parametrize("impl", IMPLS)
def test_counters_name_every_reason(impl: ModuleType) -> None:
    _, core = make(impl)
    c = core.counters()
    assert list(c) == list(reference.COUNTERS) == list(compiled.COUNTERS)
    assert all(v == 0 for v in c.values())
    core.count(impl.ENCAP_DROP_SEND_ERROR, 3)
    assert core.counters()["encap_drop_send_error"] == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_core_rejects_bad_mtu(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="mtu"):
        impl.PacketCore(impl.RouteTable(NET, 16, 24), 40)


# --- the two implementations agree ------------------------------------------------------------------

ADDRS = st.sampled_from(["10.10.1.2", "10.10.2.3", "10.10.3.4", "10.10.9.9", "10.10.255.255", "8.8.8.8",
                         "0.0.0.0", "224.0.0.1", "10.11.0.1"])


@st.composite
def packets(draw: st.DrawFn) -> bytearray:
    if draw(st.integers(0, 9)) == 0:
        return bytearray(draw(st.binary(max_size=120)))  # anything at all
    options = b"\x01" * 4 * draw(st.integers(0, 10))
    pkt = ipv4(draw(ADDRS), draw(ADDRS), draw(st.binary(max_size=80)), ttl=draw(st.integers(0, 255)),
               proto=draw(st.sampled_from([1, 6, 17, 47])), frag=draw(st.sampled_from([0, 0x2000, 0x4000, 1, 185])),
               options=options)
    # Occasionally corrupt one byte of the header (version, IHL, length, checksum, ...).
    if draw(st.booleans()):
        i = draw(st.integers(0, min(len(pkt), 24) - 1))
        pkt[i] = draw(st.integers(0, 255))
    if draw(st.integers(0, 5)) == 0:
        pkt = pkt[: draw(st.integers(0, len(pkt)))]
    return pkt


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pkt=packets(), sender=st.sampled_from([PEER_B, PEER_C, STRANGER]),
       mtu=st.sampled_from([68, 100, 1472]))
def test_compiled_core_matches_the_reference(pkt: bytearray, sender: int, mtu: int) -> None:
    results = []
    for impl in (reference, compiled):
        _, core = make(impl, mtu=mtu)
        enc = bytearray(pkt)
        reply = bytearray(impl.ICMP_REPLY_MAX)
        e = core.encap(enc, reply)
        dec = bytearray(pkt)
        d = core.decap(dec, sender)
        results.append((e, bytes(enc), bytes(reply), d, bytes(dec), core.counters()))
    assert results[0] == results[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_are_refused_alike_by_both_cores(impl: ModuleType) -> None:
    # The compiled core is built without bounds checks: what it does not check itself would read anywhere.
    table, core = make(impl)
    for index in (len(impl.COUNTERS), -1):
        with pytest.raises(IndexError, match="out of range"):
            impl.counter_name(index)
        with pytest.raises(IndexError, match="out of range"):
            core.count(index)
    for call in (lambda: table.lookup(1 << 32), lambda: table.contains(-1), lambda: table.is_peer(1 << 32),
                 lambda: core.decap(bytearray(40), -1)):
        with pytest.raises(ValueError, match="not an IPv4 address"):
            call()
    assert impl.counter_name(0) == "encap_packets" and sum(core.counters().values()) == 0
