"""The data-path loops (fastpath.io and the Python reference) between in-memory nodes, no root needed.

Each node has a fake TUN (a SOCK_SEQPACKET socketpair) and a real UDP socket on its own loopback
address (127.0.0.2, 127.0.0.3, ...), which stands for its PublicIP. "offload" is the compiled data path
with its offloads on (virtio_net_hdr on the TUN, UDP GSO and GRO on the socket); every behaviour here
holds alike in the three kinds.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flannelpy.backend.udp.fake import FakeNode, free_port
from tests.unit.test_packet_core import csum, header_valid, ipv4

NET = IPv4Network("10.10.0.0/16")
# "/1": both directions in one thread (run()), else one thread each (run_encap(), run_decap()).
KINDS = ["compiled", "offload", "python", "compiled/1", "offload/1", "python/1"]


def fake(kind: str, subnet: str, public_ip: str, port: int, **kwargs: Any) -> FakeNode:
    """A FakeNode of a test kind: "offload" is the compiled data path with offloads on."""
    kind, _, threads = kind.partition("/")
    kwargs["threads"] = int(threads or 2)
    if kind == "offload":
        return FakeNode("compiled", NET, 24, IPv4Network(subnet), public_ip, port, offload=True, **kwargs)
    return FakeNode(kind, NET, 24, IPv4Network(subnet), public_ip, port, offload=False, **kwargs)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def nodes(kind: str) -> Iterator[tuple[FakeNode, FakeNode]]:
    port = free_port("127.0.0.2", "127.0.0.3")
    a = fake(kind, "10.10.1.0/24", "127.0.0.2", port)
    b = fake(kind, "10.10.2.0/24", "127.0.0.3", port)
    a.route(b)
    b.route(a)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
    assert not a.errors and not b.errors


def send_raw(src: str, dst: tuple[str, int], payload: bytes, src_port: int = 0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, src_port))
        s.sendto(payload, dst)


def test_packets_cross_from_tun_to_tun(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, b = nodes
    for size in (0, 100, 1400, 1472 - 28):
        pkt = ipv4("10.10.1.2", "10.10.2.3", bytes(range(256)) * (size // 256) + bytes(size % 256), ttl=30)
        a.tun.inject(bytes(pkt))
        got = b.tun.receive()
        assert got is not None and len(got) == len(pkt)
        assert got[8] == 28 and header_valid(got)  # one hop at each end
        assert got[12:] == pkt[12:]
    assert a.core.counters()["encap_packets"] == 4 and b.core.counters()["decap_packets"] == 4


def test_each_datagram_is_exactly_one_inner_packet_port_to_port(kind: str) -> None:
    port = free_port("127.0.0.2", "127.0.0.4")
    a = fake(kind, "10.10.1.0/24", "127.0.0.2", port)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.4", port))
    peer.settimeout(2)
    try:
        a.table.set(int(IPv4Address("10.10.4.0")), int(IPv4Address("127.0.0.4")))
        for size in (8, 500, 1400):
            pkt = ipv4("10.10.1.2", "10.10.4.3", b"z" * size)
            a.tun.inject(bytes(pkt))
            data, (src, sport) = peer.recvfrom(65536)
            assert (src, sport) == ("127.0.0.2", port)
            assert len(data) == int.from_bytes(data[2:4], "big") == len(pkt)
            assert data[12:] == pkt[12:] and data[8] == pkt[8] - 1
    finally:
        a.stop()
        peer.close()


def test_no_lease_writes_icmp_back_into_the_tun(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, b = nodes
    pkt = ipv4("10.10.1.2", "10.10.77.7", b"12345678")
    a.tun.inject(bytes(pkt))
    icmp = a.tun.receive()
    assert icmp is not None and icmp[9] == 1 and icmp[20:22] == b"\x03\x00"
    assert icmp[12:16] == IPv4Address("10.10.77.7").packed and icmp[16:20] == IPv4Address("10.10.1.2").packed
    assert csum(icmp[:20]) == 0 and csum(icmp[20:]) == 0 and icmp[28:] == bytes(pkt)
    assert b.tun.receive(0.2) is None
    assert a.core.counters()["icmp_unreachable_sent"] == 1


def test_datagrams_from_hosts_without_a_lease_never_reach_the_tun(nodes: tuple[FakeNode, FakeNode]) -> None:
    _, b = nodes
    inner = ipv4("10.10.1.2", "10.10.2.3", b"evil")
    send_raw("127.0.0.9", ("127.0.0.3", b.port), bytes(inner))  # no lease has PublicIP 127.0.0.9
    send_raw("127.0.0.2", ("127.0.0.3", b.port), bytes(ipv4("10.10.5.2", "10.10.2.3")), 0)  # wrong subnet
    send_raw("127.0.0.2", ("127.0.0.3", b.port), bytes(ipv4("10.10.1.2", "10.10.2.3", b"t" * 50)[:40]))  # truncated
    send_raw("127.0.0.2", ("127.0.0.3", b.port), bytes(ipv4("10.10.1.2", "10.10.2.3", b"x" * 3000)))  # oversized
    send_raw("127.0.0.2", ("127.0.0.3", b.port), bytes(ipv4("10.10.1.2", "127.0.0.3", b"host")))  # not our subnet
    # A good one last (from another port of the lease holder: the port is not checked), as the marker.
    send_raw("127.0.0.2", ("127.0.0.3", b.port), bytes(ipv4("10.10.1.2", "10.10.2.3", b"good")))
    got = b.tun.receive()
    assert got is not None and got.endswith(b"good")
    assert b.tun.receive(0.2) is None
    c = b.core.counters()
    assert c["decap_drop_unknown_sender"] == 1
    assert c["decap_drop_spoofed_source"] == 1
    assert c["decap_drop_truncated"] == 1
    assert c["decap_drop_oversized"] == 1
    assert c["decap_drop_wrong_destination"] == 1
    assert c["decap_packets"] == 1


def test_send_errors_are_counted_not_fatal(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, b = nodes
    # A loopback-bound socket cannot reach 192.0.2.1 (TEST-NET-1): the kernel refuses the send.
    a.table.set(int(IPv4Address("10.10.8.0")), int(IPv4Address("192.0.2.1")))
    a.tun.inject(bytes(ipv4("10.10.1.2", "10.10.8.8")))
    a.tun.inject(bytes(ipv4("10.10.1.2", "10.10.2.3", b"after")))
    got = b.tun.receive()
    assert got is not None and got.endswith(b"after")
    c = a.core.counters()
    assert c["encap_drop_send_error"] == 1
    # As docs/operations.md says: passed on = delivered + refused by the kernel (a counter never goes down).
    assert c["encap_packets"] - c["encap_drop_send_error"] == b.core.counters()["decap_packets"] == 1


def test_route_churn_loses_nothing_on_unchanged_routes(nodes: tuple[FakeNode, FakeNode]) -> None:
    """The control plane rewrites other slots all the time; the A->B flow never misses a packet."""
    a, b = nodes
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            subnet = int(IPv4Address("10.10.100.0")) + ((i % 100) << 8)
            a.table.set(subnet, int(IPv4Address("127.0.1.0")) + i % 7 + 1)
            a.table.remove(subnet - (1 << 8) if i % 100 else subnet)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for i in range(300):
            a.tun.inject(bytes(ipv4("10.10.1.2", "10.10.2.3", i.to_bytes(4, "big"))))
            got = b.tun.receive()
            assert got is not None and got[-4:] == i.to_bytes(4, "big"), f"packet {i} lost"
    finally:
        stop.set()
        t.join()
    c = a.core.counters()
    assert c["encap_packets"] == 300 and c["encap_drop_no_route"] == 0


def test_stop_is_prompt_under_a_flood(kind: str) -> None:
    port = free_port("127.0.0.2", "127.0.0.3")
    b = fake(kind, "10.10.2.0/24", "127.0.0.3", port, batch=8)
    b.table.set(int(IPv4Address("10.10.1.0")), int(IPv4Address("127.0.0.2")))
    flooding = threading.Event()
    done = threading.Event()

    def flood() -> None:
        pkt = bytes(ipv4("10.10.1.2", "10.10.2.3", b"f" * 64))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
            while not done.is_set():
                for _ in range(200):
                    s.sendto(pkt, ("127.0.0.3", port))
                flooding.set()

    def drain() -> None:
        while not done.is_set():
            b.tun.receive(0.1)

    threads = [threading.Thread(target=flood), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    try:
        assert flooding.wait(5)
        time.sleep(0.2)
        b.datapath.stop()
        for t in b.threads:
            t.join(10)
        assert not any(t.is_alive() for t in b.threads), "a loop did not see the stop request"
        assert b.core.counters()["decap_packets"] > 0
    finally:
        done.set()
        for t in threads:
            t.join()
        b.stop()
    assert not b.errors


def test_one_packet_per_call_mode_works(kind: str) -> None:
    port = free_port("127.0.0.2", "127.0.0.3")
    a = fake(kind, "10.10.1.0/24", "127.0.0.2", port, batch=1)
    b = fake(kind, "10.10.2.0/24", "127.0.0.3", port, batch=1)
    a.route(b)
    b.route(a)
    try:
        for i in range(20):
            a.tun.inject(bytes(ipv4("10.10.1.2", "10.10.2.3", bytes([i]))))
        got = [b.tun.receive() for _ in range(20)]
        assert all(g is not None for g in got)
        assert sorted(g[-1] for g in got if g) == list(range(20))
    finally:
        a.stop()
        b.stop()


def test_bad_batch_sizes_are_refused(kind: str) -> None:
    port = free_port("127.0.0.2")
    with pytest.raises(ValueError, match="batch"):
        fake(kind, "10.10.1.0/24", "127.0.0.2", port, batch=0)
