"""The VTEP device `flannel.<VNI>`: when an existing one can be reused (pure)."""

from __future__ import annotations

from flannelpy.backend.netlink import Link, VxlanSpec

# The kernel's default VXLAN port (Linux predates IANA's 4789); flanneld's Port 0 means this one.
DEFAULT_VXLAN_PORT = 8472
# Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
VXLAN_OVERHEAD = 50


def device_name(vni: int) -> str:
    return f"flannel.{vni}"


def device_incompatibility(link: Link, spec: VxlanSpec) -> str | None:
    """Why an existing device cannot be reused for `spec` (flanneld's vxlanLinksIncompat), or None."""
    if link.kind != "vxlan" or link.vxlan is None:
        return f"device is of type {link.kind or 'unknown'}, not vxlan"
    vx = link.vxlan
    if vx.vni != spec.vni:
        return f"VNI {vx.vni}, want {spec.vni}"
    if vx.local != spec.local:
        return f"local address {vx.local}, want {spec.local}"
    if vx.link and spec.link and vx.link != spec.link:
        return f"underlying device index {vx.link}, want {spec.link}"
    want_port = spec.port or DEFAULT_VXLAN_PORT
    if vx.port and vx.port != want_port:
        return f"destination port {vx.port}, want {want_port}"
    if vx.gbp != spec.gbp:
        return f"GBP {'on' if vx.gbp else 'off'}, want {'on' if spec.gbp else 'off'}"
    if vx.learning != spec.learning:
        return f"learning {'on' if vx.learning else 'off'}, want {'on' if spec.learning else 'off'}"
    return None
