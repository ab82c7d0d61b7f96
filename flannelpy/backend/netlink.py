"""rtnetlink for the kernel backends, through pyroute2's asyncio API (never `ip` or `bridge`).

Every method runs on flannelpy.netlink's loop (a stock asyncio loop in its own thread) and may be awaited
from any loop, uvloop included.

`Netlink` reads and writes links, IPv4 addresses, main-table routes, neighbours and VXLAN fdb entries,
turning pyroute2's messages into the plain values of flannelpy.backend.reconcile. It opens one
rtnetlink socket (in a named network namespace when given: tests run several hosts in one process) and
subscribes to no multicast groups, so nothing queues up between requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
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


class Netlink:
    """One rtnetlink socket. Use `async with Netlink(netns) as nl:` or call open()/close()."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None

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
        out: list[Route] = []
        async for msg in await self.ipr.route("dump", family=socket.AF_INET):
            table = msg.get("RTA_TABLE") or msg["table"]
            if table != RT_TABLE_MAIN or msg["type"] != RTN_UNICAST:
                continue
            oif = msg.get("RTA_OIF")
            if oif is None:  # multipath: never ours
                continue
            dst = msg.get("RTA_DST") or "0.0.0.0"
            gw = msg.get("RTA_GATEWAY")
            out.append(Route(
                dst=IPv4Network(f"{dst}/{msg['dst_len']}"),
                gateway=IPv4Address(gw) if gw else None,
                ifindex=oif,
                onlink=bool(msg["flags"] & RTNH_F_ONLINK),
                priority=msg.get("RTA_PRIORITY") or 0,
                proto=msg["proto"],
            ))
        return out

    @on_netlink_loop
    async def add_route(self, route: Route) -> None:
        """Create, never replace: a route to the same destination on another device is not ours to clobber
        (the kernel answers EEXIST and the conflict is reported)."""
        kwargs: dict[str, Any] = {
            "dst": str(route.dst),
            "oif": route.ifindex,
            "table": RT_TABLE_MAIN,
            "proto": RTPROT_BOOT,
        }
        if route.gateway is not None:
            kwargs["gateway"] = str(route.gateway)
        if route.onlink:
            kwargs["flags"] = RTNH_F_ONLINK
        if route.priority:
            kwargs["priority"] = route.priority
        await self.ipr.route("add", **kwargs)

    @on_netlink_loop
    async def delete_route(self, route: Route) -> None:
        kwargs: dict[str, Any] = {"dst": str(route.dst), "oif": route.ifindex, "table": RT_TABLE_MAIN}
        if route.gateway is not None:
            kwargs["gateway"] = str(route.gateway)
        if route.priority:
            kwargs["priority"] = route.priority
        try:
            await self.ipr.route("del", **kwargs)
        except NetlinkError as e:
            if not is_gone(e):
                raise

    # ---- neighbours (ARP) ----

    @on_netlink_loop
    async def neighbours(self, ifindex: int) -> list[Neighbour]:
        out: list[Neighbour] = []
        async for msg in await self.ipr.neigh("dump", family=socket.AF_INET):
            if msg["ifindex"] != ifindex:
                continue
            dst, mac = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
            if not dst or not mac:
                continue
            out.append(Neighbour(IPv4Address(dst), mac.lower(), ifindex,
                                 permanent=bool(msg["state"] & NUD_PERMANENT)))
        return out

    @on_netlink_loop
    async def replace_neighbour(self, neigh: Neighbour) -> None:
        await self.ipr.neigh("replace", ifindex=neigh.ifindex, dst=str(neigh.ip), lladdr=neigh.mac,
                             state=NUD_PERMANENT, family=socket.AF_INET)

    @on_netlink_loop
    async def delete_neighbour(self, neigh: Neighbour) -> None:
        try:
            await self.ipr.neigh("del", ifindex=neigh.ifindex, dst=str(neigh.ip), family=socket.AF_INET)
        except NetlinkError as e:
            if not is_gone(e):
                raise

    # ---- VXLAN forwarding database ----

    @on_netlink_loop
    async def fdb(self, ifindex: int) -> list[FdbEntry]:
        out: list[FdbEntry] = []
        async for msg in await self.ipr.fdb("dump", ifindex=ifindex):
            if msg["ifindex"] != ifindex:
                continue
            mac, dst = msg.get("NDA_LLADDR"), msg.get("NDA_DST")
            if not mac or not dst or ":" in str(dst):
                continue
            out.append(FdbEntry(mac.lower(), IPv4Address(dst), ifindex,
                                permanent=bool(msg["state"] & (NUD_PERMANENT | NUD_NOARP))))
        return out

    @on_netlink_loop
    async def replace_fdb(self, entry: FdbEntry) -> None:
        # As flanneld: NeighSet(AF_BRIDGE, NTF_SELF, NUD_PERMANENT), so `bridge fdb` shows "self permanent".
        await self.ipr.neigh("replace", family=socket.AF_BRIDGE, ifindex=entry.ifindex, lladdr=entry.mac,
                             dst=str(entry.dst), state=NUD_PERMANENT, flags=NTF_SELF)

    @on_netlink_loop
    async def delete_fdb(self, entry: FdbEntry) -> None:
        try:
            await self.ipr.neigh("del", family=socket.AF_BRIDGE, ifindex=entry.ifindex, lladdr=entry.mac,
                                 dst=str(entry.dst), state=NUD_PERMANENT, flags=NTF_SELF)
        except NetlinkError as e:
            if not is_gone(e):
                raise


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
async def execute_plan(nl: Netlink, plan: Plan, *, exists_ok: bool = False) -> list[str]:
    """Carry out a reconcile plan: deletions first (routes before the entries they use), then additions
    (fdb and neighbours before the routes that need them). One failed entry does not stop the rest;
    the failures are returned as messages. exists_ok: a route that is already there is no failure (the
    plan was made without reading the kernel; the next full reconcile tells ours from a conflict)."""
    failures: list[str] = []

    async def attempt(what: str, item: object, op: Awaitable[None]) -> None:
        try:
            await op
        except NetlinkError as e:
            if exists_ok and e.code == errno.EEXIST:
                return
            why = os.strerror(e.code) if e.code > 0 else str(e)
            if what == "add route" and e.code == errno.EEXIST:
                why = "another route to this destination exists (another device or owner); left alone"
            failures.append(f"{what} {item}: {why}")

    for r in plan.del_routes:
        await attempt("delete route", r, nl.delete_route(r))
    for n in plan.del_neighbours:
        await attempt("delete neighbour", n, nl.delete_neighbour(n))
    for f in plan.del_fdb:
        await attempt("delete fdb entry", f, nl.delete_fdb(f))
    for f in plan.add_fdb:
        await attempt("add fdb entry", f, nl.replace_fdb(f))
    for n in plan.add_neighbours:
        await attempt("add neighbour", n, nl.replace_neighbour(n))
    for r in plan.add_routes:
        await attempt("add route", r, nl.add_route(r))
    return failures
