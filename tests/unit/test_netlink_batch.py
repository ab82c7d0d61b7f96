"""Batched route requests (flannelpy.backend.netlink): the wire format, checked against pyroute2's own decoder,
and the batching against a fake kernel on a socket pair (no root, no kernel state)."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from flannelpy.backend import netlink
from flannelpy.backend.netlink import BATCH, Ack, RequestBatcher, parse_acks, route_request
from flannelpy.backend.reconcile import FdbEntry, Neighbour, Route

HDR = struct.Struct("=IHHII")


def decode(data: bytes) -> rtmsg:
    msg = rtmsg(data)
    msg.decode()
    return msg


def test_add_request_is_what_ip_route_add_sends() -> None:
    route = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.2"), 7)
    data = route_request(route, 42)
    msg = decode(data)
    assert msg["header"]["type"] == netlink.RTM_NEWROUTE
    assert msg["header"]["length"] == len(data)
    assert msg["header"]["sequence_number"] == 42
    # request + ack + create + exclusive: a route that exists is an error, never replaced
    assert msg["header"]["flags"] == 0x1 | 0x4 | 0x400 | 0x200
    assert (msg["family"], msg["dst_len"], msg["table"], msg["proto"], msg["scope"], msg["type"], msg["flags"]) \
        == (socket.AF_INET, 24, 254, 3, 0, 1, 0)
    assert msg.get_attr("RTA_DST") == "10.5.2.0"
    assert msg.get_attr("RTA_GATEWAY") == "10.99.0.2"
    assert msg.get_attr("RTA_OIF") == 7
    assert msg.get_attr("RTA_TABLE") == 254
    assert msg.get_attr("RTA_PRIORITY") is None


def test_onlink_vxlan_route_and_metric() -> None:
    route = Route(IPv4Network("10.5.3.0/24"), IPv4Address("10.5.3.0"), 9, onlink=True, priority=100)
    msg = decode(route_request(route, 1))
    assert msg["flags"] == netlink.RTNH_F_ONLINK
    assert msg.get_attr("RTA_GATEWAY") == "10.5.3.0" and msg.get_attr("RTA_PRIORITY") == 100


def test_device_route_has_link_scope() -> None:
    msg = decode(route_request(Route(IPv4Network("10.5.4.0/24"), None, 3), 1))
    assert msg["scope"] == 253 and msg.get_attr("RTA_GATEWAY") is None


def test_delete_request_matches_any_protocol_scope_and_type() -> None:
    route = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.2"), 7, priority=5)
    msg = decode(route_request(route, 3, delete=True))
    assert msg["header"]["type"] == netlink.RTM_DELROUTE and msg["header"]["flags"] == 0x1 | 0x4
    assert (msg["proto"], msg["scope"], msg["type"]) == (0, 255, 0)
    assert msg.get_attr("RTA_DST") == "10.5.2.0" and msg.get_attr("RTA_OIF") == 7
    assert msg.get_attr("RTA_PRIORITY") == 5


def ack(seq: int, code: int = 0, message: str = "", *, capped: bool = True, request: bytes = b"") -> bytes:
    """An NLMSG_ERROR message as the kernel writes it."""
    echo = request or HDR.pack(16, netlink.RTM_NEWROUTE, 0x605, seq, 0)
    if capped:
        echo = echo[:16]
    tlvs = b""
    flags = netlink.NLM_F_CAPPED if capped else 0
    if message:
        text = message.encode() + b"\0"
        tlvs = struct.pack("=HH", 4 + len(text), netlink.NLMSGERR_ATTR_MSG) + text + bytes(-len(text) % 4)
        flags |= netlink.NLM_F_ACK_TLVS
    body = struct.pack("=i", -code) + echo + bytes(-len(echo) % 4) + tlvs
    return HDR.pack(16 + len(body), netlink.NLMSG_ERROR, flags, seq, 0) + body


def test_acks_with_and_without_the_kernel_s_message() -> None:
    request = route_request(Route(IPv4Network("10.5.2.0/24"), IPv4Address("192.0.2.1"), 7), 6)
    data = (ack(4) + ack(5, errno.EEXIST)
            + ack(6, errno.ENETUNREACH, "Nexthop has invalid gateway", capped=False, request=request)
            + HDR.pack(20, 3, 0, 7, 0) + b"\0" * 4  # NLMSG_DONE: not an ack
            + ack(8, errno.ENODEV, "no such device"))
    assert list(parse_acks(data)) == [
        Ack(4, 0), Ack(5, errno.EEXIST), Ack(6, errno.ENETUNREACH, "Nexthop has invalid gateway"),
        Ack(8, errno.ENODEV, "no such device"),
    ]
    assert list(parse_acks(ack(9)[:10])) == []  # truncated: nothing, and no endless loop
    assert list(parse_acks(HDR.pack(0, 2, 0, 1, 0))) == []  # a zero length cannot loop either


class FakeKernel:
    """The far end of a socket pair: answers each request with its own ack datagram, as rtnetlink does,
    refusing the destinations in `refuse` (errno, message) and staying silent for those in `silent`."""

    def __init__(self, sock: socket.socket, refuse: dict[str, tuple[int, str]], silent: set[str]) -> None:
        self.sock, self.refuse, self.silent = sock, refuse, silent
        self.sends: list[int] = []  # requests per datagram received
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while data := self.sock.recv(1 << 20):
            off, answers = 0, []
            while off < len(data):
                length, _, _, seq, _ = HDR.unpack_from(data, off)
                dst = decode(data[off:off + length]).get_attr("RTA_DST")
                self.seen.append(dst)
                if dst not in self.silent:
                    answers.append(ack(seq, *self.refuse.get(dst, (0, ""))))
                off += length
            self.sends.append(len(self.seen) - sum(self.sends))  # counted before the acks can end the batch
            for answer in answers:
                self.sock.send(answer)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    ours.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.shutdown(socket.SHUT_RDWR)  # the fake kernel's recv() returns b"": its thread ends
        theirs.close()


def routes(n: int) -> list[Route]:
    return [Route(IPv4Network(f"10.{5 + i // 256}.{i % 256}.0/24"), IPv4Address("10.99.0.2"), 2) for i in range(n)]


async def test_many_routes_go_out_batch_per_send_and_every_refusal_names_its_route(pair) -> None:
    ours, theirs = pair
    wanted = routes(300)
    kernel = FakeKernel(theirs, {"10.5.77.0": (errno.EEXIST, ""), "10.6.1.0": (errno.ENETUNREACH, "bad gw")}, set())
    refused = await RequestBatcher(ours).exchange(wanted)
    assert kernel.sends == [BATCH, BATCH, 300 - 2 * BATCH]  # not one send per route
    assert kernel.seen == [str(r.dst.network_address) for r in wanted]
    assert [(str(r.item.dst), r.code) for r in refused] == [("10.5.77.0/24", errno.EEXIST),
                                                              ("10.6.1.0/24", errno.ENETUNREACH)]
    assert str(refused[1]) == "Network is unreachable (bad gw)"
    assert str(refused[1].item) == "10.6.1.0/24 via 10.99.0.2 dev#2"


async def test_unanswered_requests_are_reported_not_waited_for_forever(pair, monkeypatch) -> None:
    monkeypatch.setattr(netlink, "ACK_TIMEOUT", 0.2)
    ours, theirs = pair
    FakeKernel(theirs, {}, {"10.5.3.0"})
    batcher = RequestBatcher(ours)
    refused = await batcher.exchange(routes(5))
    assert [(str(r.item.dst), r.code, r.message) for r in refused] == [
        ("10.5.3.0/24", errno.ETIMEDOUT, "no answer from the kernel")]
    assert await batcher.exchange(routes(2)) == []  # the socket goes on working


def encoded_route(seq: int, dst: str, dst_len: int, attrs: list[tuple[str, object]], *, table: int = 254,
                  rtype: int = 1, flags: int = 0, proto: int = 3) -> bytes:
    """An RTM_NEWROUTE as the kernel sends it in a dump, encoded by pyroute2."""
    msg = rtmsg()
    msg["header"]["type"] = netlink.RTM_NEWROUTE
    msg["header"]["sequence_number"] = seq
    msg["header"]["flags"] = 0x2  # NLM_F_MULTI
    msg["family"], msg["dst_len"], msg["table"], msg["proto"], msg["type"], msg["flags"] = (
        socket.AF_INET, dst_len, min(table, 255), proto, rtype, flags)
    msg["attrs"] = [("RTA_TABLE", table), *([("RTA_DST", dst)] if dst_len else []), *attrs]
    msg.encode()
    return bytes(msg.data)


def test_route_dump_decodes_what_pyroute2_encodes_and_keeps_only_candidates() -> None:
    data = b"".join([
        encoded_route(7, "10.5.2.0", 24, [("RTA_OIF", 4), ("RTA_GATEWAY", "10.5.2.0")], flags=netlink.RTNH_F_ONLINK),
        encoded_route(7, "10.5.3.0", 24, [("RTA_OIF", 2), ("RTA_GATEWAY", "10.99.0.3"), ("RTA_PRIORITY", 50)]),
        encoded_route(7, "0.0.0.0", 0, [("RTA_OIF", 2), ("RTA_GATEWAY", "10.99.0.254")], proto=4),
        encoded_route(7, "10.99.0.0", 16, [("RTA_OIF", 2)], proto=2),
        encoded_route(7, "10.5.6.0", 24, [("RTA_OIF", 2), ("RTA_GATEWAY", "10.99.0.6")], table=1000),  # other table
        encoded_route(7, "10.5.7.0", 24, [], rtype=6),  # blackhole
        encoded_route(7, "10.5.5.0", 24, []),  # multipath: no RTA_OIF
        encoded_route(8, "10.5.9.0", 24, [("RTA_OIF", 2), ("RTA_GATEWAY", "10.99.0.9")]),  # another conversation
    ])
    out: list[Route] = []
    assert netlink.parse_route_dump(data, 7, out) is False
    assert [(str(r), r.priority, r.proto) for r in out] == [
        ("10.5.2.0/24 via 10.5.2.0 dev#4 onlink", 0, 3),
        ("10.5.3.0/24 via 10.99.0.3 dev#2", 50, 3),
        ("0.0.0.0/0 via 10.99.0.254 dev#2", 0, 4),
        ("10.99.0.0/16 dev#2", 0, 2),
    ]
    assert netlink.parse_route_dump(HDR.pack(20, netlink.NLMSG_DONE, 2, 7, 0) + bytes(4), 7, out) is True
    with pytest.raises(OSError, match="netlink dump refused"):
        netlink.parse_route_dump(ack(7, errno.EPERM), 7, out)


def decode_nd(data: bytes) -> ndmsg:
    msg = ndmsg(data)
    msg.decode()
    return msg


def test_neighbour_requests_are_ip_neigh_replace_and_del() -> None:
    neigh = Neighbour(IPv4Address("10.5.2.0"), "fa:80:ff:34:0d:06", 5)
    msg = decode_nd(netlink.neighbour_request(neigh, 11))
    assert (msg["header"]["type"], msg["header"]["flags"], msg["header"]["sequence_number"]) == (28, 0x505 | 0x100, 11)
    assert (msg["family"], msg["ifindex"], msg["state"], msg["flags"]) == (socket.AF_INET, 5, 0x80, 0)
    assert msg.get_attr("NDA_DST") == "10.5.2.0" and msg.get_attr("NDA_LLADDR") == "fa:80:ff:34:0d:06"
    gone = decode_nd(netlink.neighbour_request(neigh, 12, delete=True))
    assert (gone["header"]["type"], gone["header"]["flags"]) == (29, 0x5)
    assert gone.get_attr("NDA_DST") == "10.5.2.0" and gone["ifindex"] == 5


def test_fdb_requests_are_self_permanent_as_flanneld() -> None:
    entry = FdbEntry("fa:80:ff:34:0d:06", IPv4Address("10.99.0.2"), 5)
    for delete, msg_type in ((False, 28), (True, 29)):
        msg = decode_nd(netlink.fdb_request(entry, 3, delete=delete))
        assert msg["header"]["type"] == msg_type
        assert (msg["family"], msg["ifindex"], msg["state"], msg["flags"]) == (socket.AF_BRIDGE, 5, 0x80, 0x02)
        assert msg.get_attr("NDA_LLADDR") == "fa:80:ff:34:0d:06" and msg.get_attr("NDA_DST") == "10.99.0.2"


def test_neighbour_dump_decodes_what_pyroute2_encodes() -> None:
    def encoded(seq: int, family: int, ifindex: int, state: int, attrs: list[tuple[str, object]]) -> bytes:
        msg = ndmsg()
        msg["header"]["type"] = netlink.RTM_NEWNEIGH
        msg["header"]["sequence_number"] = seq
        msg["family"], msg["ifindex"], msg["state"] = family, ifindex, state
        msg["attrs"] = attrs
        msg.encode()
        return bytes(msg.data)

    data = (encoded(4, socket.AF_INET, 5, 0x80, [("NDA_DST", "10.5.2.0"), ("NDA_LLADDR", "fa:80:ff:34:0d:06")])
            + encoded(4, socket.AF_BRIDGE, 5, 0x80, [("NDA_LLADDR", "fa:80:ff:34:0d:07"), ("NDA_DST", "10.99.0.2")])
            + encoded(4, socket.AF_INET, 6, 0x02, [("NDA_DST", "10.99.0.9")])  # incomplete: no lladdr
            + encoded(5, socket.AF_INET, 5, 0x80, [("NDA_DST", "10.5.3.0")]))  # another conversation
    out: list[netlink.NeighMsg] = []
    assert netlink.parse_neigh_dump(data, 4, out) is False
    assert out == [(5, 0x80, bytes([10, 5, 2, 0]), bytes.fromhex("fa80ff340d06")),
                   (5, 0x80, bytes([10, 99, 0, 2]), bytes.fromhex("fa80ff340d07")),
                   (6, 0x02, bytes([10, 99, 0, 9]), None)]
    request = decode_nd(netlink.neigh_dump_request(9, socket.AF_BRIDGE))
    assert request["header"]["flags"] == 0x301 and request["family"] == socket.AF_BRIDGE
