"""A flannel cluster on one machine: hosts in namespaces, a 3-member etcd, one flannelpy daemon per host.

    with Cluster(hosts=3) as cluster:          # seed tutorial's config: /flannel_use/network, 10.10.0.0/16
        a, b = cluster.container("h1-c1"), cluster.container("h2-c2")
        print(cluster.ping(a, b))

Everything the cluster starts is stopped by PID and every namespace is removed on exit, on Ctrl-C and when
start-up fails half-way. Used by tests/e2e, `flannelpy demo` and the benchmarks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

import flannelpy
from flannelpy.host.subnet_file import read_subnet_file
from flannelpy.ip import parse_subnet_key, subnet_key
from flannelpy.lab import probe
from flannelpy.lab.etcd import EtcdCluster, EtcdMemberSpec
from flannelpy.lab.topology import Container, Host, LabError, Topology, run

log = structlog.get_logger()

SEED_PREFIX = "/flannel_use/network"
SEED_NETWORK = "10.10.0.0/16"
PROJECT_ROOT = Path(flannelpy.__file__).resolve().parent.parent
ETCD_MEMBERS = 3

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SubnetEnv:
    """The daemon's subnet file (FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ)."""

    network: IPv4Network
    subnet: IPv4Interface  # the lease's first address with its prefix: Docker's --bip
    mtu: int
    ipmasq: bool
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> SubnetEnv:
        raw = read_subnet_file(path)
        try:
            return cls(IPv4Network(raw["FLANNEL_NETWORK"]), IPv4Interface(raw["FLANNEL_SUBNET"]),
                       int(raw["FLANNEL_MTU"]), raw.get("FLANNEL_IPMASQ", "false") == "true", raw)
        except (KeyError, ValueError) as e:
            raise LabError(f"subnet file {path} is incomplete or malformed ({e!r}): {raw}") from None


@dataclass(frozen=True)
class PingResult:
    src: str
    dst: str
    sent: int
    received: int
    rtt_ms: float | None
    unreachable: dict[str, int]

    @property
    def lost(self) -> int:
        return self.sent - self.received


@dataclass(frozen=True)
class TransferResult:
    """A TCP transfer: what the sender hashed and what the receiver hashed."""

    sent_bytes: int
    received_bytes: int
    sent_sha256: str
    received_sha256: str
    seconds: float

    @property
    def intact(self) -> bool:
        return self.sent_bytes == self.received_bytes and self.sent_sha256 == self.received_sha256


class BackgroundPing:
    """A ping that runs until stop(); every reply still in flight is waited for."""

    def __init__(self, cluster: Cluster, src: Container, dst: IPv4Address, interval: float) -> None:
        self.src, self.dst = src, dst
        self._proc = cluster.popen(src, probe_argv("ping", str(dst), "--count", "0",
                                                   "--interval", str(interval), "--wait", "2"))

    def stop(self) -> PingResult:
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        out, err = self._proc.communicate(timeout=15)
        return _ping_result(self.src.name, out, err)


def probe_argv(*args: str) -> list[str]:
    # By path, not -m: the probe needs only the stdlib and starts fast in every namespace.
    return [sys.executable, probe.__file__, *args]


def _ping_result(src: str, out: str, err: str) -> PingResult:
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise LabError(f"ping from {src} printed no result: {out!r} {err!r}") from None
    return PingResult(src, data["dst"], data["sent"], data["received"], data["rtt_ms"], data["unreachable"])


