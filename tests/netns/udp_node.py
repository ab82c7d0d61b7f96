"""One udp-backend node for the netns tests: run inside a host namespace with `ip netns exec`.

    python tests/netns/udp_node.py '{"network": "10.10.0.0/16", "subnet": "10.10.1.0/24",
                                     "iface": "eth0", "datapath": "compiled", "offload": "1"}'

Starts a UdpBackend for the lease, prints one JSON line {"ready": ...} (or {"error": ...}), then
answers JSON commands read line by line from stdin, one JSON line each:
    {"op": "apply", "added": [[subnet, public_ip, backend_type_or_null]], "removed": [...]}
    {"op": "counters"}
    {"op": "stop"}              (also on end of input)
Logs go to stderr; stdout carries only the protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import structlog
from pyroute2 import IPRoute

from flannelpy.backend.base import ExternalInterface
from flannelpy.backend.udp import UdpBackend
from flannelpy.config import parse_config
from flannelpy.subnet.lease import Lease, LeaseAttrs


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def lease(item: list[Any]) -> Lease:
    subnet, public_ip, btype = item
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), backend_type=btype))


def external_iface(name: str) -> ExternalInterface:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        link = ipr.get_links(index)[0]
        addr = ipr.get_addr(index=index, family=socket.AF_INET)[0].get_attr("IFA_ADDRESS")
    ip = IPv4Address(addr)
    return ExternalInterface(name=name, index=index, ip=ip, public_ip=ip, mtu=link.get_attr("IFLA_MTU"))


async def main(spec: dict[str, Any]) -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    config = parse_config(json.dumps({"Network": spec["network"], **spec.get("config", {})}))
    iface = await asyncio.to_thread(external_iface, spec["iface"])
    backend = UdpBackend(config, iface, datapath=spec.get("datapath"), tun_name=spec.get("tun", "flannel0"),
                         offload=spec.get("offload"), threads=spec.get("threads"), rtprio=spec.get("rtprio"))
    own = Lease(IPv4Network(spec["subnet"]), await backend.lease_attrs())
    try:
        await backend.start(own)
    except Exception as e:
        say({"error": str(e)})
        return
    say({"ready": True, "mtu": backend.mtu, "public_ip": str(iface.public_ip),
         "offloads": backend.offloads.describe(), "threads": backend.threads,
         "lease": json.loads(own.attrs.to_json())})
    runner = asyncio.create_task(backend.run())
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "apply":
                await backend.apply([lease(x) for x in cmd.get("added", [])],
                                    [lease(x) for x in cmd.get("removed", [])])
                say({"ok": True})
            elif cmd["op"] == "counters":
                say({"counters": backend.counters(), "failed": runner.done()})
            elif cmd["op"] == "sched":  # each data-path thread's (policy, priority), as the kernel has them
                say({"sched": [(os.sched_getscheduler(t.native_id), os.sched_getparam(t.native_id).sched_priority)
                               for t in backend._threads if t.native_id is not None],
                     "refused": backend.realtime_refused})
            elif cmd["op"] == "stop":
                break
    finally:
        runner.cancel()
        await backend.stop()
        say({"stopped": True})


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
