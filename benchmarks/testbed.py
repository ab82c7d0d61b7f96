"""The data-path testbed: one lab topology holding every configuration side by side, and one etcd.

Each configuration gets its own pair of hosts (and one container on each), so all of them are up at the
same time and a run can go round-robin over them:

    <prefix>-etcd                  etcd on 10.99.0.1 (the hosts' switch network)
    <prefix>-ra / <prefix>-rb      raw veth: two namespaces joined by one veth pair (the ceiling)
    <prefix>-kv1, -kv2 (+ -c1)     kernel vxlan configured by hand, the same layout flannel's vxlan makes
    <prefix>-<tag>1, -<tag>2 (+c1) a daemon per host (flannelpy or flanneld), its own etcd prefix and network

Every namespace carries the run's prefix; all of them are removed, and every process is stopped by PID,
on exit, on failure and on Ctrl-C (the lab topology also sweeps at interpreter exit and on SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path
from types import TracebackType

from flannelpy.lab.etcd import EtcdCluster, EtcdMemberSpec
from flannelpy.lab.topology import Host, LabError, Topology, kill_netns_processes, netns_exec, run

PROJECT_ROOT = Path(__file__).resolve().parent.parent
METRICS_PORT = 8473  # --healthz-port of every flannelpy daemon (one per host namespace, so no clash)


class SetupError(RuntimeError):
    """A configuration could not be brought up; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Config:
    """One way of carrying container traffic between two hosts."""

    name: str  # stable id used in JSON and on the command line
    label: str  # what the table and chart show
    kind: str  # "raw" | "kernel-vxlan" | "daemon"
    tag: str = ""  # host-name prefix (short: interface names are at most 15 bytes)
    program: str = "flannelpy"  # "flannelpy" | "flanneld"
    backend: str = ""
    env: tuple[tuple[str, str], ...] = ()
    skip_reason: str | None = None  # set when the configuration cannot run on this machine
    default: bool = True  # part of a plain run; the others only when named (--configs)

    @property
    def has_daemon(self) -> bool:
        return self.kind == "daemon"

    @property
    def has_counters(self) -> bool:
        """The daemon moves the packets itself and counts them on /metrics (host-gw and vxlan: the kernel does)."""
        return self.kind == "daemon" and self.program == "flannelpy" and self.backend == "udp"


# Named sets for --configs.
PRESETS: dict[str, tuple[str, ...]] = {
    "udp-steps": ("raw-veth", "kernel-vxlan", "flannelpy-udp-batch1", "flannelpy-udp-batch64", "flannelpy-udp-tso",
                  "flannelpy-udp-tso-gso", "flannelpy-udp-compiled"),
}


def preset_names(name: str) -> tuple[str, ...] | None:
    """The configurations a preset stands for ("default": a plain run's), or None."""
    if name == "default":
        return tuple(c.name for c in default_configs() if c.default)
    return PRESETS.get(name)


