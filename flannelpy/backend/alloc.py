"""flanneld's `alloc` backend: a lease and nothing else, so the control plane runs on its own."""

from __future__ import annotations

from flannelpy.backend.base import Backend
from flannelpy.subnet.lease import Lease, LeaseAttrs


class AllocBackend(Backend):
    type = "alloc"

    @property
    def mtu(self) -> int:
        return self.config.backend.mtu or self.iface.mtu

    async def lease_attrs(self) -> LeaseAttrs:
        return LeaseAttrs(public_ip=self.iface.public_ip, backend_type="alloc")

    async def start(self, lease: Lease) -> None:
        self.lease = lease

    async def apply(self, added: list[Lease], removed: list[Lease]) -> None:
        return None

    async def stop(self) -> None:
        return None
