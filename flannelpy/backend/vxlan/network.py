"""VxlanBackend: device `flannel.<VNI>`, and per remote lease a neighbour, an fdb entry and a route.

Kernel state, exactly as flanneld programs it:

    flannel.1: vxlan id 1 local <iface ip> dev <iface> dstport 8472 nolearning, <subnet>.0/32, MTU iface-50
    per remote vxlan lease:
      neighbour  <remote subnet>.0 lladdr <VtepMAC> PERMANENT dev flannel.1
      fdb        <VtepMAC> dst <PublicIP> self permanent dev flannel.1
      route      <remote subnet> via <remote subnet>.0 dev flannel.1 onlink
    DirectRouting, peer on a directly connected network: route <remote subnet> via <PublicIP> instead.
"""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network

import structlog

from flannelpy.backend.base import ExternalInterface
from flannelpy.backend.kernel import RESYNC_INTERVAL, KernelBackend
from flannelpy.backend.netlink import Link, VxlanSpec
from flannelpy.backend.reconcile import (
    KernelState,
    Ownership,
    Skipped,
    desired_vxlan,
    vtep_address,
)
from flannelpy.backend.vxlan.device import VXLAN_OVERHEAD, device_incompatibility, device_name
from flannelpy.config import NetworkConfig
from flannelpy.errors import FlannelError
from flannelpy.subnet.lease import Lease, LeaseAttrs

log = structlog.get_logger()


