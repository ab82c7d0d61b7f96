"""rtnetlink for the kernel backends, through pyroute2's asyncio API (never `ip` or `bridge`).

Every method runs on flannelpy.netlink's loop (a stock asyncio loop in its own thread) and may be awaited
from any loop, uvloop included.

`Netlink` reads and writes links, IPv4 addresses, main-table routes, neighbours and VXLAN fdb entries,
turning pyroute2's messages into the plain values of flannelpy.backend.reconcile. It opens one
rtnetlink socket (in a named network namespace when given: tests run several hosts in one process) and
subscribes to no multicast groups, so nothing queues up between requests.

Routes, neighbours and fdb entries are also written in batches (add_routes, replace_neighbours, ...),
which is what a start with thousands of leases needs: pyroute2 spends ~0.25 ms encoding one request and
waits for each ack, so 10,000 host-gw routes took ~10 s. A batch packs up to BATCH requests (a few
struct.pack calls each) into one send on a second plain rtnetlink socket, then reads the acks, matched to
the requests by sequence number: every refused entry is still reported, with the kernel's errno and its
extended-ack message. The route table is read on that socket too (routes()), decoded here for the same
reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, ParamSpec, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannelpy.backend.reconcile import (
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    RT_TABLE_MAIN,
    RTPROT_BOOT,
    FdbEntry,
    Neighbour,
    Plan,
    Route,
)
from flannelpy.netlink import run_netlink

P = ParamSpec("P")
T = TypeVar("T")


def on_netlink_loop(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Run the coroutine on the process's netlink loop (flannelpy.netlink): uvloop cannot host netlink
    sockets, so the socket lives on a stock asyncio loop in its own thread whatever loop the caller has."""

    @functools.wraps(fn)
    async def on_loop(*args: P.args, **kwargs: P.kwargs) -> T:
        return await run_netlink(fn(*args, **kwargs))

    return on_loop


RTNH_F_ONLINK = 0x04
CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
RTN_UNICAST = 1
IFF_UP = 0x1
# Errors that mean "already gone" when deleting.
_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}

# rtnetlink wire format for the batched route requests (linux/netlink.h, linux/rtnetlink.h).
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an ack: the request is echoed as its header only
NLM_F_ACK_TLVS = 0x200  # in an ack: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
NLM_F_REPLACE = 0x100
NDA_DST = 1
NDA_LLADDR = 2
NLMSG_DONE = 3
NLM_F_DUMP = 0x300
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_TABLE = 15
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NLA = struct.Struct("=HH")  # length, type
_U32 = struct.Struct("=I")
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
BATCH = 128  # requests per send: their acks (~1 KB of receive buffer each) fit a default-sized buffer
ACK_TIMEOUT = 10.0  # seconds without any ack before the rest of a batch counts as unanswered


@dataclass(frozen=True)
class VxlanInfo:
    vni: int
    local: IPv4Address | None
    link: int  # underlying device index, 0 when unset
    port: int  # destination UDP port as the kernel reports it (8472 when created without one)
    learning: bool
    gbp: bool


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # "vxlan", "veth", "bridge", ... None for plain devices
    mac: str
    mtu: int
    up: bool
    vxlan: VxlanInfo | None = None


@dataclass(frozen=True)
class VxlanSpec:
    """What `ip link add <name> type vxlan id <vni> local <local> dev <link> [dstport <port>] nolearning`
    would create."""

    name: str
    vni: int
    local: IPv4Address
    link: int
    port: int = 0  # 0: the kernel default, 8472
    learning: bool = False
    gbp: bool = False


def is_gone(exc: NetlinkError) -> bool:
    return exc.code in _GONE


Entry = Route | Neighbour | FdbEntry


@dataclass(frozen=True)
class Refusal:
    """A batched request the kernel refused (or did not answer): errno and its extended-ack message."""

    item: Entry
    code: int
    message: str = ""  # the kernel's own words ("Nexthop has invalid gateway"), "" when it gave none

    def __str__(self) -> str:
        why = os.strerror(self.code)
        return f"{why} ({self.message})" if self.message else why


@dataclass(frozen=True)
class Ack:
    """The kernel's answer to one request: errno 0 for success."""

    seq: int
    code: int
    message: str = ""


def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + bytes(-length % 4)


