"""The offload helpers (fastpath/offload.h through fastpath.offload): TSO split, GRO coalescing and
checksums, against a pure-Python reference written from the rules (RFC 791/793/1071, virtio-net).

Every checksum is verified with the reference checksum of tests/unit/test_packet_core.py, never with
the C code under test.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import offload
from tests.unit.test_packet_core import csum

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
DF = 0x4000
VNET = offload.VNET_LEN


def tcp_checksum_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4
    seg = pkt[ihl:int.from_bytes(pkt[2:4], "big")]
    pseudo = pkt[12:20] + b"\0\x06" + len(seg).to_bytes(2, "big")
    return csum(pseudo + seg) == 0


def ip_checksum_ok(pkt: bytes) -> bool:
    return csum(pkt[:(pkt[0] & 15) * 4]) == 0


def tcp_packet(payload: bytes, *, seq: int = 1000, ack: int = 5000, flags: int = ACK, ip_id: int = 0x1234,
               options: bytes = b"", ip_options: bytes = b"", frag: int = DF, ttl: int = 64, tos: int = 0,
               window: int = 512, src: str = "10.10.1.2", dst: str = "10.10.2.3", sport: int = 40000,
               dport: int = 5201, check: bool = True) -> bytes:
    """An IPv4/TCP packet with valid checksums (or a TCP checksum of 0 when check is False)."""
    thl = 20 + len(options)
    ihl = 20 + len(ip_options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, (thl // 4) << 4, flags,
                                window, 0, 0) + options + payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + len(tcp), ip_id, frag, ttl, 6, 0,
                               IPv4Address(src).packed, IPv4Address(dst).packed) + ip_options)
    ip[10:12] = csum(ip).to_bytes(2, "big")
    if check:
        pseudo = ip[12:20] + b"\0\x06" + len(tcp).to_bytes(2, "big")
        tcp[16:18] = csum(pseudo + tcp).to_bytes(2, "big")
    return bytes(ip + tcp)


def ref_split(pkt: bytes, gso: int) -> list[bytes]:
    """TCP segmentation as Linux does it (tcp_gso_segment): ID + i, seq + offset, CWR on the first only,
    FIN/PSH on the last only, both checksums recomputed."""
    ihl = (pkt[0] & 15) * 4
    thl = (pkt[ihl + 12] >> 4) * 4
    hl = ihl + thl
    payload = pkt[hl:]
    n = max(1, -(-len(payload) // gso))
    ip_id = int.from_bytes(pkt[4:6], "big")
    seq = int.from_bytes(pkt[ihl + 4:ihl + 8], "big")
    out = []
    for i in range(n):
        chunk = payload[i * gso:(i + 1) * gso]
        h = bytearray(pkt[:hl])
        h[2:4] = (hl + len(chunk)).to_bytes(2, "big")
        h[4:6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
        h[10:12] = b"\0\0"
        h[10:12] = csum(h[:ihl]).to_bytes(2, "big")
        h[ihl + 4:ihl + 8] = ((seq + i * gso) & 0xFFFFFFFF).to_bytes(4, "big")
        if i > 0:
            h[ihl + 13] &= ~CWR & 0xFF
        if i < n - 1:
            h[ihl + 13] &= ~(FIN | PSH) & 0xFF
        h[ihl + 16:ihl + 18] = b"\0\0"
        pseudo = h[12:20] + b"\0\x06" + (thl + len(chunk)).to_bytes(2, "big")
        h[ihl + 16:ihl + 18] = csum(bytes(pseudo) + bytes(h[ihl:]) + chunk).to_bytes(2, "big")
        out.append(bytes(h) + chunk)
    return out


def vnet_fields(data: bytes) -> tuple[int, int, int, int, int, int]:
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", data[:VNET])
    return flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


# --- checksums ---------------------------------------------------------------------------------------


@given(st.binary(max_size=3000))
def test_fast_sum_is_the_internet_checksum(data: bytes) -> None:
    if data:
        assert ~offload.checksum_sum(data) & 0xFFFF == csum(data)


def test_partial_tcp_checksum_is_completed() -> None:
    pkt = bytearray(tcp_packet(b"hello world!", check=False))
    pseudo = pkt[12:20] + b"\0\x06" + (len(pkt) - 20).to_bytes(2, "big")
    s = (~csum(pseudo)) & 0xFFFF  # what the kernel leaves in the field: the folded pseudo-header sum
    pkt[36:38] = s.to_bytes(2, "big")
    done = offload.complete_checksum(bytes(pkt), 20, 16)
    assert tcp_checksum_ok(done) and done[:36] == pkt[:36] and done[38:] == pkt[38:]


def test_partial_udp_checksum_of_zero_is_sent_as_ffff() -> None:
    # A UDP payload chosen so that the checksum comes out 0: RFC 768 sends that as 0xFFFF.
    body = bytearray(struct.pack("!HHHH", 1, 2, 12, 0) + b"\0\0\0\0")
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 32, 0, 0, 64, 17, 0, bytes(4), bytes(4)))
    pseudo = bytes(8) + b"\0\x11" + (12).to_bytes(2, "big")
    rest = ~csum(pseudo + bytes(body)) & 0xFFFF  # the sum so far
    body[8:10] = (0xFFFF - rest).to_bytes(2, "big")  # makes the full sum 0xFFFF, its complement 0
    pkt = ip + body
    pkt[26:28] = (~csum(pseudo) & 0xFFFF).to_bytes(2, "big")
    done = offload.complete_checksum(bytes(pkt), 20, 6)
    assert done[26:28] == b"\xff\xff"
    assert csum(pseudo + done[20:]) == 0


def test_partial_checksum_outside_the_packet_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        offload.complete_checksum(tcp_packet(b""), 20, 30)


# --- TSO split -------------------------------------------------------------------------------------

flags_st = st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | PSH | FIN, ACK | CWR | PSH, ACK | ECE])
options_st = st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8)), b"\x01" * 40])


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 65535 - 100), gso=st.integers(1, 1460), flags=flags_st, options=options_st,
       seq=st.integers(0, 2**32 - 1), ip_id=st.integers(0, 0xFFFF), ip_options=st.sampled_from([b"", b"\x01" * 8]))
def test_split_matches_the_reference_and_every_checksum_verifies(size: int, gso: int, flags: int, options: bytes,
                                                                 seq: int, ip_id: int, ip_options: bytes) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(size))
    pkt = tcp_packet(payload, seq=seq, flags=flags, ip_id=ip_id, options=options, ip_options=ip_options)
    if -(-size // gso) > 2000:
        gso = -(-size // 2000)
    segments = offload.tso_split(pkt, gso)
    assert segments == ref_split(pkt, gso)
    assert b"".join(s[len(s) - min(gso, len(s) - (len(pkt) - size)):] for s in segments if len(s) > len(pkt) - size) \
        == payload
    for s in segments:
        assert ip_checksum_ok(s) and tcp_checksum_ok(s)
        assert int.from_bytes(s[2:4], "big") == len(s) <= len(pkt) - size + gso


def test_split_keeps_fin_and_psh_for_the_last_segment_and_cwr_for_the_first() -> None:
    pkt = tcp_packet(bytes(3000), flags=ACK | PSH | FIN | CWR, seq=2**32 - 100)
    first, middle, last = offload.tso_split(pkt, 1000)
    assert first[33] == ACK | CWR and middle[33] == ACK and last[33] == ACK | PSH | FIN
    assert [int.from_bytes(s[24:28], "big") for s in (first, middle, last)] == [2**32 - 100, 900, 1900]  # wraps
    assert [int.from_bytes(s[4:6], "big") for s in (first, middle, last)] == [0x1234, 0x1235, 0x1236]


@pytest.mark.parametrize(("pkt", "gso_type", "reason"), [
    (b"\x45" * 10, offload.GSO_TCPV4, 0),                                  # shorter than an IPv4 header
    (b"\x65" + bytes(39), offload.GSO_TCPV4, 1),                           # IPv6 version nibble
    (tcp_packet(bytes(100))[:-1], offload.GSO_TCPV4, 3),                   # total length disagrees
    (tcp_packet(bytes(100), frag=0x2000), offload.GSO_TCPV4, 2),           # a fragment
    (tcp_packet(bytes(100)), 4, 2),                                        # TCPv6 GSO on an IPv4 packet
])
def test_split_refuses_what_it_cannot_segment_with_the_core_drop_reason(pkt: bytes, gso_type: int,
                                                                        reason: int) -> None:
    with pytest.raises(offload.OffloadError) as e:
        offload.tso_split(pkt, 100, gso_type)
    assert e.value.reason == reason


# --- GRO ---------------------------------------------------------------------------------------------


def check_coalesced(out: list[bytes], segments: list[bytes]) -> None:
    """Each output is a lone segment as received, or a super-packet whose split is the next segments."""
    i = 0
    for item in out:
        flags, gso_type, hdr_len, gso_size, start, offset = vnet_fields(item)
        pkt = item[VNET:]
        if gso_type == offload.GSO_NONE:
            assert (flags, hdr_len, gso_size, start, offset) == (0, 0, 0, 0, 0)
            assert pkt == segments[i]
            i += 1
            continue
        assert gso_type & 0x7F == offload.GSO_TCPV4 and flags == offload.F_NEEDS_CSUM
        assert (start, offset) == (20, 16) and hdr_len == 20 + (pkt[32] >> 4) * 4
        assert bool(gso_type & 0x80) == bool(pkt[33] & CWR)
        assert ip_checksum_ok(pkt) and int.from_bytes(pkt[2:4], "big") == len(pkt) <= 65535
        full = offload.complete_checksum(pkt, start, offset)  # what the kernel does with NEEDS_CSUM
        assert tcp_checksum_ok(full)
        parts = ref_split(full, gso_size)
        assert len(parts) > 1
        for p in parts:
            want = segments[i]
            # The IP ID (and so the IP checksum) is the kernel's to choose again when it resegments.
            assert p[:4] == want[:4] and p[6:10] == want[6:10] and p[12:] == want[12:]
            i += 1
    assert i == len(segments)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 130_000), gso=st.integers(500, 1460), flags=flags_st, options=options_st)
def test_coalescing_a_split_stream_gives_it_back(size: int, gso: int, flags: int, options: bytes) -> None:
    payload = bytes((i * 13) & 0xFF for i in range(size))
    segments = ref_split(tcp_packet(payload, flags=flags, options=options, seq=7), gso) if size <= 60000 else \
        [s for k in range(0, size, 60000)
         for s in ref_split(tcp_packet(payload[k:k + 60000], flags=ACK, options=options, seq=7 + k), gso)]
    out = offload.gro_coalesce(segments)
    check_coalesced(out, segments)
    if size > gso and flags & (PSH | FIN) == 0:
        assert len(out) < len(segments)  # it did coalesce


def test_a_burst_of_full_segments_becomes_one_super_packet() -> None:
    segments = ref_split(tcp_packet(bytes(range(256)) * 200, flags=ACK | PSH), 1400)
    (out,) = offload.gro_coalesce(segments)
    flags, gso_type, hdr_len, gso_size, start, offset = vnet_fields(out)
    assert (flags, gso_type, hdr_len, gso_size, start, offset) == (1, 1, 40, 1400, 20, 16)
    pkt = out[VNET:]
    assert len(pkt) == 40 + 51200 and pkt[40:] == bytes(range(256)) * 200 and pkt[33] == ACK | PSH


def seg(seq: int, data: bytes = b"x" * 100, **kw: object) -> bytes:
    return tcp_packet(data, seq=seq, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("second", "why"), [
    (seg(1200), "a gap in the sequence"),
    (seg(1100, sport=40001), "another flow"),
    (seg(1100, dst="10.10.2.4"), "another destination"),
    (seg(1100, ack=5001), "another ack"),
    (seg(1100, window=100), "another window"),
    (seg(1100, ttl=63), "another TTL"),
    (seg(1100, tos=4), "another TOS"),
    (seg(1100, flags=ACK | URG), "urgent data"),
    (seg(1100, flags=ACK | CWR), "CWR"),
    (seg(1100, flags=ACK | ECE), "other flags"),
    (seg(1100, options=b"\x01\x01\x08\x0a" + bytes(8)), "other options"),
    (seg(1100, data=b"x" * 101), "more data than the first"),
    (seg(1100, frag=0), "no DF"),
    (seg(1100, ip_options=b"\x01" * 4), "IP options"),
    (seg(1100, check=False), "a bad checksum"),
    (seg(1100, data=b""), "no data"),
])
def test_segments_that_do_not_continue_the_run_are_kept_apart(second: bytes, why: str) -> None:
    first = seg(1000)
    out = offload.gro_coalesce([first, second])
    assert [o[VNET:] for o in out] == [first, second], why
    assert all(vnet_fields(o)[1] == offload.GSO_NONE for o in out)


def test_a_corrupted_segment_is_written_alone_for_the_kernel_to_drop() -> None:
    good = [seg(1000 + 100 * i) for i in range(6)]
    bad = bytearray(good[3])
    bad[60] ^= 0xFF  # payload damaged, checksum not updated
    out = offload.gro_coalesce([*good[:3], bytes(bad), *good[4:]])
    assert [vnet_fields(o)[1] for o in out] == [1, 0, 1]  # [0, 1, 2], 3 alone, [4, 5]
    assert out[1][VNET:] == bytes(bad)
    check_coalesced([out[0], out[2]], good[:3] + good[4:])


def damaged_ip_header(pkt: bytes) -> bytes:
    bad = bytearray(pkt)
    bad[10] ^= 0x5A  # the IP header checksum no longer verifies; the transport checksum still does
    return bytes(bad)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_packet_with_a_damaged_ip_header_is_written_alone_for_the_kernel_to_drop(proto: str) -> None:
    # A super-packet's IP header is rebuilt from its first packet's: a damaged one inside it would pass.
    if proto == "tcp":
        good = [seg(1000 + 100 * i) for i in range(5)]
    else:
        good = [udp_packet(bytes([i]) * 100) for i in range(5)]
    pkts = [*good[:2], damaged_ip_header(good[2]), *good[3:]]
    out = offload.gro_coalesce(pkts)
    assert [o[VNET:] for o in out][1] == pkts[2] and len(out) == 3
    assert [vnet_fields(o)[1] != offload.GSO_NONE for o in out] == [True, False, True]
    assert offload.gro_coalesce([damaged_ip_header(p) for p in good]) == [
        offload.vnet_header() + damaged_ip_header(p) for p in good]


def test_psh_or_fin_ends_a_run_and_a_short_segment_too() -> None:
    segs = [seg(1000), seg(1100, flags=ACK | PSH), seg(1200), seg(1300, data=b"y" * 50), seg(1350)]
    out = offload.gro_coalesce(segs)
    assert len(out) == 3
    assert out[0][VNET + 33] == ACK | PSH and int.from_bytes(out[0][VNET + 2:VNET + 4], "big") == 240
    assert int.from_bytes(out[1][VNET + 2:VNET + 4], "big") == 40 + 150
    assert out[2][VNET:] == segs[4]


def test_a_run_stops_below_64_kb() -> None:
    segs = ref_split(tcp_packet(bytes(65000)), 1000) + ref_split(tcp_packet(bytes(10000), seq=1000 + 65000), 1000)
    out = offload.gro_coalesce(segs)
    assert all(len(o) - VNET <= 65535 for o in out) and len(out) == 2
    check_coalesced(out, segs)


def test_non_tcp_packets_pass_alone() -> None:
    udp = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, DF, 64, 17, 0, bytes(4), bytes(4)) + bytes(8))
    out = offload.gro_coalesce([bytes(udp), bytes(udp)])
    assert [o[VNET:] for o in out] == [bytes(udp)] * 2


def udp_packet(payload: bytes, *, sport: int = 4000, dport: int = 7778, src: str = "10.10.1.2",
               dst: str = "10.10.2.3", ttl: int = 64, frag: int = DF, check: bool = True) -> bytes:
    udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 7, frag, ttl, 17, 0,
                               IPv4Address(src).packed, IPv4Address(dst).packed))
    ip[10:12] = csum(ip).to_bytes(2, "big")
    if check:
        pseudo = ip[12:20] + b"\0\x11" + len(udp).to_bytes(2, "big")
        udp[6:8] = (csum(pseudo + udp) or 0xFFFF).to_bytes(2, "big")
    return bytes(ip + udp)


def test_equal_udp_datagrams_of_one_flow_become_one_udp_super_packet() -> None:
    datagrams = [udp_packet(bytes([i]) * 1000) for i in range(10)] + [udp_packet(b"end")]
    (out,) = offload.gro_coalesce(datagrams)
    flags, gso_type, hdr_len, gso_size, start, offset = vnet_fields(out)
    assert (flags, gso_type, hdr_len, gso_size, start, offset) == (1, 5, 28, 1000, 20, 6)  # GSO_UDP_L4
    pkt = offload.complete_checksum(out[VNET:], start, offset)
    assert ip_checksum_ok(pkt) and int.from_bytes(pkt[2:4], "big") == len(pkt) == 28 + 10 * 1000 + 3
    assert int.from_bytes(pkt[24:26], "big") == len(pkt) - 20
    pseudo = pkt[12:20] + b"\0\x11" + (len(pkt) - 20).to_bytes(2, "big")
    assert csum(pseudo + pkt[20:]) == 0
    # Cut at every gso_size bytes, as the kernel does for the receiving socket: the datagrams as sent.
    body = pkt[28:]
    assert [body[k:k + 1000] for k in range(0, len(body), 1000)] == [d[28:] for d in datagrams]


@pytest.mark.parametrize(("second", "why"), [
    (udp_packet(b"y" * 100, sport=4001), "another flow"),
    (udp_packet(b"y" * 101), "bigger than the first"),
    (udp_packet(b"y" * 100, ttl=63), "another TTL"),
    (udp_packet(b"y" * 100, check=False), "no checksum"),
    (udp_packet(b"y" * 100, frag=0), "no DF"),
    (udp_packet(b"y" * 100)[:-1] + b"z", "a bad checksum"),
    (tcp_packet(b"y" * 100), "TCP after UDP"),
])
def test_udp_datagrams_that_do_not_continue_the_run_are_kept_apart(second: bytes, why: str) -> None:
    first = udp_packet(b"x" * 100)
    out = offload.gro_coalesce([first, second])
    assert [o[VNET:] for o in out] == [first, second], why


def test_a_short_udp_datagram_ends_the_run() -> None:
    datagrams = [udp_packet(b"a" * 100), udp_packet(b"b" * 50), udp_packet(b"c" * 100), udp_packet(b"d" * 100)]
    out = offload.gro_coalesce(datagrams)
    assert [vnet_fields(o)[1] for o in out] == [5, 5]
    assert out[0][VNET + 28:] == b"a" * 100 + b"b" * 50 and out[1][VNET + 28:] == b"c" * 100 + b"d" * 100
