"""`flannelpy demo`: a flannel cluster on this machine, traffic across it, and nothing left behind.

Builds N hosts (network namespaces on one bridge), a 3-member etcd cluster on the hosts' addresses, a
flannelpy daemon and two containers per host; pings from a container on every host to a container on every
other host, measures one iperf3 figure, prints a summary and removes everything on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence

import structlog
from rich.console import Console
from rich.table import Table

from flannelpy.lab.cluster import SEED_NETWORK, SEED_PREFIX, Cluster, PingResult, throughput_bps
from flannelpy.lab.etcd import EtcdError
from flannelpy.lab.topology import LabError

TOOLS = ("ip", "etcd", "etcdctl", "iperf3")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flannelpy demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=3, help="number of hosts (2..50, default 3)")
    p.add_argument("--containers", type=int, default=2, help="containers per host (1..10, default 2)")
    p.add_argument("--backend", default="udp", help="backend type written to the network config (default udp)")
    p.add_argument("--iperf-seconds", type=float, default=3.0, help="iperf3 duration (default 3)")
    p.add_argument("--keep", action="store_true", help="wait for Enter before removing everything")
    p.add_argument("-v", "--verbose", action="store_true", help="show the lab's log lines")
    args = p.parse_args(list(argv))
    if not 2 <= args.hosts <= 50:
        p.error(f"--hosts={args.hosts}: give between 2 and 50 hosts")
    if not 1 <= args.containers <= 10:
        p.error(f"--containers={args.containers}: give between 1 and 10 containers per host")
    return args


def check_machine() -> str | None:
    if os.geteuid() != 0:
        return "the demo creates network namespaces and must run as root (sudo flannelpy demo)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: run ./scripts/setup.sh (installs etcd, iproute2, iperf3)"
    return None


def render(console: Console, cluster: Cluster, pings: dict[tuple[str, str], PingResult],
           iperf_bps: float | None) -> None:
    hosts = list(cluster.topology.hosts.values())
    leases = Table(title=f"Hosts (etcd prefix {cluster.etcd_prefix}, {cluster.backend} backend)")
    for column in ("host", "public IP", "lease", "docker0", "MTU", "containers"):
        leases.add_column(column)
    for h in hosts:
        leases.add_row(h.name, str(h.address), str(h.bridge_address.network) if h.bridge_address else "-",
                       str(h.bridge_address) if h.bridge_address else "-", str(h.mtu),
                       ", ".join(str(c.address) for c in h.containers))
    console.print(leases)

    matrix = Table(title="ping: container on row host -> container on column host (3 echoes, mean RTT)")
    matrix.add_column("from \\ to")
    for h in hosts:
        matrix.add_column(f"{h.name} {h.containers[-1].address}", justify="right")
    for a in hosts:
        cells = []
        for b in hosts:
            r = pings.get((a.name, b.name))
            if r is None:
                cells.append("")
            elif r.lost == 0:
                cells.append(f"[green]{r.received}/{r.sent}  {r.rtt_ms:.2f} ms[/]")
            else:
                cells.append(f"[red]{r.received}/{r.sent} received[/]")
        matrix.add_row(f"{a.name} {a.containers[0].address}", *cells)
    console.print(matrix)
    if iperf_bps is not None:
        src, dst = hosts[0].containers[0], hosts[1].containers[0]
        console.print(f"iperf3 TCP {src.name} ({src.address}) -> {dst.name} ({dst.address}): "
                      f"[bold]{iperf_bps / 1e6:.0f} Mbit/s[/]")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(log_path=False)
    problem = check_machine()
    if problem:
        console.print(f"[red]flannelpy demo: {problem}[/]")
        return 1
    if not args.verbose:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    cluster = Cluster(args.hosts, args.containers, backend=args.backend, etcd_prefix=SEED_PREFIX,
                      network=SEED_NETWORK, progress=lambda message: console.log(message))
    code = 0
    try:
        with console.status("starting the cluster..."):
            cluster.start()
        with console.status("ping across every pair of hosts..."):
            pings = cluster.ping_across_hosts()
        code = 1 if any(r.lost for r in pings.values()) else 0
        with console.status(f"iperf3 for {args.iperf_seconds:g} s..."):
            hosts = list(cluster.topology.hosts.values())
            result = cluster.iperf3(hosts[0].containers[0], hosts[1].containers[0], seconds=args.iperf_seconds)
        render(console, cluster, pings, throughput_bps(result))
        if args.keep:
            console.print(f"Namespaces: ip netns list | grep {cluster.topology.prefix}; logs in {cluster.workdir}")
            try:
                console.input("Press Enter to remove everything... ")
            except EOFError:
                pass  # stdin closed (not a terminal): same as Enter
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        code = 130
    except (LabError, EtcdError, OSError) as e:
        console.print(f"[red]flannelpy demo failed: {e}[/]")
        code = 1
    finally:
        with console.status("removing hosts, containers, daemons and etcd..."):
            cluster.stop()
        console.log(f"removed everything under {cluster.topology.prefix}-*")
    return code


if __name__ == "__main__":
    sys.exit(main())
