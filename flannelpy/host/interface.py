"""Choose the host interface that carries overlay traffic, the way flanneld does.

Order (flanneld's main.go): every `--iface` (name or IP) in turn, then every `--iface-regex` (matched
against addresses first, then names), then `--iface-can-reach`; only when none of the three was given,
the interface of the IPv4 default route. Everything is read over netlink in the network namespace the
process runs in.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannelpy.backend.base import ExternalInterface
from flannelpy.errors import InterfaceError
from flannelpy.netlink import run_netlink

log = structlog.get_logger()

_LOOPBACK = IPv4Network("127.0.0.0/8")
_LINK_LOCAL = IPv4Network("169.254.0.0/16")
_MULTICAST = IPv4Network("224.0.0.0/4")
_MAIN_TABLE = 254


@dataclass(frozen=True)
class Link:
    """One interface as netlink reports it: index, name, MTU and IPv4 addresses in kernel order."""

    index: int
    name: str
    mtu: int
    addrs: tuple[IPv4Address, ...]

    def usable_addrs(self) -> list[IPv4Address]:
        """flanneld's GetInterfaceIP4Addrs: global unicast first, link-local only as a fallback."""
        usable = [a for a in self.addrs if _is_global_unicast(a)]
        usable += [a for a in self.addrs if a in _LINK_LOCAL]
        return usable

    def address(self) -> IPv4Address | None:
        usable = self.usable_addrs()
        return usable[0] if usable else None

    def describe(self) -> str:
        return f"{self.name}({', '.join(map(str, self.addrs)) or 'no IPv4'})"


def _is_global_unicast(addr: IPv4Address) -> bool:
    # Go's net.IP.IsGlobalUnicast: private ranges count, loopback/link-local/multicast do not.
    return not (
        addr.is_unspecified or addr in _LOOPBACK or addr in _LINK_LOCAL or addr in _MULTICAST
        or addr == IPv4Address("255.255.255.255")
    )


class _Miss(Exception):
    """One selection attempt found nothing; the message says why."""


def match_iface(links: list[Link], spec: str) -> tuple[Link, IPv4Address]:
    """`--iface`: an IPv4 address held by an interface (that address is used) or an interface name."""
    try:
        addr = ip_address(spec)
    except ValueError:
        addr = None
    if addr is not None:
        if not isinstance(addr, IPv4Address):
            raise _Miss(f"--iface {spec}: only IPv4 addresses are supported")
        for link in links:
            if addr in link.usable_addrs():
                return link, addr
        raise _Miss(f"--iface {spec}: no interface has this address")
    for link in links:
        if link.name == spec:
            found = link.address()
            if found is None:
                raise _Miss(f"--iface {spec}: the interface has no usable IPv4 address")
            return link, found
    raise _Miss(f"--iface {spec}: no such interface")


