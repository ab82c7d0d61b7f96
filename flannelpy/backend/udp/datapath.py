"""The udp backend's data path: the compiled loops (fastpath.io) or a pure-Python reference.

Both expose the same object: run() (both directions in one thread) or run_encap() and run_decap() (one
thread each), every one blocking until stop(); stop(); and the PacketCore whose counters the backend
reports. The Python one is slow on purpose: it is the reference the benchmark harness compares against,
and it works without a C compiler.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flannelpy import packet

DATAPATHS = ("compiled", "python")
DEFAULT_BATCH = 64


class Datapath(Protocol):
    batch: int

    def run(self) -> None: ...
    def run_encap(self) -> None: ...
    def run_decap(self) -> None: ...
    def stop(self) -> None: ...


def choose_datapath(kind: str | None) -> str:
    """The datapath kind: the argument, else FLANNELPY_DATAPATH, else compiled."""
    value = (kind or os.environ.get("FLANNELPY_DATAPATH") or "compiled").strip().lower()
    if value not in DATAPATHS:
        raise ValueError(f"datapath {value!r} unknown: use one of {', '.join(DATAPATHS)} (FLANNELPY_DATAPATH)")
    return value


def choose_batch(batch: int | None) -> int:
    """Packets per wake-up: the argument, else FLANNELPY_BATCH, else 64 (1 = one packet per system call)."""
    raw = batch if batch is not None else os.environ.get("FLANNELPY_BATCH") or DEFAULT_BATCH
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"FLANNELPY_BATCH={raw!r} is not a number: use 1..1024") from None
    if not 1 <= value <= 1024:
        raise ValueError(f"batch={value} out of range: use 1..1024 (FLANNELPY_BATCH)")
    return value


def _up_from(base: Path, rel: str) -> list[Path]:
    """base/rel, then each parent up to base itself."""
    parts = [p for p in rel.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"),
                     self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs' worth of time this process's cgroup allows (cgroup v2 cpu.max, v1 cpu.cfs_quota_us), or None
    when unlimited or unknown. Every group from the process's own up to the root counts (a pod's quota holds
    for the containers below it), the smallest wins; a container sees its own cgroup at the mount root."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2]
        try:
            if controllers == "":  # cgroup v2
                for d in _up_from(root, rel):
                    if (d / "cpu.max").is_file():
                        quota, period = (d / "cpu.max").read_text().split()[:2]
                        if quota != "max":
                            limits.append(int(quota) / int(period))
            elif "cpu" in controllers.split(","):
                # Once each: the two hierarchies coincide when the controller list is just "cpu".
                for d in dict.fromkeys([*_up_from(root / controllers, rel), *_up_from(root / "cpu", rel)]):
                    if (d / "cpu.cfs_quota_us").is_file():
                        quota_us = int((d / "cpu.cfs_quota_us").read_text())
                        period_us = int((d / "cpu.cfs_period_us").read_text())
                        if quota_us > 0:
                            limits.append(quota_us / period_us)
        except (OSError, ValueError, ZeroDivisionError):
            return None
    return min(limits) if limits else None


def choose_threads(threads: int | None) -> int:
    """Data-path threads: the argument, else FLANNELPY_UDP_THREADS, else 1 when this process may use at most
    two CPUs (its CPU affinity, and its cgroup's CPU quota) and 2 otherwise. One thread does both directions
    (fewer wake-ups, less CPU per GB: the better choice where the daemon shares two cores with the containers,
    see docs/benchmarks.md); two let encapsulation and decapsulation run on different cores."""
    raw = str(threads if threads is not None else os.environ.get("FLANNELPY_UDP_THREADS") or "auto").strip().lower()
    if raw == "auto":
        cpus = float(len(os.sched_getaffinity(0)))
        limit = cgroup_cpu_limit()
        if limit is not None:
            cpus = min(cpus, limit)
        return 1 if cpus <= 2 else 2
    if raw not in ("1", "2"):
        raise ValueError(f"FLANNELPY_UDP_THREADS={raw!r}: use 1 (both directions in one thread), 2 (one "
                         "thread each) or auto")
    return int(raw)


@dataclass(frozen=True)
class Realtime:
    """How the compiled data-path threads are scheduled: prio 0 normal scheduling; auto False SCHED_RR at prio
    all the time; auto True SCHED_RR at prio only while a loop carries a bulk TCP transfer, waits for a CPU and
    other traffic keeps coming beside the transfer (decided every 100 ms, fastpath/io.pyx rt_step)."""

    prio: int = 0
    auto: bool = False

    def describe(self) -> str:
        return "auto" if self.auto else str(self.prio)


def choose_rtprio(rtprio: int | str | None) -> Realtime:
    """Real-time priority of the data-path threads: the argument, else FLANNELPY_UDP_RTPRIO, else auto.
    0 normal scheduling; 1..99 SCHED_RR at that priority; auto SCHED_RR at priority 1 while it pays.

    The trade-off, measured on 2 cores (docs/benchmarks.md, "Latency under load"): at real-time priority a
    loop runs as soon as a packet arrives, like the kernel's softirq, so other traffic no longer waits behind
    the processes of a bulk transfer (ping under one TCP stream 2.5 -> 0.27 ms); but it also preempts whatever
    produces the packets at every arrival, so small-packet batches shrink, the idle round trip grows by a
    fifth, and a local flood's endpoints starve (64-byte rate 135 -> 42 kpps); held through a lone bulk
    transfer, it costs that transfer ~10%. auto keeps the first and avoids the rest: a loop goes to SCHED_RR
    only while most of its packets are parts of TCP super-packets (a bulk transfer, already batched by the
    kernel), it waited for a CPU a tenth of the time or more, and other traffic (a ping, requests) keeps
    coming beside the transfer; back as soon as that ends. Real-time threads are outside CFS bandwidth
    control, so auto stays off under a cgroup CPU quota (UdpBackend start); a fixed priority is the
    operator's explicit choice."""
    raw = str(rtprio if rtprio is not None else os.environ.get("FLANNELPY_UDP_RTPRIO") or "auto").strip().lower()
    if raw == "auto":
        return Realtime(1, auto=True)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"FLANNELPY_UDP_RTPRIO={raw!r} is not a number: use auto (SCHED_RR while a bulk "
                         "transfer makes the data path wait), 0 (normal scheduling) or 1..99 (SCHED_RR "
                         "priority)") from None
    if not 0 <= value <= 99:
        raise ValueError(f"FLANNELPY_UDP_RTPRIO={value} out of range: use auto, 0 (normal scheduling) or 1..99")
    return Realtime(value)


