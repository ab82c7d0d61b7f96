"""Auto real-time priority of the udp data path (fastpath.io): when a loop goes to SCHED_RR and back.

Pure logic, no root: which packets count as traffic that would wait behind a bulk transfer, and the
decision a loop takes at the end of each 100 ms window. The netns test
tests/netns/test_udp_backend.py::test_auto_realtime_* runs it for real.
"""

from __future__ import annotations

import pytest

from tests.unit.test_offload import tcp_packet, udp_packet
from tests.unit.test_packet_core import ipv4

io = pytest.importorskip("fastpath.io")

WINDOW = 100_000_000  # ns
BULK = 40_000  # packets in a window of a bulk transfer, nearly all parts of super-packets
SYN, ACK, PSH = 0x02, 0x10, 0x08


def test_only_traffic_outside_bulk_flows_is_sparse() -> None:
    data = tcp_packet(b"x" * 1400, sport=40000, flags=ACK)
    sparse = io.rt_sparse_packets([
        (True, data),                                            # a super-packet of flow 40000: a bulk flow
        (False, tcp_packet(b"x" * 432, sport=40000, flags=ACK | PSH)),  # the tail of its write, sent alone
        (False, tcp_packet(b"x" * 1400, sport=40000, flags=ACK)),  # a lone full segment (a retransmission)
        (False, tcp_packet(b"", sport=40000, flags=ACK)),        # an ACK of the reverse direction
        (False, tcp_packet(b"GET / HTTP/1.1\r\n\r\n", sport=40001, flags=ACK | PSH)),  # a request
        (False, tcp_packet(b"x" * 1400, sport=40001, flags=ACK)),  # its reply-sized data: still not bulk
        (False, tcp_packet(b"", sport=40002, flags=SYN)),        # a handshake carries no data
        (False, udp_packet(b"dns?")),                            # UDP
        (False, bytes(ipv4("10.10.1.2", "10.10.2.3", b"\x08\x00" + bytes(6), proto=1))),  # a ping
        (False, tcp_packet(b"x" * 100, sport=40000, dport=5202)),  # another port pair: another flow
    ])
    assert sparse == [False, False, False, True, True, False, True, True, True]


def test_bulk_flows_are_forgotten_oldest_first() -> None:
    flows = [(True, tcp_packet(b"x" * 1400, sport=41000 + i)) for i in range(9)]

    def tails(*ports: int) -> list[tuple[bool, bytes]]:
        return [(False, tcp_packet(b"x" * 432, sport=p)) for p in ports]

    assert io.rt_sparse_packets(flows[:8] + tails(41000, 41007)) == [False, False]  # eight remembered
    assert io.rt_sparse_packets(flows + tails(41000, 41008)) == [True, False]  # a ninth pushes the first out


def test_truncated_packets_count_as_sparse_without_reading_past_them() -> None:
    tcp = tcp_packet(b"x" * 10)
    assert io.rt_sparse_packets([(False, tcp[:19]), (False, tcp[:30])]) == [True, True]


@pytest.mark.parametrize(("segs", "bulk", "wait_ms", "sparse_windows", "promoted"), [
    (BULK, BULK - 900, 20, 3, True),    # a bulk transfer, the loop waits 20% for a CPU, pings keep coming
    (BULK, BULK - 900, 20, 2, False),   # a transfer's opening messages are not a conversation
    (BULK, BULK - 900, 5, 10, False),   # it hardly waits: nothing to win
    (BULK, BULK // 3, 50, 10, False),   # mostly small packets (a flood): SCHED_RR would cut its batches short
    (1500, 1500, 50, 10, False),        # too little traffic to call it a bulk transfer
])
def test_a_loop_is_promoted_only_where_it_pays(segs: int, bulk: int, wait_ms: int, sparse_windows: int,
                                               promoted: bool) -> None:
    assert io.rt_decision(False, segs, bulk, wait_ms * 1_000_000, WINDOW, sparse_windows) is promoted


@pytest.mark.parametrize(("segs", "bulk", "sparse_windows", "stays"), [
    (BULK, BULK - 900, 1, True),        # no waiting under SCHED_RR: the transfer and a ping a second hold it
    (BULK, BULK // 3, 10, True),        # a quarter of super-packet segments still is the transfer
    (BULK, BULK // 5, 10, False),       # the transfer gave way to small packets
    (BULK, BULK - 900, 0, False),       # no other traffic for a second
    (900, 900, 10, False),              # the transfer ended (or the loop is idle: woken by its poll timeout)
])
def test_a_promoted_loop_stays_while_the_transfer_and_other_traffic_last(segs: int, bulk: int,
                                                                         sparse_windows: int, stays: bool) -> None:
    assert io.rt_decision(True, segs, bulk, 0, WINDOW, sparse_windows) is stays


def test_the_priority_is_checked() -> None:
    from fastpath import core

    table = core.RouteTable(0x0A0A0000, 16, 24)
    with pytest.raises(ValueError, match=r"auto_rtprio=100 out of range 0\.\.99"):
        io.Datapath(core.PacketCore(table, 1472), 0, 0, 8285, auto_rtprio=100)
