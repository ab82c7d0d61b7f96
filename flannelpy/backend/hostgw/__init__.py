"""flanneld's host-gw backend: a route per peer via its public IP; hosts must share a layer 2 network."""

from flannelpy.backend.hostgw.network import HostGwBackend

__all__ = ["HostGwBackend"]
