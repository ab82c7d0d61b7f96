"""Control-plane benchmark against a real etcd.

    lease -> route     a new lease is written to etcd; time until each of 1 (and 50) running nodes has
                       applied it (route table updated, backend told): Node objects with the alloc backend,
                       one etcd connection each, in one process, as flannelpy.Node embeds them
    daemon start       `python -m flannelpy` on a fresh host with 0, 1,000 and 10,000 leases in etcd: time
                       from exec to the subnet file (written once every existing lease is applied), for the
                       alloc backend (control plane only) and host-gw (one kernel route per lease)
    100 at once        100 SubnetManagers, each with its own etcd connection, acquire at the same moment
                       in a /16 of /24s (254 subnets, so they collide): total time, lost races, duplicates

etcd runs in a lab namespace (<prefix>-etcd, 10.99.0.1); the in-process parts run in a worker process inside
that namespace (`python -m benchmarks.controlplane worker ...`), daemons in fresh host namespaces, so
nothing touches the machine's own network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import report
from benchmarks.testbed import PROJECT_ROOT, SetupError, Testbed, last_error, stop_process

START_NETWORK = "10.0.0.0/8"  # room for 10,000 /24 leases
# The preloaded leases' PublicIPs: 10.99.1.1 upwards, outside the hosts' 10.99.0.0/24, on-link once a daemon's host
# has its address as a /16 (daemon_start), so host-gw routes via every one of them.
PEERS_FIRST = IPv4Address("10.99.1.1")


@dataclass
class Params:
    quick: bool = False
    reps: int = 3
    peers: tuple[int, ...] = (1, 50)
    lease_samples: int = 20  # new leases timed per peer count
    start_sizes: tuple[int, ...] = (0, 1000, 10000)
    start_backends: tuple[str, ...] = ("alloc", "host-gw")
    acquirers: int = 100
    start_timeout: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quick:
            self.reps, self.lease_samples = 1, 5


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[max(0, int(len(ordered) * 0.99 + 0.5) - 1)],
            "max": ordered[-1], "n": len(ordered)}


# ---------------------------------------------------------------------------------------------------
# worker: runs inside the etcd namespace


def _interface(ip: IPv4Address) -> Any:
    from flannelpy.backend.base import ExternalInterface

    return ExternalInterface(name="bench0", index=0, ip=ip, public_ip=ip, mtu=1500)


async def _put_config(endpoint: str, prefix: str, config: dict[str, Any]) -> None:
    from flannelpy.subnet.registry import EtcdRegistry

    registry = EtcdRegistry([endpoint])
    try:
        await registry.put(f"{prefix}/config", json.dumps(config).encode())
    finally:
        await registry.close()


async def lease_to_route(endpoint: str, peers: int, samples: int, progress: Any) -> dict[str, Any]:
    """Start `peers` nodes, then add `samples` leases one by one and time their arrival at every node."""
    from flannelpy.node import Node, NodeOptions
    from flannelpy.subnet.lease import LeaseAttrs
    from flannelpy.subnet.registry import EtcdRegistry

    prefix = f"/bench/cp/route-{peers}"
    await _put_config(endpoint, prefix, {"Network": "10.50.0.0/16", "SubnetLen": 24, "Backend": {"Type": "alloc"}})
    options = NodeOptions(prefix=prefix, subnet_file=None, ip_masq=False, iptables_forward_rules=False)
    nodes = [Node(EtcdRegistry([endpoint]), _interface(IPv4Address(f"10.200.{i // 250}.{i % 250 + 1}")), options)
             for i in range(peers)]
    writer = EtcdRegistry([endpoint])
    arrivals: dict[str, list[float]] = {}
    waiters: dict[str, asyncio.Future[None]] = {}

    async def listen(node: Any) -> None:
        async for event in node.events():
            for lease in event.added:
                key = str(lease.subnet)
                arrivals.setdefault(key, []).append(event.at)
                fut = waiters.get(key)
                if fut is not None and not fut.done() and len(arrivals[key]) >= peers:
                    fut.set_result(None)

    listeners: list[asyncio.Task[None]] = []
    try:
        t = time.monotonic()
        await asyncio.gather(*(n.start() for n in nodes))
        start_seconds = time.monotonic() - t
        listeners = [asyncio.ensure_future(listen(n)) for n in nodes]
        await asyncio.sleep(0.2)
        per_lease_p50, per_lease_max, errors = [], [], []
        for k in range(samples):
            progress(f"lease -> route, {peers} peer(s): lease {k + 1}/{samples}")
            subnet = IPv4Network(f"10.50.{200 + k}.0/24")
            key = str(subnet)
            waiters[key] = asyncio.get_running_loop().create_future()
            value = LeaseAttrs(public_ip=IPv4Address(f"10.201.0.{k + 1}"), backend_type="alloc").to_json()
            t0 = time.time()
            claim = await writer.create_with_lease(f"{prefix}/subnets/{subnet.network_address}-24", value, 600)
            if claim is None:
                errors.append(f"could not write lease {subnet}")
                continue
            try:
                await asyncio.wait_for(waiters[key], 30)
            except TimeoutError:
                errors.append(f"lease {subnet} reached {len(arrivals.get(key, []))} of {peers} nodes in 30 s")
                continue
            delays = [(at - t0) * 1000 for at in arrivals[key]]
            per_lease_p50.append(statistics.median(delays))
            per_lease_max.append(max(delays))
            await asyncio.sleep(0.05)
        return {"peers": peers, "samples": samples, "nodes_start_seconds": start_seconds,
                "p50_ms": _summary(per_lease_p50), "last_peer_ms": _summary(per_lease_max), "errors": errors}
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
        await asyncio.gather(*(n.registry.close() for n in nodes), writer.close(), return_exceptions=True)


async def acquire_at_once(endpoint: str, count: int, rep: int) -> dict[str, Any]:
    """`count` SubnetManagers, one etcd connection each, acquire at once; duplicates must be 0."""
    from flannelpy.config import parse_config
    from flannelpy.subnet.lease import LeaseAttrs
    from flannelpy.subnet.manager import SubnetManager
    from flannelpy.subnet.registry import Claim, EtcdRegistry

    class CountingRegistry(EtcdRegistry):
        lost = 0

        async def create_with_lease(self, key: str, value: bytes, ttl: float) -> Claim | None:
            claim = await super().create_with_lease(key, value, ttl)
            if claim is None:
                CountingRegistry.lost += 1
            return claim

    prefix = f"/bench/cp/acquire-{rep}-{os.getpid()}"
    text = json.dumps({"Network": "10.60.0.0/16", "SubnetLen": 24, "Backend": {"Type": "alloc"}})
    await _put_config(endpoint, prefix, json.loads(text))
    config = parse_config(text)
    registries = [CountingRegistry([endpoint]) for _ in range(count)]
    managers = [SubnetManager(r, prefix) for r in registries]
    # Connect first, so the timed part is the acquisition and not channel set-up.
    await asyncio.gather(*(r.list_prefix(f"{prefix}/nothing/") for r in registries))
    times: list[float] = []
    failures: list[str] = []

    async def one(i: int, manager: SubnetManager) -> Any:
        attrs = LeaseAttrs(public_ip=IPv4Address(f"10.210.{i // 250}.{i % 250 + 1}"), backend_type="alloc")
        t = time.monotonic()
        try:
            lease = await manager.acquire_lease(config, attrs)
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
            return None
        times.append((time.monotonic() - t) * 1000)
        return lease

    CountingRegistry.lost = 0
    try:
        t0 = time.monotonic()
        leases = await asyncio.gather(*(one(i, m) for i, m in enumerate(managers)))
        total = time.monotonic() - t0
        got = [le for le in leases if le is not None]
        subnets = [str(le.subnet) for le in got]
        duplicates = len(subnets) - len(set(subnets))
        kvs, _ = await registries[0].list_prefix(f"{prefix}/subnets/")
        holders = {json.loads(kv.value)["PublicIP"] for kv in kvs}
        return {"acquirers": count, "total_seconds": total, "acquired": len(got), "duplicates": duplicates,
                "keys_in_etcd": len(kvs), "distinct_holders_in_etcd": len(holders),
                "lost_races": CountingRegistry.lost, "per_acquire_ms": _summary(times), "failures": failures[:5]}
    finally:
        await asyncio.gather(*(r.close() for r in registries), return_exceptions=True)


async def preload(endpoint: str, size: int, progress: Any) -> dict[str, Any]:
    """`size` leases under /bench/cp/start-<size>, each on its own etcd lease as flanneld makes them."""
    from flannelpy.subnet.lease import LeaseAttrs
    from flannelpy.subnet.registry import EtcdRegistry

    prefix = f"/bench/cp/start-{size}"
    network = IPv4Network(START_NETWORK)
    await _put_config(endpoint, prefix, {"Network": START_NETWORK, "SubnetLen": 24, "Backend": {"Type": "alloc"}})
    registry = EtcdRegistry([endpoint])
    # Not one shared etcd lease: etcd 3.4 slows down with every key attached to the same lease.
    gate = asyncio.Semaphore(64)
    lost: list[str] = []
    try:
        t = time.monotonic()

        async def put(i: int) -> None:
            # Subnets from 10.1.0.0 upwards; one PublicIP per lease (a host routes only the oldest lease of a
            # PublicIP), from PEERS_FIRST upwards.
            subnet = IPv4Network((int(network.network_address) + (256 + i) * 256, 24))
            value = LeaseAttrs(public_ip=PEERS_FIRST + i, backend_type="host-gw").to_json()
            async with gate:
                claim = await registry.create_with_lease(f"{prefix}/subnets/{subnet.network_address}-24", value, 7200)
            if claim is None:
                lost.append(str(subnet))

        for start in range(0, size, 1000):
            await asyncio.gather(*(put(i) for i in range(start, min(size, start + 1000))))
            progress(f"daemon start: writing leases, {min(size, start + 1000)}/{size}")
        if lost:
            raise RuntimeError(f"{len(lost)} lease keys existed already, e.g. {lost[0]}")
        return {"prefix": prefix, "leases": size, "seconds": time.monotonic() - t}
    finally:
        await registry.close()


async def worker(endpoint: str, params: Params) -> dict[str, Any]:
    def progress(message: str) -> None:
        print(json.dumps({"progress": message}), flush=True)

    out: dict[str, Any] = {"lease_to_route": [], "acquire": [], "preload": [], "errors": []}
    for peers in params.peers:
        progress(f"lease -> route, {peers} peer(s): starting nodes")
        try:
            out["lease_to_route"].append(await lease_to_route(endpoint, peers, params.lease_samples, progress))
        except Exception as e:
            out["lease_to_route"].append({"peers": peers, "error": f"{type(e).__name__}: {e}"})
    for rep in range(params.reps):
        progress(f"{params.acquirers} SubnetManagers acquiring at once, run {rep + 1}/{params.reps}")
        try:
            out["acquire"].append(await acquire_at_once(endpoint, params.acquirers, rep))
        except Exception as e:
            out["acquire"].append({"error": f"{type(e).__name__}: {e}"})
    for size in params.start_sizes:
        try:
            out["preload"].append(await preload(endpoint, size, progress))
        except Exception as e:
            out["preload"].append({"leases": size, "error": f"{type(e).__name__}: {e}"})
    return out


def worker_main(argv: list[str]) -> int:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    p = argparse.ArgumentParser(prog="python -m benchmarks.controlplane worker")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--params", required=True, help="Params as JSON")
    args = p.parse_args(argv)
    raw = json.loads(args.params)
    raw.pop("quick", None)  # already applied by the parent
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    params = Params(**fields)
    result = asyncio.run(worker(args.endpoint, params))
    print(json.dumps({"result": result}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# parent: etcd, worker, daemons


def _run_worker(bed: Testbed, params: Params, console: Console, logdir: Path) -> dict[str, Any]:
    assert bed.etcd_host is not None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    argv = bed.etcd_host.exec_argv([sys.executable, "-m", "benchmarks.controlplane", "worker",
                                    "--endpoint", bed.endpoints[0], "--params", json.dumps(asdict(params))])
    result: dict[str, Any] | None = None
    with open(logdir / "controlplane-worker.log", "wb") as errf, console.status("control plane") as status:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL, env=env,
                                text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "progress" in msg:
                    status.update(f"control plane: {msg['progress']}")
                elif "result" in msg:
                    result = msg["result"]
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    if result is None:
        raise SetupError(f"control-plane worker exited with code {proc.returncode}: "
                         f"{last_error(logdir / 'controlplane-worker.log')}")
    return result


def _vm_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def daemon_start(bed: Testbed, prefix: str, backend: str, run_index: int, timeout: float) -> dict[str, Any]:
    """Exec a daemon on a fresh host; seconds until its subnet file exists (all leases applied)."""
    config = {"Network": START_NETWORK, "SubnetLen": 24, "Backend": {"Type": backend}}
    bed.etcdctl("put", f"{prefix}/config", json.dumps(config))
    host = bed.topology.add_host(f"s{run_index}")
    # The host's address as a /16: the preloaded PublicIPs are then on a directly connected network, as
    # host-gw requires of its peers.
    for verb, plen in (("del", 24), ("add", 16)):
        subprocess.run(["ip", "-n", host.netns, "addr", verb, f"{host.address}/{plen}", "dev", host.iface],
                       check=True, capture_output=True)
    subnet_file = bed.workdir / f"start-{run_index}.env"
    logfile = bed.workdir / f"start-{run_index}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    argv = host.exec_argv([sys.executable, "-m", "flannelpy", f"--etcd-endpoints={bed.endpoints[0]}",
                           f"--etcd-prefix={prefix}", f"--iface={host.iface}", f"--subnet-file={subnet_file}"])
    try:
        with open(logfile, "ab") as logf:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        try:
            while not subnet_file.exists():
                if proc.poll() is not None:
                    return {"error": f"daemon exited with code {proc.returncode}: {last_error(logfile)}"}
                if time.monotonic() - t0 > timeout:
                    return {"error": f"no subnet file after {timeout:.0f}s: {last_error(logfile)}"}
                time.sleep(0.01)
            seconds = time.monotonic() - t0
            rss = _vm_rss_mb(proc.pid)
            routes = subprocess.run(["ip", "-n", host.netns, "-4", "route", "show"], capture_output=True, text=True,
                                    check=False).stdout.count("\n")
            return {"seconds": seconds, "rss_mb": rss, "kernel_routes": routes}
        finally:
            stop_process(proc)
    finally:
        bed.topology.remove_host(host.name)


def run(params: Params, out_dir: Path, console: Console) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": "controlplane", "started": datetime.now(UTC).isoformat(timespec="seconds"),
                            "machine": report.machine(), "params": asdict(params), "start": [], "errors": []}
    logdir = out_dir / "logs"
    t0 = time.monotonic()
    try:
        with Testbed(logdir) as bed:
            data["testbed_prefix"] = bed.prefix
            data.update(_run_worker(bed, params, console, bed.workdir))
            runs = []
            ready = {p["leases"]: p["prefix"] for p in data["preload"] if "error" not in p}
            for p in data["preload"]:
                if "error" in p:
                    data["errors"].append(f"preloading {p['leases']} leases failed: {p['error']}")
            index = 0
            with console.status("control plane: daemon start") as status:
                for rep in range(params.reps):
                    for size in params.start_sizes:
                        for backend in params.start_backends:
                            if size not in ready:
                                continue
                            index += 1
                            status.update(f"control plane: daemon start, {backend}, {size} leases, run {rep + 1}")
                            try:
                                result = daemon_start(bed, ready[size], backend, index, params.start_timeout)
                            except SetupError as e:
                                result = {"error": str(e)}
                            runs.append({"leases": size, "backend": backend, "rep": rep + 1, **result})
            data["start"] = runs
    except KeyboardInterrupt:
        data["interrupted"] = True
        console.print("[yellow]interrupted: the testbed is removed; partial results are written[/yellow]")
    except SetupError as e:
        data["errors"].append(str(e))
        console.print(f"[red]control plane: {e}[/red]")
    data["seconds"] = round(time.monotonic() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "controlplane.json", data)
    table = markdown(data)
    (out_dir / "controlplane.md").write_text(table)
    print(table, flush=True)
    console.print(f"wrote {out_dir / 'controlplane.json'}, {out_dir / 'controlplane.md'}")
    if data.get("interrupted"):
        raise KeyboardInterrupt
    return data


def _fmt(value: float | None, fmt: str = "{:.1f}") -> str:
    return "failed" if value is None else fmt.format(value)


def markdown(data: dict[str, Any]) -> str:
    p = data["params"]
    text = (f"Control plane, {data['started']}; etcd 3.4, one member, in a network namespace.\n\n"
            f"Machine: {report.machine_line(data['machine'])}.\n\n")
    rows = []
    for r in data.get("lease_to_route", []):
        if "error" in r:
            rows.append([r["peers"], "failed", "failed", "failed", r["error"]])
            continue
        rows.append([r["peers"], _fmt(r["p50_ms"]["p50"], "{:.1f}"), _fmt(r["last_peer_ms"]["p50"], "{:.1f}"),
                     _fmt(r["last_peer_ms"]["max"], "{:.1f}"),
                     f"{r['p50_ms']['n']} leases" + (f"; {len(r['errors'])} failed: {r['errors'][0]}" if r["errors"]
                                                     else "")])
    text += ("New lease in etcd -> applied by every node (route table and backend), in-process Nodes with the alloc "
             "backend, one etcd connection each (ms):\n\n")
    text += report.simple_table(["peers", "median node", "last node (median)", "last node (worst)", "samples"], rows)
    rows = []
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in data.get("start", []):
        by_key.setdefault((r["leases"], r["backend"]), []).append(r)
    for (size, backend), runs in sorted(by_key.items()):
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append([f"{size:,}", backend, "failed", "—", "—", runs[-1]["error"]])
            continue
        secs = statistics.median(r["seconds"] for r in ok)
        rss = [r["rss_mb"] for r in ok if r.get("rss_mb")]
        routes = statistics.median(r["kernel_routes"] for r in ok)
        rows.append([f"{size:,}", backend, f"{secs:.2f}", f"{statistics.median(rss):.0f}" if rss else "—",
                     f"{routes:.0f}", f"{len(ok)} of {len(runs)} runs ok"])
    text += (f"\nDaemon start (`python -m flannelpy`, exec to subnet file written, every existing lease applied), "
             f"median of {p['reps']} run(s):\n\n")
    text += report.simple_table(["leases in etcd", "backend", "seconds", "RSS (MB)", "kernel routes", "runs"], rows)
    rows = []
    for r in data.get("acquire", []):
        if "error" in r:
            rows.append(["failed", "—", "—", "—", "—", r["error"]])
            continue
        rows.append([f"{r['total_seconds']:.2f}", f"{r['acquired']}/{r['acquirers']}", r["duplicates"],
                     r["lost_races"], _fmt(r["per_acquire_ms"]["p50"], "{:.0f}") + " / "
                     + _fmt(r["per_acquire_ms"]["max"], "{:.0f}"),
                     f"{r['keys_in_etcd']} keys, {r['distinct_holders_in_etcd']} holders"
                     + (f"; failures: {r['failures']}" if r["failures"] else "")])
    text += (f"\n{p['acquirers']} SubnetManagers acquiring at once (own etcd connection each; 254 free /24s, "
             "random pick among the first 100 free, as flanneld), one row per run:\n\n")
    text += report.simple_table(["total (s)", "acquired", "duplicates", "lost races (retried)",
                                 "per acquire p50 / max (ms)", "etcd afterwards"], rows)
    for error in data.get("errors", []):
        text += f"\nerror: {error}\n"
    return text


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: python -m benchmarks controlplane (the worker verb is internal)")