def route_request(route: Route, seq: int, *, delete: bool = False) -> bytes:
    """One RTM_NEWROUTE (create, never replace: as `ip route add`) or RTM_DELROUTE request for a route of
    the main table, as add_route/delete_route send it through pyroute2."""
    if delete:
        # As iproute2 deletes: any protocol, scope and type; matched on destination, device, gateway, metric.
        msg_type, flags = RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK
        head = _RTMSG.pack(socket.AF_INET, route.dst.prefixlen, 0, 0, RT_TABLE_MAIN, 0, RT_SCOPE_NOWHERE, 0, 0)
    else:
        msg_type, flags = RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        scope = RT_SCOPE_UNIVERSE if route.gateway is not None else RT_SCOPE_LINK
        head = _RTMSG.pack(socket.AF_INET, route.dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope,
                           RTN_UNICAST, RTNH_F_ONLINK if route.onlink else 0)
    attrs = [_nla(RTA_TABLE, struct.pack("=I", RT_TABLE_MAIN)), _nla(RTA_DST, route.dst.network_address.packed),
             _nla(RTA_OIF, struct.pack("=I", route.ifindex))]
    if route.gateway is not None:
        attrs.append(_nla(RTA_GATEWAY, route.gateway.packed))
    if route.priority:
        attrs.append(_nla(RTA_PRIORITY, struct.pack("=I", route.priority)))
    body = head + b"".join(attrs)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_str(lladdr: bytes) -> str:
    return ":".join(f"{b:02x}" for b in lladdr)


