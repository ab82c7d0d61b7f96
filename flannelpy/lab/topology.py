"""A multi-host network built from Linux network namespaces, for tests, the demo and benchmarks.

Layout (every namespace name starts with the per-run prefix, so runs never collide):

    <prefix>-sw          one bridge `sw0`; one veth port per host
    <prefix>-h1 .. hN    `eth0` (10.99.0.<i>/24) on the switch; ip_forward=1; bridge `docker0`
    <prefix>-h1-c1 ..    "containers": `eth0` into the host's docker0, addressed like Docker's --bip

Every link lives inside a namespace the topology created (veth pairs are created directly in their
namespaces), so the machine's own namespace is never touched. Deleting a namespace deletes its links;
processes still running in a namespace are killed by PID before the namespace is deleted.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from types import FrameType, TracebackType

import structlog

log = structlog.get_logger()

# The hosts' network. It exists only inside the namespaces: nothing routes it outside them.
HOST_NETWORK = IPv4Network("10.99.0.0/24")
HOST_IFACE = "eth0"
SWITCH_BRIDGE = "sw0"
CONTAINER_BRIDGE = "docker0"
CONTAINER_IFACE = "eth0"


class LabError(RuntimeError):
    """A lab step failed; the message names the command and what it printed."""


def new_prefix() -> str:
    """Unique per run (PID and random bits), so concurrent runs never share a namespace name."""
    return f"fp{os.getpid() % 10000}{secrets.token_hex(2)}"


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def netns_exec(netns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside `netns`; `ip netns exec` execs, so the PID is the command's own."""
    return ["ip", "netns", "exec", netns, *argv]


def netns_pids(netns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def kill_netns_processes(netns: str, grace: float = 2.0) -> None:
    """SIGTERM every process in `netns`, SIGKILL what is left after `grace` seconds."""
    pids = [p for p in netns_pids(netns) if p != os.getpid()]  # a caller that entered the namespace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in netns_pids(netns) if p != os.getpid()]
        if not pids:
            return


def list_namespaces(prefix: str) -> list[str]:
    """Namespaces whose name starts with `prefix-` (what a run with that prefix may have left)."""
    out = run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


@dataclass
class Container:
    name: str  # short name, e.g. "h1-c1"
    netns: str
    address: IPv4Address
    host: Host

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return netns_exec(self.netns, argv)


@dataclass
class Host:
    name: str  # short name, e.g. "h1"
    index: int
    netns: str
    address: IPv4Address
    iface: str = HOST_IFACE
    bridge_address: IPv4Interface | None = None  # FLANNEL_SUBNET once containers were added
    mtu: int | None = None
    containers: list[Container] = field(default_factory=list)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return netns_exec(self.netns, argv)


_live: set[Topology] = set()
_live_lock = threading.Lock()
_handlers_pid: int | None = None  # the process that installed the handlers


def _teardown_live() -> None:
    with _live_lock:
        topologies = list(_live)
    for topo in topologies:
        topo.teardown()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _handlers_pid:
        # A forked child (pyroute2's netns helpers fork) dies as it would have without us.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    # Unwind like Ctrl-C does, so context managers and finally blocks run; atexit catches the rest.
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    global _handlers_pid
    if _handlers_pid is not None:
        return
    _handlers_pid = os.getpid()
    atexit.register(_teardown_live)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)