def flanneld_bin() -> str | None:
    """FLANNELD_BIN when it names an executable file, else None."""
    path = os.environ.get("FLANNELD_BIN", "").strip()
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def default_configs() -> list[Config]:
    configs = [
        Config("raw-veth", "raw veth", "raw"),
        Config("kernel-vxlan", "kernel vxlan (by hand)", "kernel-vxlan", tag="kv"),
        Config("flannelpy-host-gw", "flannelpy host-gw", "daemon", tag="hg", backend="host-gw"),
        Config("flannelpy-vxlan", "flannelpy vxlan", "daemon", tag="vx", backend="vxlan"),
        Config("flannelpy-udp-compiled", "flannelpy udp (compiled)", "daemon", tag="uc", backend="udp",
               env=(("FLANNELPY_DATAPATH", "compiled"),)),
        Config("flannelpy-udp-python", "flannelpy udp (pure Python)", "daemon", tag="up", backend="udp",
               env=(("FLANNELPY_DATAPATH", "python"),)),
        # Encapsulation and decapsulation in a thread each (the default where more than two CPUs are usable).
        Config("flannelpy-udp-2threads", "flannelpy udp (compiled, 2 threads)", "daemon", tag="u2", backend="udp",
               default=False, env=(("FLANNELPY_DATAPATH", "compiled"), ("FLANNELPY_UDP_THREADS", "2"))),
        # One packet per system call, as flanneld's C poll() loop moves them: the baseline of issue 6.
        Config("flannelpy-udp-batch1", "flannelpy udp (compiled, 1 packet/syscall)", "daemon", tag="u1",
               backend="udp", env=(("FLANNELPY_DATAPATH", "compiled"), ("FLANNELPY_BATCH", "1"),
                                   ("FLANNELPY_OFFLOAD", "0"))),
        # The steps between the two (issue 6): batching alone, then each kernel offload added.
        Config("flannelpy-udp-batch64", "flannelpy udp (batch 64, no offloads)", "daemon", tag="ub",
               backend="udp", default=False,
               env=(("FLANNELPY_DATAPATH", "compiled"), ("FLANNELPY_BATCH", "64"), ("FLANNELPY_OFFLOAD", "0"))),
        Config("flannelpy-udp-tso", "flannelpy udp (batch 64, TSO)", "daemon", tag="ut", backend="udp",
               default=False,
               env=(("FLANNELPY_DATAPATH", "compiled"), ("FLANNELPY_BATCH", "64"), ("FLANNELPY_OFFLOAD", "tso"))),
        Config("flannelpy-udp-tso-gso", "flannelpy udp (batch 64, TSO+GSO)", "daemon", tag="ug", backend="udp",
               default=False, env=(("FLANNELPY_DATAPATH", "compiled"), ("FLANNELPY_BATCH", "64"),
                                   ("FLANNELPY_OFFLOAD", "tso,gso"))),
        # The default's data-path threads always under SCHED_RR, and never (the default is auto: SCHED_RR
        # only while a bulk transfer makes other traffic wait).
        Config("flannelpy-udp-rt", "flannelpy udp (compiled, SCHED_RR)", "daemon", tag="ur", backend="udp",
               default=False, env=(("FLANNELPY_DATAPATH", "compiled"), ("FLANNELPY_UDP_RTPRIO", "1"))),
        Config("flannelpy-udp-nort", "flannelpy udp (compiled, never SCHED_RR)", "daemon", tag="un", backend="udp",
               default=False, env=(("FLANNELPY_DATAPATH", "compiled"), ("FLANNELPY_UDP_RTPRIO", "0"))),
    ]
    binary = flanneld_bin()
    why = None if binary else (
        "FLANNELD_BIN is not set" if not os.environ.get("FLANNELD_BIN") else
        f"FLANNELD_BIN={os.environ['FLANNELD_BIN']} is not an executable file")
    configs += [
        Config("flanneld-udp", "flanneld udp", "daemon", tag="fu", program="flanneld", backend="udp",
               skip_reason=why),
        Config("flanneld-vxlan", "flanneld vxlan", "daemon", tag="fv", program="flanneld", backend="vxlan",
               skip_reason=why),
    ]
    return configs


@dataclass
class Pair:
    """Where traffic goes for one configuration: client namespace -> server address in the server namespace."""

    config: Config
    client_ns: str
    server_ns: str
    server_ip: str
    daemon_pids: list[int] = field(default_factory=list)
    mtu: int = 1500
    detail: dict[str, str] = field(default_factory=dict)
    # Host namespaces whose daemon serves /metrics on METRICS_PORT (flannelpy only), client side first.
    metrics_netns: list[str] = field(default_factory=list)


@dataclass
class Daemon:
    host: str
    proc: subprocess.Popen[bytes]
    log: Path
    subnet_file: Path