class VxlanBackend(KernelBackend):
    type = "vxlan"

    def __init__(
        self,
        config: NetworkConfig,
        iface: ExternalInterface,
        *,
        netns: str | None = None,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        super().__init__(config, iface, netns=netns, resync_interval=resync_interval)
        opts = config.backend
        self.vni = opts.vni
        self.direct_routing = opts.direct_routing
        self.spec = VxlanSpec(
            name=device_name(self.vni),
            vni=self.vni,
            local=iface.ip,
            link=iface.index,
            port=opts.port,
            learning=opts.learning,
            gbp=opts.gbp,
        )
        self.device: Link | None = None

    @property
    def mtu(self) -> int:
        return self.config.backend.mtu or self.iface.mtu - VXLAN_OVERHEAD

    async def lease_attrs(self) -> LeaseAttrs:
        # The device must exist before the lease: its MAC is the lease's VtepMAC.
        await self.nl.open()
        async with self._lock:
            await self._check_iface()
            self.device = await self._ensure_device(mac=None)
        return LeaseAttrs(
            public_ip=self.iface.public_ip,
            backend_type=self.type,
            # flanneld's BackendData holds the VNI as 16 bits (it writes uint16(VNI) and cannot read more).
            backend_data={"VNI": self.vni & 0xFFFF, "VtepMAC": self.device.mac},
        )

    async def start(self, lease: Lease) -> None:
        self.lease = lease
        await self.nl.open()
        async with self._lock:
            await self._check_iface()
            await self._prepare()
        log.info("VXLAN device ready", device=self.spec.name, vni=self.vni, mac=self._mac(),
                 address=f"{vtep_address(lease.subnet)}/32", mtu=self.mtu, local=str(self.iface.ip),
                 port=self.spec.port or "kernel default")
        await self.reconcile()

    async def teardown(self) -> None:
        """Delete the VTEP device (and with it every neighbour, fdb entry and route on it)."""
        await self.nl.open()
        async with self._lock:
            dev = await self.nl.link(self.spec.name)
            if dev is not None:
                await self.nl.delete_link(dev.index)
            # DirectRouting routes live on the external interface.
            if self.direct_routing:
                owner = self._owner(0)
                for refusal in await self.nl.delete_routes([r for r in await self.nl.routes() if owner.owns_route(r)]):
                    log.warning("Could not remove route", backend=self.type, refusal=str(refusal))
        await self.nl.close()

    # ---- device ----

    def _mac(self) -> str | None:
        """The VtepMAC our lease announces (the device is recreated with it if someone deletes it)."""
        if self.lease is not None and self.lease.attrs.backend_data:
            mac = self.lease.attrs.backend_data.get("VtepMAC")
            if isinstance(mac, str):
                return mac.lower()
        return self.device.mac if self.device is not None else None

    async def _ensure_device(self, mac: str | None) -> Link:
        existing = await self.nl.link(self.spec.name)
        if existing is not None:
            why = device_incompatibility(existing, self.spec)
            if why is None:
                if mac is None or existing.mac == mac:
                    log.info("Found compatible VXLAN device, reusing", device=existing.name, mac=existing.mac)
                    return existing
                why = f"MAC {existing.mac}, the lease announces {mac}"
            log.warning("Replacing incompatible VXLAN device", device=existing.name, reason=why)
            await self.nl.delete_link(existing.index)
        try:
            created = await self.nl.create_vxlan(self.spec, mac)
        except Exception as e:
            raise FlannelError(
                f"could not create VXLAN device {self.spec.name} (VNI {self.vni}, local {self.iface.ip}, "
                f"dev {self.iface.name}): {e}. Another device may use the same VNI and port; "
                "remove it or choose another Backend.VNI / Backend.Port"
            ) from e
        log.info("Created VXLAN device", device=created.name, vni=self.vni, mac=created.mac)
        return created

    async def _prepare(self) -> None:
        dev = await self.nl.link(self.spec.name)
        if dev is None:
            log.warning("VXLAN device is missing, recreating", device=self.spec.name, mac=self._mac())
            dev = await self._ensure_device(self._mac())
        elif device_incompatibility(dev, self.spec) is not None:
            # Re-created by hand with another VNI, port or learning: MAC and address alone would not fix it.
            dev = await self._ensure_device(self._mac())
        self.device = dev
        if self.lease is None:
            return
        want = IPv4Interface(f"{vtep_address(self.lease.subnet)}/32")
        have = await self.nl.ipv4_addresses(dev.index)
        for addr in have:
            if addr != want:  # flanneld keeps exactly one address on the VTEP
                log.info("Removing unexpected address from VXLAN device", device=dev.name, address=str(addr))
                await self.nl.delete_address(dev.index, addr)
        if want not in have:
            await self.nl.add_address(dev.index, want)
        mac = self._mac()
        if mac is not None and dev.mac != mac:
            # Peers send to the MAC our lease announces; a VTEP with another one drops their frames.
            log.warning("VXLAN device MAC differs from the lease's VtepMAC, restoring", device=dev.name,
                        mac=dev.mac, vtep_mac=mac)
            await self.nl.set_link(dev.index, mac=mac)
        if dev.mtu != self.mtu:
            try:
                await self.nl.set_link(dev.index, mtu=self.mtu)
            except Exception as e:
                # The kernel caps a VXLAN device at its lower device's MTU minus the encapsulation.
                raise FlannelError(
                    f"cannot set MTU {self.mtu} on VXLAN device {dev.name}: {e}; over {self.iface.name} "
                    f"(MTU {self.iface.mtu}) it can be at most {self.iface.mtu - VXLAN_OVERHEAD}: lower "
                    "Backend.MTU in the network config or leave it out"
                ) from e
        if not dev.up:
            await self.nl.set_link(dev.index, up=True)

    # ---- reconciliation ----

    def _owner(self, vtep_index: int) -> Ownership:
        return Ownership(
            network=self.network,
            subnet_len=self.config.subnet_len,
            own_subnet=self.lease.subnet if self.lease is not None else None,
            vtep_index=vtep_index,
            iface_index=self.iface.index if self.direct_routing else 0,
            # Without DirectRouting a route there to a peer's subnet is one it (or host-gw) left: it would
            # block the VTEP route for good.
            replace_index=0 if self.direct_routing else self.iface.index,
        )

    async def _desired(self, leases: list[Lease]) -> tuple[KernelState, list[Skipped], Ownership]:
        assert self.device is not None
        connected: list[IPv4Network] = await self._iface_networks() if self.direct_routing else []
        state, skipped = desired_vxlan(
            leases,
            own_subnet=self.lease.subnet if self.lease is not None else None,
            own_ip=self.iface.public_ip,
            vtep_index=self.device.index,
            iface_index=self.iface.index,
            vni=self.vni,
            direct_routing=self.direct_routing,
            connected=connected,
        )
        return state, skipped, self._owner(self.device.index)

    async def _actual(self) -> KernelState:
        assert self.device is not None
        return KernelState(
            routes=frozenset(await self._routes()),
            neighbours=frozenset(await self.nl.neighbours(self.device.index)),
            fdb=frozenset(await self.nl.fdb(self.device.index)),
        )