def make_realtime(rtprio: int) -> str | None:
    """Puts the calling thread under SCHED_RR at rtprio (0: nothing to do); None, or why the kernel refused
    (no CAP_SYS_NICE, or a cgroup without real-time runtime): the thread then keeps normal scheduling."""
    if rtprio == 0:
        return None
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(rtprio))
    except OSError as e:
        return f"{e.strerror or e} (needs CAP_SYS_NICE and, with cgroup v1 RT groups, cpu.rt_runtime_us > 0)"
    return None


def probe_realtime(rtprio: int) -> str | None:
    """Whether the kernel lets the calling thread go to SCHED_RR at rtprio: None, or why not. The thread is
    back under normal scheduling afterwards."""
    refused = make_realtime(rtprio)
    if refused is None:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return refused


def loops(datapath: Datapath, threads: int) -> tuple[tuple[str, Callable[[], None]], ...]:
    """The (name, loop) pairs to run, one thread each: run() alone, or run_encap() and run_decap()."""
    if threads == 1:
        return (("data", datapath.run),)
    return (("encap", datapath.run_encap), ("decap", datapath.run_decap))


def core_module(kind: str) -> Any:
    """fastpath.core for the compiled data path, flannelpy.packet for the Python one."""
    if kind == "python":
        return packet
    try:
        from fastpath import core
    except ImportError as e:
        raise ImportError(
            f"the compiled data path is not built ({e}); run `python setup.py build_ext --inplace` "
            "or set FLANNELPY_DATAPATH=python"
        ) from None
    return core