class Testbed:
    """Build with `with Testbed(workdir) as bed:`, then `bed.setup(config)` for each configuration."""

    ETCD_PORT = 2379

    def __init__(self, logdir: Path, *, startup_timeout: float = 60.0) -> None:
        self.topology = Topology()
        self.prefix = self.topology.prefix
        self.workdir = Path(logdir) / self.prefix  # logs, subnet files and etcd data of this run only
        self.startup_timeout = startup_timeout
        self.etcd: EtcdCluster | None = None
        self.etcd_host: Host | None = None
        self.daemons: list[Daemon] = []
        self._raw_netns: list[str] = []
        self._network_index = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.etcd_host = self.topology.add_host("etcd")
        member = EtcdMemberSpec("bench", str(self.etcd_host.address), self.ETCD_PORT, self.ETCD_PORT + 1,
                                netns=self.etcd_host.netns)
        self.etcd = EtcdCluster(self.workdir / "etcd", [member])
        self.etcd.start()

    def close(self) -> None:
        """Daemons, etcd, then every namespace; each step runs even if an earlier one failed."""
        try:
            for daemon in self.daemons:
                stop_process(daemon.proc)
            self.daemons.clear()
        finally:
            try:
                if self.etcd is not None:
                    self.etcd.stop()
            finally:
                for netns in self._raw_netns:
                    kill_netns_processes(netns)
                    run(["ip", "netns", "del", netns], check=False)
                self._raw_netns.clear()
                self.topology.teardown()
                shutil.rmtree(self.workdir / "etcd", ignore_errors=True)  # the logs stay; the data is junk

    def namespaces(self) -> list[str]:
        return [*self._raw_netns, *self.topology.namespaces()]

    # -- etcd ------------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        assert self.etcd is not None, "start() first"
        return self.etcd.endpoints

    def etcdctl(self, *args: str) -> str:
        assert self.etcd_host is not None, "start() first"
        proc = subprocess.run(
            self.etcd_host.exec_argv(["etcdctl", f"--endpoints={','.join(self.endpoints)}", *args]),
            capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=15, check=False)
        if proc.returncode != 0:
            raise SetupError(f"etcdctl {' '.join(args[:2])} failed: {proc.stderr.strip()}")
        return proc.stdout

    # -- configurations --------------------------------------------------------------------------

    def setup(self, config: Config) -> Pair:
        """Bring one configuration up and check that the client reaches the server; SetupError if not."""
        if config.skip_reason:
            raise SetupError(config.skip_reason)
        try:
            if config.kind == "raw":
                pair = self._setup_raw(config)
            elif config.kind == "kernel-vxlan":
                pair = self._setup_kernel_vxlan(config)
            elif config.kind == "daemon":
                pair = self._setup_daemons(config)
            else:
                raise SetupError(f"unknown configuration kind {config.kind!r}")
        except LabError as e:
            raise SetupError(str(e)) from None
        self._wait_reachable(pair)
        return pair

    def _setup_raw(self, config: Config) -> Pair:
        a, b = f"{self.prefix}-ra", f"{self.prefix}-rb"
        for netns in (a, b):
            self._raw_netns.append(netns)  # recorded first: a half-made namespace is still removed
            run(["ip", "netns", "add", netns])
            run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b])
        for netns, address in ((a, "10.98.0.1/24"), (b, "10.98.0.2/24")):
            run(["ip", "-n", netns, "addr", "add", address, "dev", "eth0"])
            run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        return Pair(config, a, b, "10.98.0.2")

    def _setup_kernel_vxlan(self, config: Config) -> Pair:
        """What flannel's vxlan backend programs, done with ip(8): device, neighbour, fdb, onlink route."""
        mtu = 1450
        hosts = [self.topology.add_host(f"{config.tag}{i}") for i in (1, 2)]
        subnets = [IPv4Interface(f"10.9.{i}.1/24") for i in (1, 2)]
        macs = [f"02:42:0a:09:00:0{i}" for i in (1, 2)]
        for host, subnet, mac in zip(hosts, subnets, macs, strict=True):
            ns = host.netns
            run(["ip", "-n", ns, "link", "add", "kvx", "address", mac, "type", "vxlan", "id", "42",
                 "local", str(host.address), "dev", host.iface, "dstport", "8472", "nolearning"])
            run(["ip", "-n", ns, "link", "set", "kvx", "mtu", str(mtu), "up"])
            run(["ip", "-n", ns, "addr", "add", f"{subnet.network.network_address}/32", "dev", "kvx"])
        for i, host in enumerate(hosts):
            peer, subnet, mac = hosts[1 - i], subnets[1 - i], macs[1 - i]
            vtep = str(subnet.network.network_address)
            ns = host.netns
            run(["ip", "-n", ns, "neigh", "replace", vtep, "lladdr", mac, "dev", "kvx", "nud", "permanent"])
            run(["bridge", "-n", ns, "fdb", "append", mac, "dev", "kvx", "dst", str(peer.address),
                 "self", "permanent"])
            run(["ip", "-n", ns, "route", "add", str(subnet.network), "via", vtep, "dev", "kvx", "onlink"])
        containers = [self.topology.add_containers(h.name, s, mtu, 1)[0]
                      for h, s in zip(hosts, subnets, strict=True)]
        return Pair(config, containers[0].netns, containers[1].netns, str(containers[1].address), mtu=mtu)

    def _network_config(self, config: Config) -> dict[str, object]:
        self._network_index += 1
        return {"Network": f"10.{100 + self._network_index}.0.0/16", "SubnetLen": 24,
                "Backend": {"Type": config.backend}}

    def daemon_argv(self, config: Config, host: Host, prefix: str, subnet_file: Path) -> list[str]:
        flags = [f"--etcd-endpoints={','.join(self.endpoints)}", f"--etcd-prefix={prefix}",
                 f"--iface={host.iface}", f"--subnet-file={subnet_file}"]
        if config.program == "flanneld":
            binary = flanneld_bin()
            if binary is None:
                raise SetupError("FLANNELD_BIN does not name an executable flanneld")
            return host.exec_argv([binary, *flags])
        # /metrics gives the data path's own packet counters (the harness reads them around the UDP floods).
        flags.append(f"--healthz-port={METRICS_PORT}")
        return host.exec_argv([sys.executable, "-m", "flannelpy", *flags])

    def _setup_daemons(self, config: Config) -> Pair:
        prefix = f"/bench/{config.name}/network"
        network = self._network_config(config)
        self.etcdctl("put", f"{prefix}/config", json.dumps(network))
        hosts = [self.topology.add_host(f"{config.tag}{i}") for i in (1, 2)]
        started = [self._start_daemon(config, host, prefix) for host in hosts]
        envs = [self._wait_subnet_file(config, d) for d in started]
        containers = []
        for host, env in zip(hosts, envs, strict=True):
            subnet, mtu = IPv4Interface(env["FLANNEL_SUBNET"]), int(env["FLANNEL_MTU"])
            containers.append(self.topology.add_containers(host.name, subnet, mtu, 1)[0])
        return Pair(config, containers[0].netns, containers[1].netns, str(containers[1].address),
                    daemon_pids=[d.proc.pid for d in started], mtu=int(envs[1]["FLANNEL_MTU"]),
                    metrics_netns=[h.netns for h in hosts] if config.has_counters else [],
                    detail={"network": str(network["Network"]),
                            "subnets": " ".join(e["FLANNEL_SUBNET"] for e in envs)})

    def _start_daemon(self, config: Config, host: Host, prefix: str) -> Daemon:
        base = self.workdir / f"{config.name}-{host.name}"
        subnet_file, logfile = base.with_suffix(".env"), base.with_suffix(".log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}  # the flags say it all
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        env.update(dict(config.env))
        argv = self.daemon_argv(config, host, prefix, subnet_file)
        with open(logfile, "ab") as logf:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        daemon = Daemon(host.name, proc, logfile, subnet_file)
        self.daemons.append(daemon)
        return daemon

    def _wait_subnet_file(self, config: Config, daemon: Daemon) -> dict[str, str]:
        deadline = time.monotonic() + self.startup_timeout
        while not daemon.subnet_file.exists():
            code = daemon.proc.poll()
            if code is not None:
                raise SetupError(f"{config.program} on {daemon.host} exited with code {code} before writing "
                                 f"its subnet file: {last_error(daemon.log)}")
            if time.monotonic() > deadline:
                raise SetupError(f"{config.program} on {daemon.host} wrote no subnet file within "
                                 f"{self.startup_timeout:.0f}s: {last_error(daemon.log)}")
            time.sleep(0.05)
        values = {}
        for line in daemon.subnet_file.read_text().splitlines():
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
        if "FLANNEL_SUBNET" not in values or "FLANNEL_MTU" not in values:
            raise SetupError(f"subnet file {daemon.subnet_file} lacks FLANNEL_SUBNET or FLANNEL_MTU: {values}")
        return values

    def _wait_reachable(self, pair: Pair, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = run(netns_exec(pair.client_ns, ["ping", "-c", "1", "-W", "1", "-n", pair.server_ip]),
                       check=False)
            if proc.returncode == 0:
                return
            for d in self.daemons:
                if d.proc.pid in pair.daemon_pids and d.proc.poll() is not None:
                    raise SetupError(f"{pair.config.program} on {d.host} exited with code {d.proc.returncode}: "
                                     f"{last_error(d.log)}")
            if time.monotonic() > deadline:
                raise SetupError(f"no connectivity from {pair.client_ns} to {pair.server_ip} after {timeout:.0f}s "
                                 f"(ping: {proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip()})")

    def daemon_alive(self, pair: Pair) -> str | None:
        """None when every daemon of the pair runs, else why not."""
        for d in self.daemons:
            if d.proc.pid in pair.daemon_pids and d.proc.poll() is not None:
                return f"{pair.config.program} on {d.host} exited with code {d.proc.returncode}: {last_error(d.log)}"
        return None


def last_error(path: Path, lines: int = 40) -> str:
    """The most telling line of a daemon log: the last error/exception line, else the last line."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    if not text:
        return "(empty log)"
    for line in reversed(text):
        low = line.lower()
        if "error" in low or "exception" in low or "traceback" in low:
            return line.strip()[:400]
    return text[-1].strip()[:400]


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, by PID."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(grace)