def neighbour_request(neigh: Neighbour, seq: int, *, delete: bool = False) -> bytes:
    """`ip neigh replace <ip> lladdr <mac> dev <ifindex> nud permanent` (or `ip neigh del <ip> dev ...`)."""
    if delete:
        msg_type, flags, state = RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, 0
        attrs = _nla(NDA_DST, neigh.ip.packed)
    else:
        msg_type, flags, state = RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, NUD_PERMANENT
        attrs = _nla(NDA_DST, neigh.ip.packed) + _nla(NDA_LLADDR, _mac(neigh.mac))
    body = _NDMSG.pack(socket.AF_INET, 0, 0, neigh.ifindex, state, 0, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def fdb_request(entry: FdbEntry, seq: int, *, delete: bool = False) -> bytes:
    """`bridge fdb replace <mac> dev <ifindex> dst <ip> self permanent` (or `bridge fdb del ...`), as
    flanneld's NeighSet(AF_BRIDGE, NTF_SELF, NUD_PERMANENT)."""
    if delete:
        msg_type, flags = RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK
    else:
        msg_type, flags = RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    body = (_NDMSG.pack(socket.AF_BRIDGE, 0, 0, entry.ifindex, NUD_PERMANENT, NTF_SELF, 0)
            + _nla(NDA_LLADDR, _mac(entry.mac)) + _nla(NDA_DST, entry.dst.packed))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def entry_request(item: Entry, seq: int, *, delete: bool = False) -> bytes:
    if isinstance(item, Route):
        return route_request(item, seq, delete=delete)
    if isinstance(item, Neighbour):
        return neighbour_request(item, seq, delete=delete)
    return fdb_request(item, seq, delete=delete)


def parse_acks(data: bytes) -> Iterator[Ack]:
    """The acks (NLMSG_ERROR messages) in what one recv returned; other messages are skipped."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, seq, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            return  # malformed: stop rather than loop
        end = min(off + length, len(data))
        if msg_type == NLMSG_ERROR and off + _NLMSGHDR.size + 4 <= end:
            (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
            message = ""
            if flags & NLM_F_ACK_TLVS:
                echo = off + _NLMSGHDR.size + 4
                if echo + _NLMSGHDR.size <= end:
                    echoed_len = _NLMSGHDR.unpack_from(data, echo)[0]
                    at = echo + (_NLMSGHDR.size if flags & NLM_F_CAPPED else (echoed_len + 3) & ~3)
                    message = _ext_ack_message(data[at:end])
            yield Ack(seq, -err, message)
        off += (length + 3) & ~3


def _ext_ack_message(attrs: bytes) -> str:
    off = 0
    while off + _NLA.size <= len(attrs):
        length, kind = _NLA.unpack_from(attrs, off)
        if length < _NLA.size:
            break
        if kind == NLMSGERR_ATTR_MSG:
            return attrs[off + _NLA.size:off + length].split(b"\0", 1)[0].decode(errors="replace")
        off += (length + 3) & ~3
    return ""


class Netlink:
    """One rtnetlink socket. Use `async with Netlink(netns) as nl:` or call open()/close()."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None
        self._batch: RequestBatcher | None = None  # its own socket: pyroute2 never reads the acks

    @on_netlink_loop
    async def open(self) -> Netlink:
        if self._ipr is None:
            if self.netns is None:
                ipr = AsyncIPRoute(groups=0)
            else:
                # Not pyroute2's netns=: that forks a child per socket and stops it with SIGTERM, which
                # goes wrong in a process that handles SIGTERM itself (the child runs on as a copy).
                ipr = AsyncIPRoute(groups=0, fileno=netlink_socket_in(self.netns).detach())
            await ipr.setup_endpoint()
            self._ipr = ipr
        return self

    @on_netlink_loop
    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._batch is not None:
            self._batch.sock.close()
            self._batch = None

    async def __aenter__(self) -> Netlink:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise RuntimeError("Netlink socket is not open; call open() first")
        return self._ipr

    # ---- links ----

    async def _get_link(self, **match: Any) -> Link | None:
        try:
            msgs = await self.ipr.link("get", **match)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return _link(msgs[0]) if msgs else None

    @on_netlink_loop
    async def link(self, name: str) -> Link | None:
        return await self._get_link(ifname=name)

    @on_netlink_loop
    async def link_by_index(self, index: int) -> Link | None:
        return await self._get_link(index=index)

    @on_netlink_loop
    async def create_vxlan(self, spec: VxlanSpec, mac: str | None = None) -> Link:
        kwargs: dict[str, Any] = {
            "ifname": spec.name,
            "kind": "vxlan",
            "vxlan_id": spec.vni,
            "vxlan_local": str(spec.local),
            "vxlan_link": spec.link,
            "vxlan_learning": 1 if spec.learning else 0,
        }
        if spec.port:
            kwargs["vxlan_port"] = spec.port
        if spec.gbp:
            kwargs["vxlan_gbp"] = True
        if mac:
            kwargs["address"] = mac
        await self.ipr.link("add", **kwargs)
        link = await self.link(spec.name)
        if link is None:
            raise RuntimeError(f"VXLAN device {spec.name} vanished right after it was created")
        return link

    @on_netlink_loop
    async def delete_link(self, index: int) -> None:
        try:
            await self.ipr.link("del", index=index)
        except NetlinkError as e:
            if not is_gone(e):
                raise

    @on_netlink_loop
    async def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                       mac: str | None = None) -> None:
        kwargs: dict[str, Any] = {"index": index}
        if mtu is not None:
            kwargs["mtu"] = mtu
        if mac is not None:
            kwargs["address"] = mac
        if up is not None:
            kwargs["state"] = "up" if up else "down"
        await self.ipr.link("set", **kwargs)

    # ---- addresses ----

    @on_netlink_loop
    async def ipv4_addresses(self, index: int) -> list[IPv4Interface]:
        out: list[IPv4Interface] = []
        async for msg in await self.ipr.addr("dump", family=socket.AF_INET):
            if msg["index"] != index:
                continue
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if addr:
                out.append(IPv4Interface(f"{addr}/{msg['prefixlen']}"))
        return out

    @on_netlink_loop
    async def add_address(self, index: int, addr: IPv4Interface) -> None:
        try:
            await self.ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    @on_netlink_loop
    async def delete_address(self, index: int, addr: IPv4Interface) -> None:
        try:
            await self.ipr.addr("del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        except NetlinkError as e:
            if not is_gone(e):
                raise

    # ---- routes (IPv4, main table, unicast, single next hop) ----

    @on_netlink_loop
    async def routes(self) -> list[Route]:
        """The main table's unicast IPv4 routes with a single next hop (multipath routes are never ours)."""
        return await self._batcher().dump()

    # ---- in batches: the refused entries are returned, in order ----

    @on_netlink_loop
    async def add_routes(self, routes: Sequence[Route]) -> list[Refusal]:
        """Creates each route, never replacing one (EEXIST is a refusal: a route to that destination on
        another device is not ours to clobber)."""
        return await self._exchange(routes, delete=False)

    @on_netlink_loop
    async def delete_routes(self, routes: Sequence[Route]) -> list[Refusal]:
        """Deletes each route; a route already gone is no refusal."""
        return await self._exchange(routes, delete=True)

    @on_netlink_loop
    async def replace_neighbours(self, neighbours: Sequence[Neighbour]) -> list[Refusal]:
        return await self._exchange(neighbours, delete=False)

    @on_netlink_loop
    async def delete_neighbours(self, neighbours: Sequence[Neighbour]) -> list[Refusal]:
        return await self._exchange(neighbours, delete=True)

    @on_netlink_loop
    async def replace_fdb_entries(self, entries: Sequence[FdbEntry]) -> list[Refusal]:
        return await self._exchange(entries, delete=False)

    @on_netlink_loop
    async def delete_fdb_entries(self, entries: Sequence[FdbEntry]) -> list[Refusal]:
        return await self._exchange(entries, delete=True)

    def _batcher(self) -> RequestBatcher:
        if self._ipr is None:
            raise RuntimeError("Netlink socket is not open; call open() first")
        if self._batch is None:
            self._batch = RequestBatcher(batch_socket(self.netns))
        return self._batch

    async def _exchange(self, items: Sequence[Entry], *, delete: bool) -> list[Refusal]:
        if not items:
            return []
        refused = await self._batcher().exchange(items, delete=delete)
        return [r for r in refused if r.code not in _GONE] if delete else refused

    # ---- neighbours (ARP) ----

    @on_netlink_loop
    async def neighbours(self, ifindex: int) -> list[Neighbour]:
        """The IPv4 neighbours (ARP entries) with a link-layer address on this device."""
        return [
            Neighbour(IPv4Address(dst), _mac_str(mac), ifindex, permanent=bool(state & NUD_PERMANENT))
            for index, state, dst, mac in await self._batcher().dump_neighbours(socket.AF_INET)
            if index == ifindex and dst and len(dst) == 4 and mac
        ]

    # ---- VXLAN forwarding database ----

    @on_netlink_loop
    async def fdb(self, ifindex: int) -> list[FdbEntry]:
        """The device's forwarding entries with an IPv4 destination (`bridge fdb show dev <device>`)."""
        return [
            FdbEntry(_mac_str(mac), IPv4Address(dst), ifindex, permanent=bool(state & (NUD_PERMANENT | NUD_NOARP)))
            for index, state, dst, mac in await self._batcher().dump_neighbours(socket.AF_BRIDGE)
            if index == ifindex and dst and len(dst) == 4 and mac
        ]

def dump_request(seq: int) -> bytes:
    """RTM_GETROUTE with NLM_F_DUMP for IPv4: every route of every table (filtered on our side)."""
    body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _dump_messages(data: bytes, seq: int, msg_type: int, head: int) -> tuple[list[tuple[int, int]], bool]:
    """(start, end) of the bodies of the `msg_type` messages of dump `seq` in this part of its answer (at
    least `head` bytes each), and whether the dump is complete (NLMSG_DONE); an NLMSG_ERROR raises OSError."""
    off, done, found = 0, False, []
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _, msg_seq, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        start, end = off + _NLMSGHDR.size, min(off + length, len(data))
        if msg_seq == seq:
            if kind == NLMSG_DONE:
                done = True
            elif kind == NLMSG_ERROR and start + 4 <= end:
                (err,) = struct.unpack_from("=i", data, start)
                if err:
                    raise OSError(-err, f"netlink dump refused: {os.strerror(-err)}")
            elif kind == msg_type and start + head <= end:
                found.append((start, end))
        off += (length + 3) & ~3
    return found, done


def parse_route_dump(data: bytes, seq: int, out: list[Route]) -> bool:
    """Append the unicast main-table routes with one next hop in this part of a dump answer to `out`;
    True once the dump is complete (NLMSG_DONE). An NLMSG_ERROR for the dump raises OSError."""
    found, done = _dump_messages(data, seq, RTM_NEWROUTE, _RTMSG.size)
    for start, end in found:
        route = _route(data, start, end)
        if route is not None:
            out.append(route)
    return done


NeighMsg = tuple[int, int, bytes | None, bytes | None]  # ifindex, state, NDA_DST, NDA_LLADDR


def neigh_dump_request(seq: int, family: int) -> bytes:
    """RTM_GETNEIGH with NLM_F_DUMP: ARP entries (AF_INET) or fdb entries (AF_BRIDGE) of every device."""
    body = _NDMSG.pack(family, 0, 0, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_neigh_dump(data: bytes, seq: int, out: list[NeighMsg]) -> bool:
    """As parse_route_dump, for neighbour and fdb entries: (ifindex, state, NDA_DST, NDA_LLADDR)."""
    found, done = _dump_messages(data, seq, RTM_NEWNEIGH, _NDMSG.size)
    for start, end in found:
        _, _, _, ifindex, state, _, _ = _NDMSG.unpack_from(data, start)
        dst = lladdr = None
        off = start + _NDMSG.size
        while off + _NLA.size <= end:
            length, kind = _NLA.unpack_from(data, off)
            if length < _NLA.size:
                break
            if kind == NDA_DST:
                dst = data[off + _NLA.size:off + length]
            elif kind == NDA_LLADDR:
                lladdr = data[off + _NLA.size:off + length]
            off += (length + 3) & ~3
        out.append((ifindex, state, dst, lladdr))
    return done


def _route(data: bytes, at: int, end: int) -> Route | None:
    family, dst_len, _, _, table, proto, _, rtype, flags = _RTMSG.unpack_from(data, at)
    dst = gateway = oif = None
    priority = 0
    off = at + _RTMSG.size
    while off + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, off)
        if length < _NLA.size:
            break
        value = off + _NLA.size
        if kind == RTA_TABLE:
            table = _U32.unpack_from(data, value)[0]
        elif kind == RTA_DST:
            dst = data[value:value + 4]
        elif kind == RTA_OIF:
            oif = _U32.unpack_from(data, value)[0]
        elif kind == RTA_GATEWAY:
            gateway = data[value:value + 4]
        elif kind == RTA_PRIORITY:
            priority = _U32.unpack_from(data, value)[0]
        off += (length + 3) & ~3
    if family != socket.AF_INET or table != RT_TABLE_MAIN or rtype != RTN_UNICAST or oif is None:
        return None  # oif None: a multipath route, never ours
    return Route(
        dst=IPv4Network((dst or b"\0\0\0\0", dst_len), strict=False),
        gateway=IPv4Address(gateway) if gateway else None,
        ifindex=oif,
        onlink=bool(flags & RTNH_F_ONLINK),
        priority=priority,
        proto=proto,
    )


class RequestBatcher:
    """Requests on one rtnetlink socket, BATCH per send, every ack matched to its request."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # non-blocking
        self._seq = 0
        self._lock = asyncio.Lock()  # one conversation at a time: answers are read in order

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    async def dump(self) -> list[Route]:
        """The main table's unicast IPv4 routes with one next hop, decoded here (pyroute2 takes ~0.25 ms
        per route, 2.5 s for 10,000 on every resync)."""
        out: list[Route] = []
        await self._dump(dump_request, parse_route_dump, out)
        return out

    async def dump_neighbours(self, family: int) -> list[NeighMsg]:
        """ARP (AF_INET) or fdb (AF_BRIDGE) entries of every device."""
        out: list[NeighMsg] = []
        await self._dump(lambda seq: neigh_dump_request(seq, family), parse_neigh_dump, out)
        return out

    async def _dump(self, request: Callable[[int], bytes], parse: Callable[[bytes, int, list[T]], bool],
                    out: list[T]) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            seq = self._next_seq()
            await loop.sock_sendall(self.sock, request(seq))
            while not parse(await self._recv(loop), seq, out):
                pass

    async def exchange(self, items: Sequence[Entry], *, delete: bool = False) -> list[Refusal]:
        """Add/replace (or delete) the entries; returns the refused ones, in order."""
        async with self._lock:
            return await self._exchange(items, delete)

    async def _exchange(self, items: Sequence[Entry], delete: bool) -> list[Refusal]:
        loop = asyncio.get_running_loop()
        refused: list[Refusal] = []
        for start in range(0, len(items), BATCH):
            pending: dict[int, Entry] = {}
            buf = bytearray()
            for item in items[start:start + BATCH]:
                seq = self._next_seq()
                pending[seq] = item
                buf += entry_request(item, seq, delete=delete)
            await loop.sock_sendall(self.sock, buf)  # the kernel handles every request inside this send
            while pending:
                try:
                    data = await self._recv(loop)
                except (OSError, TimeoutError) as e:
                    # ENOBUFS (acks overflowed the buffer) or no answer: outcome unknown; the next full
                    # reconcile reads the kernel back and retries what is missing.
                    code = e.errno if isinstance(e, OSError) and e.errno else errno.ETIMEDOUT
                    refused += [Refusal(r, code, "no answer from the kernel") for r in pending.values()]
                    break
                for ack in parse_acks(data):
                    asked = pending.pop(ack.seq, None)  # None: a late answer to an abandoned batch
                    if asked is not None and ack.code:
                        refused.append(Refusal(asked, ack.code, ack.message))
        return refused

    async def _recv(self, loop: asyncio.AbstractEventLoop) -> bytes:
        try:
            return self.sock.recv(1 << 16)  # usually there already: the kernel answered inside the send
        except BlockingIOError:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), ACK_TIMEOUT)


def batch_socket(netns: str | None) -> socket.socket:
    """A non-blocking rtnetlink socket for RequestBatcher: short acks with the kernel's message, and a receive
    buffer with room for a batch's acks."""
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    else:
        sock = netlink_socket_in(netns)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks echo the request's header, not all of it
        with contextlib.suppress(OSError):  # kernels before 4.12: the errno without the message
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        try:  # beyond net.core.rmem_max (needs CAP_NET_ADMIN, which programming routes needs anyway)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def netlink_socket_in(netns: str) -> socket.socket:
    """An rtnetlink socket inside the named namespace (/run/netns/<netns>), made by a short-lived
    thread: setns() switches only the calling thread, and the socket keeps the namespace it was made in."""
    path = netns if "/" in netns else f"/run/netns/{netns}"
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE))
        except BaseException as e:
            result.append(e)

    # A thread of its own, never a pool's: a reused thread would stay in the other namespace.
    t = threading.Thread(target=make, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    out = result[0]
    if isinstance(out, BaseException):
        if isinstance(out, FileNotFoundError):
            raise FileNotFoundError(f"network namespace {netns!r} does not exist ({path})") from out
        raise out
    return out


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def _link(msg: Any) -> Link:
    kind = msg.get(("linkinfo", "kind"))
    vx: VxlanInfo | None = None
    if kind == "vxlan":
        data = msg.get(("linkinfo", "data"))

        def attr(name: str, default: Any = None) -> Any:
            value = data.get(name) if data is not None else None
            return default if value is None else value

        local = attr("IFLA_VXLAN_LOCAL")
        vx = VxlanInfo(
            vni=int(attr("IFLA_VXLAN_ID", 0)),
            local=IPv4Address(local) if local else None,
            link=int(attr("IFLA_VXLAN_LINK", 0)),
            port=int(attr("IFLA_VXLAN_PORT", 0)),
            learning=bool(attr("IFLA_VXLAN_LEARNING", 0)),
            gbp=attr("IFLA_VXLAN_GBP") is not None and attr("IFLA_VXLAN_GBP") is not False,
        )
    return Link(
        index=msg["index"],
        name=msg.get("IFLA_IFNAME"),
        kind=kind,
        mac=(msg.get("IFLA_ADDRESS") or "").lower(),
        mtu=msg.get("IFLA_MTU") or 0,
        up=bool(msg["flags"] & IFF_UP),
        vxlan=vx,
    )



@on_netlink_loop
async def execute_plan(nl: Netlink, plan: Plan, *, exists_ok: bool = False) -> tuple[Plan, list[str]]:
    """Carry out a reconcile plan: deletions first (routes before the entries they use), then additions
    (fdb and neighbours before the routes that need them). One failed entry does not stop the rest.
    Returns what was done (the plan less what the kernel refused) and the failures as messages.
    exists_ok: a route that is already there is no failure (the plan was made without reading the
    kernel; the next full reconcile tells ours from a conflict)."""
    failures: list[str] = []
    refused: dict[str, set[Entry]] = {}
    for field_name, what, outcome in (
        ("del_routes", "delete route", await nl.delete_routes(plan.del_routes)),
        ("del_neighbours", "delete neighbour", await nl.delete_neighbours(plan.del_neighbours)),
        ("del_fdb", "delete fdb entry", await nl.delete_fdb_entries(plan.del_fdb)),
        ("add_fdb", "add fdb entry", await nl.replace_fdb_entries(plan.add_fdb)),
        ("add_neighbours", "add neighbour", await nl.replace_neighbours(plan.add_neighbours)),
    ):
        failures += [f"{what} {r.item}: {r}" for r in outcome]
        refused[field_name] = {r.item for r in outcome}
    refused["add_routes"] = set()
    for r in await nl.add_routes(plan.add_routes):
        refused["add_routes"].add(r.item)  # an existing route is not one we added, failure or not
        if r.code != errno.EEXIST:
            failures.append(f"add route {r.item}: {r}")
        elif not exists_ok:
            failures.append(f"add route {r.item}: another route to this destination exists (another device or "
                            "owner); left alone")
    done = replace(plan, **{
        name: tuple(x for x in getattr(plan, name) if x not in items) for name, items in refused.items() if items
    })
    return done, failures
