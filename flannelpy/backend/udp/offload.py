"""Which kernel offloads the udp backend's compiled data path asks for, and the socket side of them.

tso: flannel0 is opened with IFF_VNET_HDR and TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4): the kernel hands
     over TCP super-packets of up to 64 KB, which the data path splits into MTU-size packets.
gso: the datagrams for one peer leave in one sendmsg with UDP_SEGMENT (UDP GSO).
gro: UDP_GRO on the socket; consecutive TCP segments of one flow (and equal-size UDP datagrams of one
     flow) are coalesced into one super-packet written to flannel0 (needs IFF_VNET_HDR, which gro asks
     for too); the kernel cuts it apart again where it has to.
None of them changes the wire: each datagram still carries exactly one IPv4 packet of at most the MTU.

FLANNELPY_OFFLOAD=1|0 (or on/off, or a list such as "tso,gso") chooses them; the default is all of
them, except in the one-packet-per-system-call mode (FLANNELPY_BATCH=1), which stands in for
flanneld's loop and so has none. The pure-Python data path has none either.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

NAMES = ("tso", "gso", "gro")
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


@dataclass(frozen=True)
class Offloads:
    tso: bool = False
    gso: bool = False
    gro: bool = False

    @property
    def any(self) -> bool:
        return self.tso or self.gso or self.gro

    @property
    def vnet_hdr(self) -> bool:
        """Whether the TUN needs IFF_VNET_HDR (TSO reads, coalesced writes)."""
        return self.tso or self.gro

    def describe(self) -> str:
        """"tso,gso,gro", a subset, or "off"."""
        return ",".join(n for n in NAMES if getattr(self, n)) or "off"


ALL = Offloads(True, True, True)
NONE = Offloads()


def parse_offloads(text: str) -> Offloads:
    value = text.strip().lower()
    if value in ("1", "on", "true", "yes", "all"):
        return ALL
    if value in ("0", "off", "false", "no", "none", ""):
        return NONE
    names = {n.strip() for n in value.split(",") if n.strip()}
    unknown = names - set(NAMES)
    if unknown:
        raise ValueError(f"FLANNELPY_OFFLOAD={text!r}: unknown offload {', '.join(sorted(unknown))}; use 1, 0, "
                         f"or a comma-separated list of {', '.join(NAMES)}")
    return Offloads(**{n: n in names for n in NAMES})


def choose_offloads(value: bool | str | None, batch: int, datapath: str) -> Offloads:
    """The argument, else FLANNELPY_OFFLOAD, else all (none with batch 1 or the Python data path)."""
    if datapath != "compiled":
        return NONE
    if isinstance(value, bool):
        return ALL if value else NONE
    if value is not None:
        return parse_offloads(value)
    env = os.environ.get("FLANNELPY_OFFLOAD")
    if env is not None and env.strip():
        return parse_offloads(env)
    return ALL if batch > 1 else NONE


def _setsockopt(sock: socket.socket, option: int, value: int) -> bool:
    try:
        sock.setsockopt(SOL_UDP, option, value)
    except OSError:
        return False
    return True


def enable_udp_gso(sock: socket.socket) -> bool:
    """Whether the kernel knows UDP_SEGMENT (the size itself goes with each sendmsg)."""
    return _setsockopt(sock, UDP_SEGMENT, 0)


def enable_udp_gro(sock: socket.socket) -> bool:
    """Turn UDP_GRO on: received datagrams may arrive coalesced, with their size in a cmsg."""
    return _setsockopt(sock, UDP_GRO, 1)
