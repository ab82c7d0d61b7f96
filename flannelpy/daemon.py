"""The daemon: flags -> interface -> Node, signals, exit codes (docs/operations.md lists them)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

import structlog

from flannelpy import __version__
from flannelpy.errors import ExitCode, FlannelError, LeaseRevokedError
from flannelpy.node import Node, NodeOptions, cancel_tasks
from flannelpy.observe.log import configure_logging
from flannelpy.observe.systemd import sd_notify

log = structlog.get_logger()


async def _serve(ns: argparse.Namespace) -> int:
    from flannelpy.cli import _registry_from
    from flannelpy.host.interface import select_interface

    iface = await select_interface(ns.iface, ns.iface_regex, ns.iface_can_reach or None, ns.public_ip or None)
    registry = _registry_from(ns)
    options = NodeOptions(
        prefix=ns.etcd_prefix.rstrip("/"),
        subnet_file=Path(ns.subnet_file) if ns.subnet_file else None,
        ip_masq=ns.ip_masq,
        iptables_forward_rules=ns.iptables_forward_rules,
        iptables_resync=float(ns.iptables_resync),
        renew_margin_minutes=ns.subnet_lease_renew_margin,
        lease_ttl=ns.subnet_lease_ttl,
    )
    node = Node(registry, iface, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    health = None
    if ns.healthz_port:
        from flannelpy.observe.health import HealthServer

        health = HealthServer(node, registry, ns.healthz_ip, ns.healthz_port)
        await health.start()

    code = ExitCode.OK
    try:
        starter = asyncio.ensure_future(node.start())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not starter.done():
            log.info("Signal received during start-up, exiting")
            await cancel_tasks([starter])
            return ExitCode.OK
        starter.result()
        sd_notify("READY=1")
        log.info("flannelpy is running", subnet=str(node.lease.subnet) if node.lease else None)
        waiter = asyncio.ensure_future(node.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            waiter.result()
        else:
            waiter.cancel()
            log.info("Exiting cleanly; the lease is kept so a restart gets the same subnet")
    except LeaseRevokedError as e:
        log.error("Lease has been revoked, shutting down", reason=str(e))
        code = ExitCode.LEASE_REVOKED
    except FlannelError as e:
        log.error(str(e), exit_code=int(e.exit_code))
        code = e.exit_code
    finally:
        sd_notify("STOPPING=1")
        with contextlib.suppress(Exception):
            await node.stop()
        if health is not None:
            await health.stop()
        with contextlib.suppress(Exception):
            await registry.close()
    return code


def run_daemon(ns: argparse.Namespace) -> int:
    configure_logging(ns.v, ns.log_format)
    log.info("flannelpy starting", version=__version__)
    try:
        import uvloop

        return int(uvloop.run(_serve(ns)))
    except FlannelError as e:
        log.error(str(e), exit_code=int(e.exit_code))
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.OK)
