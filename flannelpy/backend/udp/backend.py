"""flanneld's udp backend: flannel0 (TUN) <-> UDP :8285, with the packet path in fastpath/.

The control plane (this module, on the event loop) and the data path (one or two threads running the
compiled loops without the GIL) meet in one place: the RouteTable. apply() writes single slots in
it while the loops run; nothing is stopped or restarted for a route change.

A destination in the network with no lease is answered with ICMP net unreachable written into the
TUN, sourced from that destination (flanneld sources it from flannel0's own address, which the kernel
drops as a martian). Linux treats type 3 code 0 as a soft error: TCP connect() fails at once with
ENETUNREACH; a connected UDP socket sees it when IP_RECVERR is set (as glibc's resolver does).

FLANNELPY_DATAPATH=compiled|python and FLANNELPY_BATCH=1..1024 (packets per wake-up) select the data
path, for benchmarks; FLANNELPY_OFFLOAD=1|0|tso,gso,gro the kernel offloads of the compiled one (see
offload.py: on by default, off with batch 1); FLANNELPY_UDP_THREADS=1|2|auto whether one thread carries both
directions or each has its own (auto: one where at most two CPUs are usable, by affinity or cgroup quota);
FLANNELPY_UDP_RTPRIO=auto|0..99 their SCHED_RR priority (default auto: only while a bulk transfer makes other
traffic wait; 0 never; see datapath.py and docs/operations.md).
The constructor's datapath=, batch=, offload=, threads= and rtprio= take precedence.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

import structlog

from flannelpy.backend.base import Backend, ExternalInterface
from flannelpy.backend.udp.datapath import (
    Datapath,
    Realtime,
    cgroup_cpu_limit,
    choose_batch,
    choose_datapath,
    choose_rtprio,
    choose_threads,
    core_module,
    loops,
    make_datapath,
    make_realtime,
    probe_realtime,
)
from flannelpy.backend.udp.device import TunDevice
from flannelpy.backend.udp.offload import Offloads, choose_offloads, enable_udp_gro, enable_udp_gso
from flannelpy.config import NetworkConfig
from flannelpy.errors import ConfigError, FlannelError
from flannelpy.subnet.lease import Lease, LeaseAttrs

log = structlog.get_logger()

UDP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8) headers
SOCKET_BUFFER = 4 * 1024 * 1024
STOP_TIMEOUT = 5.0


class DatapathError(FlannelError):
    """A data-path loop stopped on its own (TUN or socket failure)."""


class UdpBackend(Backend):
    type = "udp"

    def __init__(self, config: NetworkConfig, iface: ExternalInterface, *, datapath: str | None = None,
                 tun_name: str = "flannel0", batch: int | None = None, offload: bool | str | None = None,
                 threads: int | None = None, rtprio: int | str | None = None) -> None:
        super().__init__(config, iface)
        if config.network is None:
            raise ConfigError("the udp backend needs an IPv4 Network in the config (EnableIPv4 with Network)")
        self.network: IPv4Network = config.network
        try:  # FLANNELPY_* settings, and a network too large for the route table: the daemon's exit code 2
            self.datapath_kind = choose_datapath(datapath)
            self.batch = choose_batch(batch)
            self.threads = choose_threads(threads)
            # The pure-Python loops hold the GIL: at real-time priority they could starve the control plane.
            self.realtime = choose_rtprio(rtprio) if self.datapath_kind == "compiled" else Realtime()
            self.offloads_wanted = choose_offloads(offload, self.batch, self.datapath_kind)
            mod = core_module(self.datapath_kind)
            self.table = mod.RouteTable(int(self.network.network_address), self.network.prefixlen,
                                        config.subnet_len)
            self.core = mod.PacketCore(self.table, self.mtu)
        except ValueError as e:
            raise ConfigError(f"udp backend: {e}") from None
        self.tun_name = tun_name
        self._rt_refused: str | None = None  # why the kernel refused SCHED_RR at start, if it did
        self._rt_lock = threading.Lock()
        self.offloads = Offloads()  # what the kernel granted, known after start()
        self.port = config.backend.port
        self.tun: TunDevice | None = None
        self.sock: socket.socket | None = None
        self.datapath: Datapath | None = None
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unrouted: dict[IPv4Network, str] = {}  # remote leases known and not usable now -> why (logged)

    @property
    def mtu(self) -> int:
        return self.config.backend.mtu or self.iface.mtu - UDP_OVERHEAD

    async def lease_attrs(self) -> LeaseAttrs:
        # flanneld's udp lease carries no BackendType: {"PublicIP":"…","PublicIPv6":null}.
        return LeaseAttrs(public_ip=self.iface.public_ip, backend_type=None)

    async def start(self, lease: Lease) -> None:
        self.lease = lease
        self._loop = asyncio.get_running_loop()
        self.core.set_own_subnet(int(lease.subnet.network_address), lease.subnet.prefixlen)
        address = lease.subnet.network_address  # flanneld gives flannel0 `<subnet>.0/32`
        wanted = self.offloads_wanted
        creating = asyncio.ensure_future(asyncio.to_thread(
            TunDevice.create, self.tun_name, address, self.mtu, self.network, vnet_hdr=wanted.vnet_hdr,
            tso=wanted.tso))
        try:
            self.tun = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The thread goes on and creates the device: close it, or flannel0 stays busy for the next start.
            with contextlib.suppress(Exception):
                tun = await creating
                await asyncio.to_thread(tun.close)
            raise
        try:
            self.sock = self._bind()
            self.offloads = Offloads(tso=self.tun.tso, gso=wanted.gso and enable_udp_gso(self.sock),
                                     gro=wanted.gro and enable_udp_gro(self.sock))
            if self.offloads != wanted:
                log.warning("udp offloads refused by the kernel, running without them", wanted=wanted.describe(),
                            granted=self.offloads.describe())
            self.datapath = make_datapath(self.datapath_kind, self.core, self.tun.fd, self.sock.fileno(),
                                          self.port, self.batch, vnet_hdr=self.tun.vnet_hdr,
                                          gso=self.offloads.gso, gro=self.offloads.gro,
                                          auto_rtprio=await self._auto_rtprio())
            for name, target in loops(self.datapath, self.threads):
                t = threading.Thread(target=self._run_loop, args=(name, target), name=f"flannelpy-{name}",
                                     daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            await self.stop()
            raise
        log.info("udp backend started", device=self.tun.name, subnet=str(lease.subnet), mtu=self.mtu,
                 listen=f"{self.iface.ip}:{self.port}", datapath=self.datapath_kind, batch=self.batch,
                 offloads=self.offloads.describe(), threads=self.threads, rtprio=self.realtime.describe())

    async def _auto_rtprio(self) -> int:
        """The priority for auto mode, or 0 where it cannot or must not be used (said once, at start)."""
        rt = self.realtime
        if not rt.auto:
            return 0
        limit = cgroup_cpu_limit()
        if limit is not None:
            # Real-time threads escape CFS bandwidth control: the quota the operator set would not hold.
            log.info("data path stays under normal scheduling: a cgroup CPU quota applies", cpus=limit,
                     hint="FLANNELPY_UDP_RTPRIO=1 overrides")
            return 0
        refused = await asyncio.to_thread(probe_realtime, rt.prio)
        if refused:
            self._rt_refused = refused
            log.info("data path stays under normal scheduling: real-time priority refused", error=refused,
                     hint="FLANNELPY_UDP_RTPRIO=0 silences this")
            return 0
        return rt.prio

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            sock.bind((str(self.iface.ip), self.port))
        except OSError as e:
            sock.close()
            raise FlannelError(
                f"cannot bind UDP {self.iface.ip}:{self.port}: {e.strerror}; is another flanneld running, "
                "or is Backend.Port taken?"
            ) from None
        return sock

    def _run_loop(self, name: str, target: Callable[[], None]) -> None:
        refused = None if self.realtime.auto else make_realtime(self.realtime.prio)
        if refused:
            with self._rt_lock:  # one warning, not one per loop thread
                first = self._rt_refused is None
                self._rt_refused = refused
            if first:
                log.warning("data path stays under normal scheduling: real-time priority refused",
                            rtprio=self.realtime.prio, error=refused, hint="FLANNELPY_UDP_RTPRIO=0 silences this")
        try:
            target()
        except BaseException as e:  # reported to run() on the event loop
            log.error("data path loop stopped", loop=name, error=str(e))
            self._failure = e
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._failed.set)

    @property
    def leases_not_routed(self) -> int:
        """Remote leases not routed now (another backend type, a subnet of another shape, ...): a gauge."""
        return len(self._unrouted)

    async def apply(self, added: list[Lease], removed: list[Lease]) -> None:
        for lease in removed:
            self._unrouted.pop(lease.subnet, None)
            subnet = int(lease.subnet.network_address)
            # Only if the slot still points at this lease's host: a newer lease may hold the subnet.
            if self._usable(lease, quiet=True) and self.table.lookup(subnet) == int(lease.attrs.public_ip):
                self.table.remove(subnet)
                log.info("route removed", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip))
        for lease in added:
            if not self._usable(lease):
                # A subnet whose lease changed to another backend no longer goes through us.
                if lease.subnet.prefixlen == self.config.subnet_len and lease.subnet.subnet_of(self.network):
                    self.table.remove(int(lease.subnet.network_address))
                continue
            self._unrouted.pop(lease.subnet, None)
            peer = int(lease.attrs.public_ip)
            if self.table.lookup(int(lease.subnet.network_address)) != peer:
                self.table.set(int(lease.subnet.network_address), peer)
                log.info("route added", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip))

    def _usable(self, lease: Lease, quiet: bool = False) -> bool:
        reason = ""
        if lease.attrs.effective_backend != self.type:
            reason = f"backend {lease.attrs.effective_backend}"
        elif lease.subnet.prefixlen != self.config.subnet_len or not lease.subnet.subnet_of(self.network):
            reason = f"subnet outside {self.network} or not /{self.config.subnet_len}"
        elif self.lease is not None and lease.subnet == self.lease.subnet:
            reason = "our own subnet"
        elif self.lease is not None and lease.attrs.public_ip == self.lease.attrs.public_ip:
            # A stale or forged second lease of this host: routing it would send packets to ourselves.
            reason = "lease announces this host's own public IP"
        elif int(lease.attrs.public_ip) in (0, 0xFFFFFFFF):
            reason = "PublicIP is not unicast"
        if not reason:
            return True
        if not quiet and self._unrouted.get(lease.subnet) != reason:
            self._unrouted[lease.subnet] = reason  # said once while it stays unusable for that reason
            log.warning("lease ignored by the udp backend", subnet=str(lease.subnet),
                        public_ip=str(lease.attrs.public_ip), reason=reason)
        return False

    async def run(self) -> None:
        """Waits until a data-path loop fails, then raises DatapathError (the daemon exits)."""
        await self._failed.wait()
        raise DatapathError(f"udp data path stopped: {self._failure}")

    async def stop(self) -> None:
        if self.datapath is not None:
            self.datapath.stop()
        threads, self._threads = self._threads, []
        for t in threads:
            await asyncio.to_thread(t.join, STOP_TIMEOUT)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            # Its socket and TUN stay open: closed, their fd numbers could be reused at once by something else
            # (a netlink socket, a log file), which the loop would then read and write.
            log.error("data path loop did not stop; leaving its socket and TUN open", loops=alive)
            return
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        close: Any = getattr(self.datapath, "close", None)
        if close is not None:
            close()
        self.datapath = None
        if self.tun is not None:
            await asyncio.to_thread(self.tun.close)
            log.info("TUN device removed", device=self.tun.name)
            self.tun = None

    def counters(self) -> dict[str, int]:
        counts: dict[str, int] = self.core.counters()
        promotions = getattr(self.datapath, "rt_promotions", None)
        if promotions is not None:  # the compiled data path: times a loop went to SCHED_RR in auto mode
            counts["realtime_promotions"] = int(promotions)
        return counts

    @property
    def realtime_threads(self) -> int:
        """Data-path loops under SCHED_RR right now (auto mode moves them; a fixed priority keeps them)."""
        if self.datapath is None:
            return 0
        if not self.realtime.auto:
            return len(self._threads) if self.realtime.prio and self._rt_refused is None else 0
        return int(getattr(self.datapath, "rt_threads", 0))

    @property
    def realtime_refused(self) -> str | None:
        """Why the kernel refused SCHED_RR (at start, or later in auto mode), or None: then the data path runs
        under normal scheduling whatever FLANNELPY_UDP_RTPRIO asks."""
        if self._rt_refused is not None:
            return self._rt_refused
        err = int(getattr(self.datapath, "rt_error", 0) or 0)
        # The start-up probe passed and a later switch failed, e.g. the daemon was moved into a cgroup v1
        # group without real-time runtime.
        return f"{os.strerror(err)} (errno {err}), after start" if err else None
