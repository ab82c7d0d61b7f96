"""HostGwBackend: `<remote subnet> via <PublicIP> dev <iface>` for every remote host-gw lease.

The peer's public IP is the next hop, so it has to be on a network the interface is directly connected
to (one of its addresses' networks, or an on-link route on it, as the kernel checks a gateway); a peer
elsewhere is reported and not routed (flanneld hands such a route to the kernel, which refuses it, and
keeps retrying). MTU = interface MTU: nothing is encapsulated.
"""

from __future__ import annotations

import structlog

from flannelpy.backend.kernel import KernelBackend
from flannelpy.backend.reconcile import KernelState, Ownership, Skipped, desired_hostgw
from flannelpy.errors import InterfaceError
from flannelpy.subnet.lease import Lease, LeaseAttrs

log = structlog.get_logger()


class HostGwBackend(KernelBackend):
    type = "host-gw"

    @property
    def mtu(self) -> int:
        return self.config.backend.mtu or self.iface.mtu

    async def lease_attrs(self) -> LeaseAttrs:
        # Checked before a lease is taken: a lease announcing an unusable next hop would mislead peers.
        await self.nl.open()
        await self._check_public_ip()
        return LeaseAttrs(public_ip=self.iface.public_ip, backend_type=self.type)

    async def start(self, lease: Lease) -> None:
        self.lease = lease
        await self.nl.open()
        await self._check_public_ip()
        log.info("host-gw routing via interface", iface=self.iface.name, public_ip=str(self.iface.public_ip),
                 mtu=self.mtu)
        await self.reconcile()

    async def teardown(self) -> None:
        """Remove every route of ours from the interface."""
        await self.nl.open()
        async with self._lock:
            owner = self._owner()
            refused = await self.nl.delete_routes([r for r in await self.nl.routes() if owner.owns_route(r)])
        for refusal in refused:
            log.error("Could not remove route", backend=self.type, route=str(refusal.item), error=str(refusal))
        await self.nl.close()

    async def _check_public_ip(self) -> None:
        await self._check_iface()
        addrs = await self.nl.ipv4_addresses(self.iface.index)
        if not any(a.ip == self.iface.public_ip for a in addrs):
            have = ", ".join(str(a) for a in addrs) or "none"
            raise InterfaceError(
                f"host-gw: the public IP {self.iface.public_ip} is not an address of interface "
                f"{self.iface.name} (its IPv4 addresses: {have}). Peers route to this host's containers "
                "via that address, so it must be on the chosen interface: drop --public-ip, pick the "
                "interface that holds it with --iface, or use the vxlan backend"
            )

    def _owner(self) -> Ownership:
        return Ownership(
            network=self.network,
            subnet_len=self.config.subnet_len,
            own_subnet=self.lease.subnet if self.lease is not None else None,
            iface_index=self.iface.index,
        )

    async def _prepare(self) -> None:
        return None

    async def _desired(self, leases: list[Lease]) -> tuple[KernelState, list[Skipped], Ownership]:
        state, skipped = desired_hostgw(
            leases,
            own_subnet=self.lease.subnet if self.lease is not None else None,
            own_ip=self.iface.public_ip,
            iface_index=self.iface.index,
            connected=await self._iface_networks(),
        )
        return state, skipped, self._owner()

    async def _actual(self) -> KernelState:
        return KernelState(routes=frozenset(await self._routes()))
