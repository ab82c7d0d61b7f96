"""Embed flannelpy in another asyncio program: two nodes share an in-memory registry.

Run it: python docs/examples/embed.py  (no root, no etcd; tests/unit/test_embedding.py runs it).
With a real cluster, replace MemoryRegistry() by EtcdRegistry(["http://10.0.0.1:2379"]) and the
`alloc` backend by "udp", "vxlan" or "host-gw" (those need root: they create devices and routes).
"""

import asyncio
import json
from ipaddress import IPv4Address

import flannelpy


def interface(n: int) -> flannelpy.ExternalInterface:
    address = IPv4Address(f"192.0.2.{n}")
    return flannelpy.ExternalInterface(name="eth0", index=2, ip=address, public_ip=address, mtu=1500)


async def main() -> None:
    flannelpy.configure_logging()  # the node's log to stderr: standard output is this program's answer
    registry = flannelpy.MemoryRegistry()
    await registry.put("/coreos.com/network/config",
                       b'{"Network": "10.5.0.0/16", "Backend": {"Type": "alloc"}}')
    # No subnet file and no iptables: this program only wants leases and routes.
    options = flannelpy.NodeOptions(subnet_file=None, iptables_forward_rules=False)

    first = flannelpy.Node(registry, interface(1), options)
    await first.start()
    events = first.events()  # lease batches applied from now on

    second = flannelpy.Node(registry, interface(2), options)
    await second.start()
    batch = await asyncio.wait_for(events.__anext__(), 5)

    print(json.dumps({
        "first": str(first.lease.subnet),
        "second": str(second.lease.subnet),
        "first_learned": [str(lease.subnet) for lease in batch.added],
        "first_routes": [str(lease.subnet) for lease in first.routes.leases()],
        "ready": first.ready and second.ready,
    }))
    await events.aclose()
    await second.stop()
    await first.stop()


if __name__ == "__main__":
    asyncio.run(main())