def make_datapath(kind: str, core: Any, tun_fd: int, udp_fd: int, port: int,
                  batch: int = DEFAULT_BATCH, *, vnet_hdr: bool = False, gso: bool = False,
                  gro: bool = False, auto_rtprio: int = 0) -> Datapath:
    """vnet_hdr, gso, gro: what the TUN and the socket were given; auto_rtprio: the SCHED_RR priority a loop
    takes while it carries a bulk transfer, 0 never (compiled data path only)."""
    if kind == "python":
        if vnet_hdr or gso or gro:
            raise ValueError("the Python data path has no offloads (vnet_hdr, gso, gro)")
        if auto_rtprio:
            raise ValueError("the Python data path never runs at real-time priority (its loops hold the GIL)")
        return PythonDatapath(core, tun_fd, udp_fd, port, batch)
    from fastpath import io

    dp: Datapath = io.Datapath(core, tun_fd, udp_fd, port, batch, vnet_hdr=vnet_hdr, gso=gso, gro=gro,
                               auto_rtprio=auto_rtprio)
    return dp


class PythonDatapath:
    """The reference loops: same structure as fastpath/io.pyx, one system call per packet."""

    def __init__(self, core: packet.PacketCore, tun_fd: int, udp_fd: int, port: int,
                 batch: int = DEFAULT_BATCH) -> None:
        if not 1 <= batch <= 1024:
            raise ValueError(f"batch={batch} out of range 1..1024")
        self.core = core
        self.tun_fd = tun_fd
        self.sock = socket.socket(fileno=os.dup(udp_fd))
        self.port = port
        self.batch = batch
        self.bufsize = ((core.mtu + 1 + 63) // 64) * 64
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._ebuf = bytearray(self.bufsize)  # one buffer per direction: run() may drive both in one thread
        self._dbuf = bytearray(self.bufsize)
        self._reply = bytearray(packet.ICMP_REPLY_MAX)

    def stop(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)

    def _wait(self, *fds: int) -> set[int]:
        """The readable ones of fds (at least one), or an empty set when stop was requested."""
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_r in events:
                return set()
            if any(events.get(fd, 0) & select.POLLNVAL for fd in fds):
                raise OSError(errno.EBADF, "fd closed under the data path")
            ready = {fd for fd in fds if fd in events}
            if ready:
                return ready

    def run(self) -> None:
        tun, sock = self.tun_fd, self.sock.fileno()
        while ready := self._wait(tun, sock):
            if tun in ready:
                self._encap_batch()
            if sock in ready:
                self._decap_batch()

    def run_encap(self) -> None:
        while self._wait(self.tun_fd):
            self._encap_batch()

    def run_decap(self) -> None:
        while self._wait(self.sock.fileno()):
            self._decap_batch()

    def _encap_batch(self) -> None:
        """Up to `batch` packets from the TUN."""
        core, tun, sock, port = self.core, self.tun_fd, self.sock, self.port
        buf, reply = self._ebuf, self._reply
        for _ in range(self.batch):
            try:
                data = os.read(tun, self.bufsize)
            except BlockingIOError:
                break
            if not data:
                raise OSError(errno.EPIPE, "encap loop stopped: end of file on the TUN")
            n = len(data)
            buf[:n] = data
            view = memoryview(buf)[:n]
            verdict, value = core.encap(view, reply)
            if verdict == packet.FORWARD:
                try:
                    # Never blocks (a full send buffer drops, as the compiled path does after a short wait):
                    # a blocked send would stall the other direction and stop().
                    sock.sendto(view, socket.MSG_DONTWAIT, (str_ip(value), port))
                except OSError:
                    core.count(packet.ENCAP_DROP_SEND_ERROR)
            elif verdict == packet.ICMP:
                try:
                    os.write(tun, reply[:value])
                except OSError:
                    core.count(packet.ICMP_WRITE_ERROR)

    def _decap_batch(self) -> None:
        """Up to `batch` datagrams from the socket."""
        core, tun, sock = self.core, self.tun_fd, self.sock
        buf = self._dbuf
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        for _ in range(self.batch):
            try:
                n, addr = sock.recvfrom_into(buf, self.bufsize, flags)
            except (BlockingIOError, InterruptedError):
                break
            verdict, value = core.decap(buf, _int_ip(addr[0]), n)
            if verdict == packet.DELIVER:
                try:
                    os.write(tun, memoryview(buf)[:value])
                except OSError:
                    core.count(packet.DECAP_DROP_WRITE_ERROR)


def str_ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def _int_ip(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")