class Cluster:
    """Hosts, etcd and daemons; `start()` (or `with`) builds everything, `stop()` removes everything."""

    def __init__(
        self,
        hosts: int = 3,
        containers_per_host: int = 2,
        *,
        backend: str = "udp",
        etcd_prefix: str = SEED_PREFIX,
        network: str = SEED_NETWORK,
        config: dict[str, Any] | None = None,
        workdir: Path | None = None,
        daemon_args: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> None:
        if hosts < 1:
            raise ValueError("a cluster needs at least one host")
        self.host_count = hosts
        self.containers_per_host = containers_per_host
        self.etcd_prefix = etcd_prefix.rstrip("/")
        if config is None:
            # The seed's config has no Backend: flannel's default is udp.
            config = {"Network": network}
            if backend != "udp":
                config["Backend"] = {"Type": backend}
        self.config = config
        self.backend = str(config.get("Backend", {}).get("Type", "udp"))
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="flannelpy-lab-"))
        self.daemon_args = list(daemon_args)
        self._progress = progress or (lambda message: None)
        self.topology = Topology()
        self.etcd: EtcdCluster | None = None
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> Cluster:
        try:
            self._progress(f"building {self.host_count} hosts in network namespaces ({self.topology.prefix}-*)")
            self.topology.build(self.host_count)
            members = [
                EtcdMemberSpec(h.name, str(h.address), netns=h.netns)
                for h in list(self.topology.hosts.values())[:ETCD_MEMBERS]
            ]
            self._progress(f"starting a {len(members)}-member etcd cluster on {', '.join(m.ip for m in members)}")
            self.etcd = EtcdCluster(self.workdir / "etcd", members)
            self.etcd.start(timeout)
            self._progress(f"writing the network config to {self.etcd_prefix}/config: {json.dumps(self.config)}")
            self.etcdctl("put", f"{self.etcd_prefix}/config", json.dumps(self.config))
            hosts = list(self.topology.hosts.values())
            self._progress(f"starting flannelpy ({self.backend} backend) on {', '.join(h.name for h in hosts)}")
            for host in hosts:
                self.start_daemon(host.name)
            for host in hosts:
                self._add_containers(host, self.containers_per_host, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Daemons, then etcd, then namespaces; each step runs even if an earlier one fails."""
        try:
            for name in list(self.daemons):
                self.stop_daemon(name)
        finally:
            try:
                if self.etcd is not None:
                    self.etcd.stop()
            finally:
                self.topology.teardown()
                if self._own_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    # -- daemons ---------------------------------------------------------------------------------

    def host_dir(self, name: str) -> Path:
        return self.workdir / name

    def subnet_file(self, name: str) -> Path:
        # Per host: the namespaces share one filesystem.
        return self.host_dir(name) / "subnet.env"

    def log_file(self, name: str) -> Path:
        return self.host_dir(name) / "flannelpy.log"

    @property
    def endpoints(self) -> list[str]:
        if self.etcd is None:
            raise LabError("etcd is not running")
        return self.etcd.endpoints

    def daemon_argv(self, host: Host) -> list[str]:
        return host.exec_argv([
            sys.executable, "-m", "flannelpy",
            f"--etcd-endpoints={','.join(self.endpoints)}",
            f"--etcd-prefix={self.etcd_prefix}",
            f"--iface={host.iface}",
            f"--subnet-file={self.subnet_file(host.name)}",
            *self.daemon_args,
        ])

    def start_daemon(self, name: str) -> subprocess.Popen[bytes]:
        host = self.topology.hosts[name]
        self.host_dir(name).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}  # the flags say it all
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_file(name), "ab") as logf:
            proc = subprocess.Popen(self.daemon_argv(host), stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.daemons[name] = proc
        log.info("lab daemon started", host=name, pid=proc.pid)
        return proc

    def stop_daemon(self, name: str, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        proc = self.daemons.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("lab daemon ignored SIGTERM, killing it", host=name, pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(grace)
        log.info("lab daemon stopped", host=name, pid=proc.pid, code=proc.returncode)
        return proc.returncode

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_subnet_env(self, name: str, timeout: float = 60.0) -> SubnetEnv:
        """The subnet file appears once the daemon's backend is ready."""
        path = self.subnet_file(name)
        deadline = time.monotonic() + timeout
        while not path.exists():
            proc = self.daemons.get(name)
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise LabError(f"flannelpy on {name} exited ({code}) before writing {path}; "
                               f"{self.log_file(name)}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise LabError(f"flannelpy on {name} wrote no {path} within {timeout}s; "
                               f"{self.log_file(name)}:\n{self.log_tail(name)}")
            time.sleep(0.05)
        return SubnetEnv.read(path)

    def _add_containers(self, host: Host, count: int, timeout: float) -> None:
        env = self.wait_subnet_env(host.name, timeout)
        self._progress(f"{host.name}: lease {env.subnet.network}, docker0 {env.subnet}, MTU {env.mtu}")
        if count:
            self.topology.add_containers(host.name, env.subnet, env.mtu, count)

    # -- hosts joining and leaving ---------------------------------------------------------------

    def add_host(self, containers: int | None = None, timeout: float = 60.0) -> Host:
        """A new host joins the running cluster: namespace, daemon, subnet file, containers."""
        host = self.topology.add_host()
        self.start_daemon(host.name)
        self._add_containers(host, self.containers_per_host if containers is None else containers, timeout)
        return host

    def remove_host(self, name: str, *, delete_lease: bool = True) -> IPv4Network | None:
        """The host leaves: its daemon stops (keeping its lease, as flanneld does), then the lease key is
        deleted so the others drop its routes; returns the subnet it held."""
        env = SubnetEnv.read(self.subnet_file(name)) if self.subnet_file(name).exists() else None
        self.stop_daemon(name)
        if self.etcd is not None and any(m.name == name for m in self.etcd.members):
            self.etcd.kill_member(name, signal.SIGTERM)  # the others keep a quorum only if 2 of 3 remain
        subnet = env.subnet.network if env else None
        if delete_lease and subnet is not None:
            self.delete_lease(subnet)
        self.topology.remove_host(name)
        return subnet

    # -- etcd ------------------------------------------------------------------------------------

    def etcdctl(self, *args: str, timeout: float = 15.0) -> str:
        """etcdctl (v3 API) inside a host namespace: etcd listens only on the hosts' network."""
        alive = {m.name for m in self.etcd.members if self.etcd.pid(m.name)} if self.etcd else set()
        host = next((h for h in self.topology.hosts.values() if h.name in alive), None)
        if host is None:
            raise LabError("no host with a running etcd member left to run etcdctl in")
        env = {**os.environ, "ETCDCTL_API": "3"}
        argv = host.exec_argv(["etcdctl", f"--endpoints={','.join(self.endpoints)}", *args])
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise LabError(f"etcdctl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def leases(self) -> dict[IPv4Network, dict[str, Any]]:
        """Subnet -> lease value, as stored under <prefix>/subnets/."""
        out = self.etcdctl("get", "--prefix", f"{self.etcd_prefix}/subnets/")
        lines = out.splitlines()
        return {parse_subnet_key(key)[0]: json.loads(value) for key, value in zip(lines[::2], lines[1::2], strict=True)}

    def delete_lease(self, subnet: IPv4Network) -> None:
        self.etcdctl("del", f"{self.etcd_prefix}/subnets/{subnet_key(subnet)}")

    # -- traffic ---------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        return self.topology.hosts[name]

    def container(self, name: str) -> Container:
        for c in self.topology.containers():
            if c.name == name:
                return c
        raise KeyError(f"no container {name!r}; containers: {[c.name for c in self.topology.containers()]}")

    def containers(self) -> Iterator[Container]:
        return self.topology.containers()

    def run(self, where: Container | Host, argv: Sequence[str], *, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(where.exec_argv(argv), check=check, timeout=timeout)

    def popen(self, where: Container | Host, argv: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(where.exec_argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)

    def ping(self, src: Container, dst: Container | IPv4Address, *, count: int = 3,
             interval: float = 0.2, wait: float = 2.0) -> PingResult:
        address = dst.address if isinstance(dst, Container) else dst
        proc = self.run(src, probe_argv("ping", str(address), "--count", str(count),
                                        "--interval", str(interval), "--wait", str(wait)))
        return _ping_result(src.name, proc.stdout, proc.stderr)

    def wait_reachable(self, src: Container, dst: Container | IPv4Address, timeout: float = 15.0) -> PingResult:
        """Ping once at a time until a reply (a new lease reaches every daemon through its etcd watch)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.ping(src, dst, count=1, wait=0.5)
            if result.received or time.monotonic() > deadline:
                return result

    def ping_across_hosts(self, count: int = 3) -> dict[tuple[str, str], PingResult]:
        """From the first container of each host to the last container of every other host, in parallel,
        once each path answers; keyed by (source host, destination host)."""
        hosts = list(self.topology.hosts.values())
        pairs = [(a.containers[0], b.containers[-1]) for a, b in itertools.permutations(hosts, 2)]

        def measure(pair: tuple[Container, Container]) -> PingResult:
            self.wait_reachable(*pair)
            return self.ping(*pair, count=count)

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(measure, pairs))
        return {(a.host.name, b.host.name): r for (a, b), r in zip(pairs, results, strict=True)}

    def ping_background(self, src: Container, dst: Container | IPv4Address,
                        interval: float = 0.05) -> BackgroundPing:
        return BackgroundPing(self, src, dst.address if isinstance(dst, Container) else dst, interval)

    def udp_unreachable(self, src: Container, dst: IPv4Address, timeout: float = 5.0) -> str | None:
        """The errno name a connected UDP socket in `src` reports for `dst` (None: no error seen)."""
        proc = self.run(src, probe_argv("udp-unreach", str(dst), "9", "--timeout", str(timeout)))
        error: str | None = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
        return error

    def tcp_transfer(self, src: Container, dst: Container, size: int, *, port: int = 5300,
                     timeout: float = 300.0) -> TransferResult:
        """Send `size` random bytes from src to dst over TCP; both ends hash what they saw."""
        receiver = self.popen(dst, probe_argv("tcp-recv", str(port)))
        try:
            assert receiver.stdout is not None
            if "listening" not in receiver.stdout.readline():
                receiver.kill()
                raise LabError(f"TCP receiver in {dst.name} did not start: {receiver.communicate(timeout=5)[1]}")
            sent = json.loads(self.run(src, probe_argv("tcp-send", str(dst.address), str(port), str(size)),
                                       timeout=timeout).stdout)
            out, _ = receiver.communicate(timeout=30)
            received = json.loads(out.strip().splitlines()[-1])
        finally:
            _kill(receiver)
        return TransferResult(sent["bytes"], received["bytes"], sent["sha256"], received["sha256"],
                              sent["seconds"])

    def iperf3(self, src: Container, dst: Container, *, seconds: float = 3.0, port: int = 5201,
               extra: Sequence[str] = ()) -> dict[str, Any]:
        """An iperf3 TCP test from src to dst; returns iperf3's JSON (`end.sum_received.bits_per_second`)."""
        # --forceflush: otherwise "Server listening" sits in stdio's buffer of a pipe.
        server = self.popen(dst, ["iperf3", "-s", "-1", "-B", str(dst.address), "-p", str(port), "--forceflush"])
        try:
            assert server.stdout is not None
            lines = [server.stdout.readline() for _ in range(2)]  # a line of dashes, then "Server listening"
            if "listening" not in lines[-1]:
                raise LabError(f"iperf3 server in {dst.name} did not start: {lines!r}")
            proc = self.run(src, ["iperf3", "-c", str(dst.address), "-p", str(port), "-t", str(seconds),
                                  "-J", *extra], timeout=seconds + 30, check=False)
            result: dict[str, Any] = json.loads(proc.stdout)
            if "error" in result:
                raise LabError(f"iperf3 {src.name} -> {dst.name}: {result['error']}")
            return result
        finally:
            _kill(server)


def throughput_bps(iperf3_result: dict[str, Any]) -> float:
    return float(iperf3_result["end"]["sum_received"]["bits_per_second"])


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
