"""flanneld's udp backend: TUN flannel0 and UDP port 8285, with a compiled data path (fastpath/)."""

from flannelpy.backend.udp.backend import UdpBackend

__all__ = ["UdpBackend"]
