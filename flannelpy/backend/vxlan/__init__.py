"""flanneld's vxlan backend: the kernel encapsulates, we program the VTEP device and its peers."""

from flannelpy.backend.vxlan.device import DEFAULT_VXLAN_PORT, VXLAN_OVERHEAD, device_incompatibility
from flannelpy.backend.vxlan.network import VxlanBackend

__all__ = ["DEFAULT_VXLAN_PORT", "VXLAN_OVERHEAD", "VxlanBackend", "device_incompatibility"]
