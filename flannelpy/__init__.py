"""flannelpy: the flannel container overlay network, rebuilt in Python around a compiled data path.

The library API (see docs/embedding.md):

    from flannelpy import Node, NodeOptions, ExternalInterface, MemoryRegistry, EtcdRegistry
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# gRPC's fork handlers write "skipping fork() handlers" to stderr, outside the structured log, at every
# iptables call made while the etcd streams are busy; nothing here uses gRPC in a child process.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

# Imported on first use so `import flannelpy` stays cheap (the CLI's --version, the verbs).
_EXPORTS = {
    "Node": "flannelpy.node",
    "NodeOptions": "flannelpy.node",
    "LeaseEvent": "flannelpy.node",
    "ExternalInterface": "flannelpy.backend.base",
    "Backend": "flannelpy.backend.base",
    "create_backend": "flannelpy.backend.base",
    "NetworkConfig": "flannelpy.config",
    "parse_config": "flannelpy.config",
    "Lease": "flannelpy.subnet.lease",
    "LeaseAttrs": "flannelpy.subnet.lease",
    "SubnetManager": "flannelpy.subnet.manager",
    "EtcdRegistry": "flannelpy.subnet.registry",
    "MemoryRegistry": "flannelpy.testing",
    "RouteTable": "flannelpy.routes",
    "configure_logging": "flannelpy.observe.log",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flannelpy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