def match_regex(links: list[Link], pattern: str) -> tuple[Link, IPv4Address]:
    """`--iface-regex`: searched in each interface's first usable address, then in the names."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise _Miss(f"--iface-regex {pattern!r}: not a valid regular expression ({e})") from None
    for link in links:
        addr = link.address()
        if addr is not None and regex.search(str(addr)):
            return link, addr
    # flanneld stops at the first name that matches even when it has no address; skip those instead.
    named = [link for link in links if regex.search(link.name)]
    for link in named:
        addr = link.address()
        if addr is not None:
            return link, addr
    if named:
        raise _Miss(f"--iface-regex {pattern!r}: matched {', '.join(lk.name for lk in named)}, "
                    "none of which has a usable IPv4 address")
    raise _Miss(f"--iface-regex {pattern!r}: matches no interface name or address")


async def _read_links(ipr: AsyncIPRoute) -> list[Link]:
    addrs: dict[int, list[IPv4Address]] = {}
    async for msg in await ipr.addr("dump", family=socket.AF_INET):
        # On a point-to-point address IFA_ADDRESS is the far end; IFA_LOCAL is always ours.
        value = msg.get("local") or msg.get("address")
        if value:
            addrs.setdefault(int(msg["index"]), []).append(IPv4Address(value))
    links = [
        Link(int(msg["index"]), str(msg.get("ifname")), int(msg.get("mtu") or 0),
             tuple(addrs.get(int(msg["index"]), ())))
        async for msg in await ipr.link("dump")
    ]
    return sorted(links, key=lambda link: link.index)


def _oif(route: Any) -> int | None:
    oif = route.get("oif")
    if oif:
        return int(oif)
    for hop in route.get("multipath") or ():  # ECMP route: take the first next hop's device
        if hop.get("oif"):
            return int(hop["oif"])
    return None


async def _can_reach(ipr: AsyncIPRoute, links: list[Link], target: str) -> tuple[Link, IPv4Address]:
    try:
        dst = IPv4Address(target)
    except ValueError:
        raise _Miss(f"--iface-can-reach {target}: not an IPv4 address") from None
    try:
        routes = list(await ipr.route("get", dst=str(dst)))
    except NetlinkError as e:
        raise _Miss(f"--iface-can-reach {target}: no route to this address ({e.args[-1]})") from None
    for route in routes:
        oif = _oif(route)
        link = next((lk for lk in links if lk.index == oif), None)
        if link is None:
            continue
        prefsrc = route.get("prefsrc")
        addr = IPv4Address(prefsrc) if prefsrc else link.address()
        if addr is None:
            raise _Miss(f"--iface-can-reach {target}: route uses {link.name}, which has no IPv4 address")
        return link, addr
    raise _Miss(f"--iface-can-reach {target}: the route to it names no interface")


async def _default_route(ipr: AsyncIPRoute, links: list[Link]) -> tuple[Link, IPv4Address]:
    async for route in await ipr.route("dump", family=socket.AF_INET):
        table = route.get("table") or route["table"]
        if table != _MAIN_TABLE or route["dst_len"] != 0 or route["type"] != 1:  # 1 = RTN_UNICAST
            continue
        oif = _oif(route)
        link = next((lk for lk in links if lk.index == oif), None)
        if link is None:
            raise _Miss("found a default route but could not determine its interface")
        addr = link.address()
        if addr is None:
            raise _Miss(f"the default route uses {link.name}, which has no usable IPv4 address")
        return link, addr
    raise _Miss("there is no IPv4 default route; choose one with --iface, --iface-regex or --iface-can-reach")


async def select_interface(
    ifaces: list[str], iface_regexes: list[str], can_reach: str | None, public_ip: str | None
) -> ExternalInterface:
    """Pick the external interface as flanneld does; raise InterfaceError when nothing matches."""
    return await run_netlink(_select_interface(ifaces, iface_regexes, can_reach, public_ip))


async def _select_interface(
    ifaces: list[str], iface_regexes: list[str], can_reach: str | None, public_ip: str | None
) -> ExternalInterface:
    public: IPv4Address | None = None
    if public_ip:
        try:
            public = IPv4Address(public_ip)
        except ValueError:
            raise InterfaceError(f"--public-ip={public_ip!r} is not an IPv4 address such as 10.99.0.1") from None
    misses: list[str] = []
    chosen: tuple[Link, IPv4Address] | None = None
    async with AsyncIPRoute() as ipr:
        links = await _read_links(ipr)
        if ifaces or iface_regexes or can_reach:
            for spec in ifaces:
                log.info(f"Searching for interface using {spec}", iface=spec)
                try:
                    chosen = match_iface(links, spec)
                    break
                except _Miss as e:
                    log.info(f"Could not find valid interface matching {spec}: {e}", iface=spec)
                    misses.append(str(e))
            if chosen is None:
                for pattern in iface_regexes:
                    try:
                        chosen = match_regex(links, pattern)
                        break
                    except _Miss as e:
                        log.info(f"Could not find valid interface matching {pattern}: {e}", iface_regex=pattern)
                        misses.append(str(e))
            if chosen is None and can_reach:
                log.info(f"Determining interface to use based on given ifcanreach: {can_reach}",
                         can_reach=can_reach)
                try:
                    chosen = await _can_reach(ipr, links, can_reach)
                except _Miss as e:
                    misses.append(str(e))
        else:
            log.info("Determining IP address of default interface")
            try:
                chosen = await _default_route(ipr, links)
            except _Miss as e:
                misses.append(str(e))
    if chosen is None:
        seen = ", ".join(link.describe() for link in links) or "none"
        raise InterfaceError(
            "Failed to find interface to use that matches the interfaces and/or regexes provided: "
            + "; ".join(misses) + f". Interfaces in this network namespace: {seen}"
        )
    link, addr = chosen
    if link.mtu <= 0:
        raise InterfaceError(f"failed to determine MTU for interface {link.name}")
    log.info(f"Using interface with name {link.name} and address {addr}", iface=link.name, address=str(addr))
    if public is not None:
        log.info(f"Using {public} as external address", public_ip=str(public))
    return ExternalInterface(name=link.name, index=link.index, ip=addr, public_ip=public or addr, mtu=link.mtu)
