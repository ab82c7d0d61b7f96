"""In-memory stand-ins for the udp backend's devices, so whole nodes run without root.

FakeTun is a SOCK_SEQPACKET socketpair: one end is the data path's "TUN" fd (one read = one packet,
as with IFF_NO_PI), the other is the kernel's side, where a test injects packets and reads what the
data path delivered. FakeNode is one complete node (route table, packet core, fake TUN, a real UDP
socket on a loopback address, the data-path threads); two of them exchange real datagrams over
127.0.0.0/8, each with its own "PublicIP" (127.0.0.2, 127.0.0.3, ...).

With offloads (FakeNode(..., offload=True)) the fake TUN carries a virtio_net_hdr before every packet,
as flannel0 with IFF_VNET_HDR does: inject() puts one in front (empty unless given: a test may hand
the data path a TCP super-packet as the kernel would), receive() takes it off and keeps it in
last_vnet. The socket gets UDP GSO and GRO, which loopback carries like a NIC that does both.
"""

from __future__ import annotations

import socket
import threading
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannelpy.backend.udp.datapath import DEFAULT_BATCH, Datapath, core_module, loops, make_datapath
from flannelpy.backend.udp.offload import Offloads, choose_offloads, enable_udp_gro, enable_udp_gso

VNET_LEN = 10
EMPTY_VNET = bytes(VNET_LEN)


class FakeTun:
    def __init__(self, mtu: int, vnet_hdr: bool = False) -> None:
        self.mtu = mtu
        self.vnet_hdr = vnet_hdr
        self.last_vnet = EMPTY_VNET
        self._dp, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._dp.setblocking(False)
        for s in (self._dp, self.kernel):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    @property
    def fd(self) -> int:
        """The data path's end (non-blocking)."""
        return self._dp.fileno()

    def inject(self, pkt: bytes, vnet: bytes | None = None) -> None:
        """A packet the kernel routed into the TUN (the data path will encap it); vnet: its
        virtio_net_hdr when the TUN has one (default: empty)."""
        if self.vnet_hdr:
            self.kernel.send((vnet or EMPTY_VNET) + bytes(pkt))
        elif vnet is not None:
            raise ValueError("this fake TUN has no virtio_net_hdr (FakeTun(vnet_hdr=True))")
        else:
            self.kernel.send(pkt)

    def receive(self, timeout: float = 2.0) -> bytes | None:
        """The next packet the data path wrote into the TUN, or None after timeout seconds (its
        virtio_net_hdr, if any, goes to last_vnet)."""
        self.kernel.settimeout(timeout)
        try:
            data = self.kernel.recv(65536 + VNET_LEN)
        except TimeoutError:
            return None
        if self.vnet_hdr:
            self.last_vnet, data = data[:VNET_LEN], data[VNET_LEN:]
        return data

    def close(self) -> None:
        self._dp.close()
        self.kernel.close()


class FakeNode:
    """One node: subnet, PublicIP (a loopback address), fake TUN, UDP socket, data path threads."""

    def __init__(self, kind: str, network: IPv4Network, subnet_len: int, subnet: IPv4Network,
                 public_ip: str, port: int, mtu: int = 1472, batch: int = DEFAULT_BATCH,
                 offload: bool | str = False, threads: int = 2) -> None:
        mod = core_module(kind)
        self.kind = kind
        self.subnet = subnet
        self.public_ip = IPv4Address(public_ip)
        self.port = port
        self.table: Any = mod.RouteTable(int(network.network_address), network.prefixlen, subnet_len)
        self.core: Any = mod.PacketCore(self.table, mtu)
        self.core.set_own_subnet(int(subnet.network_address), subnet.prefixlen)
        wanted = choose_offloads(offload, batch, kind)
        self.tun = FakeTun(mtu, vnet_hdr=wanted.vnet_hdr)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((public_ip, port))
        self.offloads = Offloads(tso=wanted.tso, gso=wanted.gso and enable_udp_gso(self.sock),
                                 gro=wanted.gro and enable_udp_gro(self.sock))
        self.datapath: Datapath = make_datapath(kind, self.core, self.tun.fd, self.sock.fileno(), port, batch,
                                                vnet_hdr=wanted.vnet_hdr, gso=self.offloads.gso,
                                                gro=self.offloads.gro)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(f,), daemon=True)
                        for _, f in loops(self.datapath, threads)]
        for t in self.threads:
            t.start()

    def _run(self, target: Any) -> None:
        try:
            target()
        except BaseException as e:
            self.errors.append(e)

    def route(self, other: FakeNode) -> None:
        self.table.set(int(other.subnet.network_address), int(other.public_ip))

    def stop(self) -> None:
        self.datapath.stop()
        for t in self.threads:
            t.join(5)
        close = getattr(self.datapath, "close", None)
        if close is not None:
            close()
        self.sock.close()
        self.tun.close()


def free_port(*addresses: str) -> int:
    """A UDP port free on every one of the given loopback addresses (best effort)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((addresses[0], 0))
            port: int = s.getsockname()[1]
        ok = True
        for a in addresses:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as t:
                try:
                    t.bind((a, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise OSError("no common free UDP port found on " + ", ".join(addresses))


__all__ = ["FakeNode", "FakeTun", "free_port"]
