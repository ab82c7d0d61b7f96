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


def test_a_bulk_packet_too_short_to_hash_is_refused() -> None:
    # rt_flow reads the addresses and the ports: in the loop only after fp_tso_parse accepted the packet.
    for short in (b"", b"\x4f", tcp_packet(b"")[:19], b"\x4f" + bytes(60)):
        with pytest.raises(ValueError, match="shorter than its IPv4 header"):
            io.rt_sparse_packets([(True, short)])
    assert io.rt_sparse_packets([(False, b"\x45")]) == [True]  # a lone packet is checked by rt_sparse itself


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


Window = tuple[int, int, int, bool]


def window(segs: int = BULK, bulk: int = BULK - 900, wait_ms: int = 20, sparse: bool = True) -> Window:
    """One 100 ms window as a loop sees it; by default a bulk transfer, 20% waiting for a CPU, a ping beside."""
    return (segs, bulk, wait_ms * 1_000_000, sparse)


IDLE = window(segs=3, bulk=0, wait_ms=0, sparse=False)
FLOOD = window(bulk=BULK // 3)  # mostly small packets: SCHED_RR would cut the flood's batches short


def test_a_bulk_transfer_that_makes_a_ping_wait_promotes_on_the_fourth_window() -> None:
    assert io.rt_decisions([window()] * 5) == [False, False, False, True, True]
    pings_every_200_ms = [window(), window(sparse=False)] * 4
    assert io.rt_decisions(pings_every_200_ms)[-2:] == [True, True]


def test_a_transfer_alone_or_beside_its_own_opening_messages_is_never_promoted() -> None:
    alone = [window(sparse=False)] * 20
    assert not any(io.rt_decisions(alone))
    # iperf3 runs back to back, as the daemons saw them: the last windows of one and the first of the next
    # carry their closing and opening messages, with or without a quiet window between them.
    run = [window(), *[window(sparse=False)] * 30, window(), window(sparse=False), window()]
    assert not any(io.rt_decisions(run + run + [IDLE] + run + [IDLE] * 3 + run))
    # A loop that slept through the pause ends the window of the last run's tail at its next wake-up, a
    # second later: the tail is then no transfer, and the history starts over.
    tail_after_sleep = (2500, 2400, 0, True, 1100)
    assert not any(io.rt_decisions([*run, tail_after_sleep, *run]))


@pytest.mark.parametrize(("name", "w"), [
    ("it hardly waits: nothing to win", window(wait_ms=5)),
    ("a flood of small packets", FLOOD),
    ("too little traffic for a bulk transfer", window(segs=1500, bulk=1500)),
])
def test_no_promotion_where_it_would_not_pay(name: str, w: Window) -> None:
    assert not any(io.rt_decisions([w] * 20)), name


def test_a_promoted_loop_stays_without_waiting_and_steps_down_when_the_transfer_or_the_other_traffic_ends() -> None:
    up = [window()] * 4
    calm = window(wait_ms=0)  # under SCHED_RR the loop no longer waits: that must not demote it
    assert io.rt_decisions(up + [calm] * 5 + [IDLE, IDLE])[-8:] == [True] * 6 + [False, False]
    quiet = [window(wait_ms=0, sparse=False)] * 11  # the pings stopped: the history empties in a second
    assert io.rt_decisions(up + quiet)[-12:] == [True] * 10 + [False] * 2
    one_ping_a_second = ([window(wait_ms=0, sparse=False)] * 9 + [window(wait_ms=0)]) * 3
    assert all(io.rt_decisions(up + one_ping_a_second)[len(up) - 1:])  # once up, a ping a second holds it
    assert io.rt_decisions([*up, FLOOD])[-1] is True  # a quarter of bulk segments still is the transfer
    assert io.rt_decisions([*up, window(bulk=BULK // 5)])[-1] is False  # the transfer gave way to small packets


def test_the_priority_is_checked() -> None:
    from fastpath import core

    table = core.RouteTable(0x0A0A0000, 16, 24)
    with pytest.raises(ValueError, match=r"auto_rtprio=100 out of range 0\.\.99"):
        io.Datapath(core.PacketCore(table, 1472), 0, 0, 8285, auto_rtprio=100)
