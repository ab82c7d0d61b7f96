"""The backend interface (shaped like flannel's pkg/backend) and the registry of backend factories.

The daemon drives every backend the same way:

    backend = create_backend(config, iface)
    attrs = await backend.lease_attrs()         # may create a device (vxlan needs its MAC in the lease)
    lease = await subnet_manager.acquire(attrs)
    await backend.start(lease)                  # devices, addresses, routes, sockets, data path
    await backend.apply(added, removed)         # every watch event batch; remote leases of any type
    ... backend.run() runs as a task (reconciliation loops) until cancelled ...
    await backend.stop()                        # clean shutdown; the lease stays in etcd
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import ClassVar

from flannelpy.config import NetworkConfig
from flannelpy.subnet.lease import Lease, LeaseAttrs


@dataclass(frozen=True)
class ExternalInterface:
    """The host interface that carries overlay traffic (flanneld's --iface choice)."""

    name: str
    index: int
    ip: IPv4Address  # the interface's own address: sockets and VTEPs bind here
    public_ip: IPv4Address  # announced in the lease (--public-ip, else ip)
    mtu: int


class Backend(abc.ABC):
    type: ClassVar[str]

    def __init__(self, config: NetworkConfig, iface: ExternalInterface) -> None:
        self.config = config
        self.iface = iface
        self.lease: Lease | None = None

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """MTU for containers (FLANNEL_MTU): Backend.MTU if set, else computed from the interface."""

    async def lease_attrs(self) -> LeaseAttrs:
        return LeaseAttrs(public_ip=self.iface.public_ip, backend_type=self.type)

    @abc.abstractmethod
    async def start(self, lease: Lease) -> None:
        """Bring the data path up for our lease; after this the subnet file may be written."""

    @abc.abstractmethod
    async def apply(self, added: list[Lease], removed: list[Lease]) -> None:
        """Remote leases appeared (or were renewed/changed) or disappeared. Never our own lease."""

    async def run(self) -> None:
        """Background work (reconciliation) until cancelled. Default: nothing to do."""
        return None

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release what start() created, except the lease."""

    def counters(self) -> dict[str, int]:
        """Data-path counters (packets, bytes, drops by reason); empty for kernel data paths."""
        return {}


# type -> "module:Class", imported on first use so `alloc` needs neither TUN nor netlink.
BACKENDS: dict[str, str] = {
    "alloc": "flannelpy.backend.alloc:AllocBackend",
    "udp": "flannelpy.backend.udp:UdpBackend",
    "vxlan": "flannelpy.backend.vxlan:VxlanBackend",
    "host-gw": "flannelpy.backend.hostgw:HostGwBackend",
}


def backend_class(btype: str) -> Callable[[NetworkConfig, ExternalInterface], Backend]:
    try:
        target = BACKENDS[btype]
    except KeyError:
        raise ValueError(f"unknown backend type {btype!r}; known: {', '.join(BACKENDS)}") from None
    module, _, name = target.partition(":")
    cls: Callable[[NetworkConfig, ExternalInterface], Backend] = getattr(importlib.import_module(module), name)
    return cls


def create_backend(config: NetworkConfig, iface: ExternalInterface) -> Backend:
    return backend_class(config.backend.type)(config, iface)