class Topology:
    """N hosts on one switch, each with a docker0-like bridge for its containers.

    Use as a context manager; `teardown()` is idempotent and also runs at interpreter exit and on
    SIGTERM/SIGHUP, so a failure half-way leaves nothing behind.
    """

    def __init__(self, prefix: str | None = None, *, host_mtu: int = 1500) -> None:
        self.prefix = prefix or new_prefix()
        self.owner_pid = os.getpid()  # a forked child inherits this object but must not tear it down
        self.host_mtu = host_mtu
        self.switch_netns = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self._created: list[str] = []  # namespaces in creation order: the teardown record
        self._next_index = 1
        self._switch_ready = False

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    def build(self, hosts: int) -> Topology:
        for _ in range(hosts):
            self.add_host()
        return self

    def teardown(self) -> None:
        """Kill what runs in our namespaces and delete them, newest first (containers before hosts)."""
        if os.getpid() != self.owner_pid:
            return
        with _live_lock:
            _live.discard(self)
        for netns in reversed(self._created):
            kill_netns_processes(netns)
        for netns in reversed(self._created):
            run(["ip", "netns", "del", netns], check=False)
        if self._created:
            log.info("lab topology removed", prefix=self.prefix, namespaces=len(self._created))
        self._created.clear()
        self.hosts.clear()
        self._switch_ready = False

    def _add_netns(self, netns: str) -> None:
        with _live_lock:
            _install_handlers()
            _live.add(self)
        # Recorded before it exists: a half-made namespace is still removed.
        self._created.append(netns)
        run(["ip", "netns", "add", netns])
        self._ip(netns, "link", "set", "lo", "up")

    def _drop_netns(self, netns: str) -> None:
        kill_netns_processes(netns)
        run(["ip", "netns", "del", netns], check=False)
        if netns in self._created:
            self._created.remove(netns)

    @staticmethod
    def _ip(netns: str, *args: str) -> None:
        run(["ip", "-n", netns, *args])

    @staticmethod
    def _sysctl(netns: str, key: str, value: str) -> None:
        run(netns_exec(netns, ["sysctl", "-q", "-w", f"{key}={value}"]))

    def _ensure_switch(self) -> None:
        if self._switch_ready:
            return
        self._add_netns(self.switch_netns)
        self._ip(self.switch_netns, "link", "add", SWITCH_BRIDGE, "type", "bridge")
        self._ip(self.switch_netns, "link", "set", SWITCH_BRIDGE, "up")
        self._switch_ready = True

    # -- hosts -----------------------------------------------------------------------------------

    def add_host(self, name: str | None = None) -> Host:
        """A new host namespace plugged into the switch; can be called while others run."""
        self._ensure_switch()
        index = self._next_index
        if index >= HOST_NETWORK.num_addresses - 1:
            raise LabError(f"no host address left in {HOST_NETWORK}")
        self._next_index += 1
        name = name or f"h{index}"
        if name in self.hosts:
            raise LabError(f"host {name!r} already exists in topology {self.prefix}")
        host = Host(name=name, index=index, netns=f"{self.prefix}-{name}", address=HOST_NETWORK[index])
        self._add_netns(host.netns)
        self.hosts[name] = host
        port = f"{name}"
        sw = self.switch_netns
        self._ip(sw, "link", "add", port, "mtu", str(self.host_mtu), "type", "veth",
                 "peer", "name", host.iface, "netns", host.netns)
        self._ip(sw, "link", "set", port, "master", SWITCH_BRIDGE, "up")
        self._ip(host.netns, "link", "set", host.iface, "mtu", str(self.host_mtu), "up")
        self._ip(host.netns, "addr", "add", f"{host.address}/{HOST_NETWORK.prefixlen}", "dev", host.iface)
        self._sysctl(host.netns, "net.ipv4.ip_forward", "1")
        log.info("lab host added", host=name, netns=host.netns, address=str(host.address))
        return host

    def remove_host(self, name: str) -> None:
        """Unplug a host: its containers and namespace go, with whatever runs in them."""
        host = self.hosts.pop(name)
        for c in reversed(host.containers):
            self._drop_netns(c.netns)
        self._drop_netns(host.netns)
        run(["ip", "-n", self.switch_netns, "link", "del", name], check=False)  # gone with the peer already
        log.info("lab host removed", host=name)

    # -- containers ------------------------------------------------------------------------------

    def add_containers(self, name: str, bridge_address: IPv4Interface, mtu: int, count: int) -> list[Container]:
        """Containers on host `name`, addressed as Docker does with --bip=`bridge_address` --mtu=`mtu`.

        The bridge takes `bridge_address` (FLANNEL_SUBNET, the subnet's first address); containers take
        the next addresses, with a default route via the bridge.
        """
        host = self.hosts[name]
        if host.bridge_address is None:
            self._ip(host.netns, "link", "add", CONTAINER_BRIDGE, "mtu", str(mtu), "type", "bridge")
            self._ip(host.netns, "addr", "add", str(bridge_address), "dev", CONTAINER_BRIDGE)
            self._ip(host.netns, "link", "set", CONTAINER_BRIDGE, "up")
            host.bridge_address, host.mtu = bridge_address, mtu
        elif host.bridge_address != bridge_address:
            raise LabError(f"host {name} already has {CONTAINER_BRIDGE} {host.bridge_address}, not {bridge_address}")
        added = []
        hosts_in_subnet = bridge_address.network.hosts()
        used = {bridge_address.ip, *(c.address for c in host.containers)}
        for _ in range(count):
            n = len(host.containers) + 1
            address = next(a for a in hosts_in_subnet if a not in used)
            used.add(address)
            c = Container(name=f"{name}-c{n}", netns=f"{host.netns}-c{n}", address=address, host=host)
            self._add_netns(c.netns)
            port = f"veth{n}"
            self._ip(host.netns, "link", "add", port, "mtu", str(mtu), "type", "veth",
                     "peer", "name", CONTAINER_IFACE, "netns", c.netns)
            self._ip(host.netns, "link", "set", port, "master", CONTAINER_BRIDGE, "up")
            self._ip(c.netns, "link", "set", CONTAINER_IFACE, "mtu", str(mtu), "up")
            self._ip(c.netns, "addr", "add", f"{address}/{bridge_address.network.prefixlen}", "dev", CONTAINER_IFACE)
            self._ip(c.netns, "route", "add", "default", "via", str(bridge_address.ip))
            host.containers.append(c)
            added.append(c)
        log.info("lab containers added", host=name, addresses=[str(c.address) for c in added])
        return added

    # -- queries ---------------------------------------------------------------------------------

    def containers(self) -> Iterator[Container]:
        for host in self.hosts.values():
            yield from host.containers

    def namespaces(self) -> list[str]:
        return list(self._created)
