"""The compiled loops with offloads on, between in-memory nodes (no root): a fake TUN that carries a
virtio_net_hdr as flannel0 with IFF_VNET_HDR does, and real UDP sockets on loopback with UDP GSO/GRO.

A test hands node A a TCP super-packet as the kernel would with TSO, and checks what a flanneld peer
(a plain UDP socket) receives: one IPv4 packet per datagram, each at most the MTU, checksums valid;
and what node B writes into its TUN: the same bytes, coalesced again.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath import offload
from flannelpy.backend.udp.fake import FakeNode, free_port
from tests.unit.test_offload import ACK, FIN, PSH, ip_checksum_ok, ref_split, tcp_checksum_ok, tcp_packet, vnet_fields

NET = IPv4Network("10.10.0.0/16")
MTU = 1472
MSS = MTU - 40


def tso_vnet(gso_size: int = MSS) -> bytes:
    # What tun gives for a TSO packet: hdr_len is the linear part's length, not to be trusted.
    return offload.vnet_header(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 128, gso_size, 20, 16)


def node(subnet: str, public_ip: str, port: int, threads: int = 2) -> FakeNode:
    return FakeNode("compiled", NET, 24, IPv4Network(subnet), public_ip, port, mtu=MTU, offload=True,
                    threads=threads)


@pytest.fixture(params=[2, 1], ids=["2threads", "1thread"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[FakeNode, FakeNode]]:
    port = free_port("127.0.0.2", "127.0.0.3")
    a = node("10.10.1.0/24", "127.0.0.2", port, request.param)
    b = node("10.10.2.0/24", "127.0.0.3", port, request.param)
    a.route(b)
    b.route(a)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
    assert not a.errors and not b.errors


@pytest.fixture
def towards_flanneld() -> Iterator[tuple[FakeNode, socket.socket]]:
    """Node A, and a plain UDP socket (no GRO) standing for a flanneld peer that holds 10.10.4.0/24."""
    port = free_port("127.0.0.2", "127.0.0.4")
    a = node("10.10.1.0/24", "127.0.0.2", port)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.4", port))
    peer.settimeout(2)
    a.table.set(int(IPv4Address("10.10.4.0")), int(IPv4Address("127.0.0.4")))
    try:
        yield a, peer
    finally:
        a.stop()
        peer.close()
    assert not a.errors


def test_offloads_are_on(pair: tuple[FakeNode, FakeNode]) -> None:
    a, _ = pair
    assert a.offloads.describe() == "tso,gso,gro" and a.tun.vnet_hdr


def test_a_super_packet_reaches_a_flanneld_peer_as_mtu_size_packets(
        towards_flanneld: tuple[FakeNode, socket.socket]) -> None:
    a, peer = towards_flanneld
    payload = bytes(range(256)) * 200
    pkt = tcp_packet(payload, dst="10.10.4.3", flags=ACK | PSH)
    a.tun.inject(pkt, tso_vnet())
    want = ref_split(pkt, MSS)
    got = []
    for _ in want:
        data, (src, sport) = peer.recvfrom(65536)
        assert (src, sport) == ("127.0.0.2", a.port)
        got.append(data)
    for g, w in zip(got, want, strict=True):
        # Exactly one IPv4 packet per datagram, no bigger than the MTU, checksums valid, one hop less.
        assert len(g) == int.from_bytes(g[2:4], "big") <= MTU
        assert ip_checksum_ok(g) and tcp_checksum_ok(g)
        assert g[8] == w[8] - 1 and g[12:] == w[12:] and g[:8] == w[:8]
    c = a.core.counters()
    assert c["encap_packets"] == len(want) and c["encap_bytes"] == sum(len(w) for w in want)


def test_a_partial_checksum_is_completed_before_sending(towards_flanneld: tuple[FakeNode, socket.socket]) -> None:
    a, peer = towards_flanneld
    pkt = bytearray(tcp_packet(b"checksum me", dst="10.10.4.3", check=False))
    pseudo = pkt[12:20] + b"\0\x06" + (len(pkt) - 20).to_bytes(2, "big")
    from tests.unit.test_packet_core import csum
    pkt[36:38] = (~csum(pseudo) & 0xFFFF).to_bytes(2, "big")
    a.tun.inject(bytes(pkt), offload.vnet_header(offload.F_NEEDS_CSUM, 0, 0, 0, 20, 16))
    data = peer.recv(65536)
    assert tcp_checksum_ok(data) and data.endswith(b"checksum me")


def test_a_stream_of_super_packets_crosses_and_is_coalesced_again(pair: tuple[FakeNode, FakeNode]) -> None:
    a, b = pair
    seq = 1
    stream = bytes((i * 31) & 0xFF for i in range(400_000))
    for k in range(0, len(stream), 60_000):
        chunk = stream[k:k + 60_000]
        a.tun.inject(tcp_packet(chunk, seq=seq + k, flags=ACK | PSH), tso_vnet())
    received = bytearray()
    writes = []
    while len(received) < len(stream):
        pkt = b.tun.receive()
        assert pkt is not None, f"stream stopped after {len(received)} bytes"
        flags, gso_type, hdr_len, gso_size, start, offset = vnet_fields(b.tun.last_vnet)
        assert ip_checksum_ok(pkt) and int.from_bytes(pkt[2:4], "big") == len(pkt)
        if gso_type:
            assert (flags, gso_type, hdr_len, gso_size, start, offset) == (1, 1, 40, MSS, 20, 16)
            assert tcp_checksum_ok(offload.complete_checksum(pkt, start, offset))
        else:
            assert tcp_checksum_ok(pkt) and len(pkt) <= MTU
        assert int.from_bytes(pkt[24:28], "big") == seq + len(received)  # in order, nothing lost
        assert pkt[8] == 62  # one hop at each end
        received += pkt[40:]
        writes.append(len(pkt))
    assert bytes(received) == stream
    assert max(writes) > MTU  # coalesced
    nseg = -(-60_000 // MSS) * 6 + -(-40_000 // MSS)
    assert a.core.counters()["encap_packets"] == nseg and b.core.counters()["decap_packets"] == nseg


def test_segments_from_a_flanneld_peer_are_coalesced(pair: tuple[FakeNode, FakeNode]) -> None:
    _, b = pair
    segments = ref_split(tcp_packet(bytes(20 * MSS), flags=ACK | FIN), MSS)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        # One sendmsg, one datagram per segment on the wire (UDP GSO): they arrive together.
        s.sendmsg([b"".join(segments)], [(17, 103, struct.pack("=H", len(segments[0])))], 0,
                  ("127.0.0.3", b.port))
    pkt = b.tun.receive()
    assert pkt is not None and vnet_fields(b.tun.last_vnet)[1] == offload.GSO_TCPV4
    assert len(pkt) == 40 + 20 * MSS and pkt[33] == ACK | FIN and pkt[40:] == bytes(20 * MSS)
    assert b.core.counters()["decap_packets"] == 20


def test_segments_with_a_damaged_ip_header_reach_the_tun_as_they_came(pair: tuple[FakeNode, FakeNode]) -> None:
    # As with offloads off: each is written alone and the kernel drops it, none is hidden in a super-packet.
    _, b = pair
    segments = []
    for s_ in ref_split(tcp_packet(bytes(4 * MSS)), MSS):
        bad = bytearray(s_)
        bad[10] ^= 0x5A
        segments.append(bytes(bad))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        s.sendmsg([b"".join(segments)], [(17, 103, struct.pack("=H", len(segments[0])))], 0, ("127.0.0.3", b.port))
    written = [b.tun.receive() for _ in segments]
    assert all(p is not None and len(p) == 40 + MSS and not ip_checksum_ok(p) for p in written)
    assert vnet_fields(b.tun.last_vnet)[1] == offload.GSO_NONE and b.tun.receive(0.2) is None


def test_ingress_checks_hold_for_every_coalesced_datagram(pair: tuple[FakeNode, FakeNode]) -> None:
    _, b = pair
    spoofed = ref_split(tcp_packet(bytes(5 * MSS), src="10.10.9.9"), MSS)
    good = ref_split(tcp_packet(b"g" * (3 * MSS), seq=77), MSS)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        for batch in (spoofed, good):
            s.sendmsg([b"".join(batch)], [(17, 103, struct.pack("=H", len(batch[0])))], 0, ("127.0.0.3", b.port))
    pkt = b.tun.receive()
    assert pkt is not None and pkt[40:] == b"g" * (3 * MSS)
    assert b.tun.receive(0.2) is None
    c = b.core.counters()
    assert c["decap_drop_spoofed_source"] == 5 and c["decap_packets"] == 3


def test_no_lease_answers_every_segment_with_icmp_as_without_offloads(pair: tuple[FakeNode, FakeNode]) -> None:
    a, _ = pair
    pkt = tcp_packet(bytes(3 * MSS), dst="10.10.77.7")
    a.tun.inject(pkt, tso_vnet())
    replies = [a.tun.receive() for _ in range(3)]
    for r, s in zip(replies, ref_split(pkt, MSS), strict=True):
        assert r is not None and r[9] == 1 and r[20:22] == b"\x03\x00"
        assert r[28:48] == s[:20] and r[48:56] == s[20:28]  # quotes that segment's header
        assert a.tun.last_vnet == bytes(offload.VNET_LEN)
    c = a.core.counters()
    assert c["icmp_unreachable_sent"] == 3 and c["encap_drop_no_route"] == 3 and c["encap_packets"] == 0


def test_ttl_expiry_and_oversized_segments_are_counted(pair: tuple[FakeNode, FakeNode]) -> None:
    a, b = pair
    a.tun.inject(tcp_packet(bytes(4 * MSS), ttl=1), tso_vnet())
    a.tun.inject(tcp_packet(bytes(4 * MSS)), tso_vnet(MSS + 1))  # segments one byte over the MTU
    a.tun.inject(tcp_packet(b"marker"))
    got = b.tun.receive()
    assert got is not None and got.endswith(b"marker")
    c = a.core.counters()
    assert c["encap_drop_ttl_expired"] == 4 and c["encap_drop_bad_length"] == 1 and c["encap_packets"] == 1


def test_a_super_packet_of_tiny_segments_is_split_in_full(pair: tuple[FakeNode, FakeNode]) -> None:
    a, b = pair
    a.tun.inject(tcp_packet(bytes(60_000)), tso_vnet(7))  # 8572 segments: more headers than one wake holds
    a.tun.inject(tcp_packet(b"marker", seq=99))
    for _ in range(10_000):  # runs of coalesced segments (some may be lost in b's socket buffer), then it
        pkt = b.tun.receive()
        assert pkt is not None, "the marker never arrived"
        if pkt.endswith(b"marker"):
            break
    else:
        raise AssertionError("the marker never arrived")
    assert a.core.counters()["encap_packets"] == -(-60_000 // 7) + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=3000), flags=st.integers(0, 255), gso_type=st.integers(0, 255),
       gso_size=st.integers(0, 2000), start=st.integers(0, 3000), offset=st.integers(0, 3000))
def test_any_virtio_header_and_packet_from_the_tun_is_handled(pair: tuple[FakeNode, FakeNode], data: bytes,
                                                              flags: int, gso_type: int, gso_size: int,
                                                              start: int, offset: int) -> None:
    a, b = pair
    a.tun.inject(data, offload.vnet_header(flags, gso_type, 0, gso_size, start, offset))
    marker = tcp_packet(b"still alive")
    a.tun.inject(marker)
    for _ in range(100):
        got = b.tun.receive()
        assert got is not None, "the data path stopped"
        if got.endswith(b"still alive"):
            break
    assert not a.errors and not b.errors


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=30),
       size=st.integers(1, 1500), spoof=st.booleans())
def test_every_datagram_of_a_gro_buffer_is_delivered_or_counted(pair: tuple[FakeNode, FakeNode],
                                                                segments: list[bytes], size: int,
                                                                spoof: bool) -> None:
    _, b = pair
    blob = b"".join(s.ljust(size, b"\0")[:size] for s in segments)
    if not spoof:  # inner sources in the sender's subnet, so some pass the ingress checks
        blob = b"".join(bytes([0x45]) + blob[k + 1:k + 12] + IPv4Address("10.10.1.9").packed + blob[k + 16:k + size]
                        if size >= 20 else blob[k:k + size] for k in range(0, len(blob), size))
    before = b.core.counters()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        s.sendmsg([blob], [(17, 103, struct.pack("=H", size))] if len(blob) > size else [], 0, ("127.0.0.3", b.port))
    want = -(-len(blob) // size)
    for _ in range(200):
        c = b.core.counters()
        seen = sum(c[k] - before[k] for k in c if k == "decap_packets" or k.startswith("decap_drop_"))
        if seen >= want:
            break
        while b.tun.receive(0.01) is not None:
            pass
    assert seen == want
    assert not b.errors
