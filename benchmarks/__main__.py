"""`python -m benchmarks [all|datapath|controlplane|packetcore] [--quick] [--out DIR] ...`"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from rich.console import Console

VERBS = ("all", "datapath", "controlplane", "packetcore", "report")
RESULTS = Path(__file__).resolve().parent / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="flannelpy benchmarks: data path (two hosts in network namespaces, iperf3 and ping), control "
        "plane (etcd leases to routes, start-up, concurrent acquisition) and the packet core (ns per packet).",
    )
    p.add_argument("verb", nargs="?", default="all", choices=VERBS,
                   help="what to run (default: all); report: render the tables and chart again from the JSON in --out")
    p.add_argument("--quick", action="store_true", help="one repetition, one second per measurement (smoke test)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 3; --quick: 1)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per iperf3 test and UDP flood (default 4; --quick: 1)")
    p.add_argument("--ping-count", type=int, default=None,
                   help="pings at 10 ms per RTT measurement (default 300; --quick: 100)")
    p.add_argument("--configs", default="", help="comma-separated data-path configurations or presets (default: "
                   "raw-veth,kernel-vxlan,flannelpy-host-gw,flannelpy-vxlan,flannelpy-udp-compiled,"
                   "flannelpy-udp-python,flannelpy-udp-batch1, plus flanneld-udp,flanneld-vxlan when FLANNELD_BIN "
                   "is set); also flannelpy-udp-2threads, flannelpy-udp-batch64, flannelpy-udp-tso, "
                   "flannelpy-udp-tso-gso; presets: default, "
                   "udp-steps = the udp backend from 1 packet/syscall to every offload, with the two references")
    p.add_argument("--measurements", default="", help="data path: comma-separated subset of "
                   "tcp1,tcp4,udp64,udp1400,ping,ping_loaded (default: all); the others show as not measured")
    p.add_argument("--peers", default="", help="control plane: peer counts for lease -> route (default 1,50)")
    p.add_argument("--start-sizes", default="", help="control plane: leases in etcd at daemon start "
                   "(default 0,1000,10000)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS}, git-ignored)")
    return p


def _needs_root(verb: str) -> str | None:
    if verb in ("all", "datapath", "controlplane"):
        if os.geteuid() != 0:
            return f"`{verb}` builds network namespaces and needs root; run it as root (packetcore does not)"
        missing = [tool for tool in ("ip", "iperf3", "ping", "etcd", "etcdctl", "ss") if shutil.which(tool) is None]
        if verb != "controlplane" and missing:
            return f"missing tools: {', '.join(missing)} (Debian: apt-get install iproute2 iperf3 iputils-ping etcd)"
        if verb == "controlplane" and shutil.which("etcd") is None:
            return "the etcd binary is not on PATH (Debian: apt-get install etcd-server)"
    return None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"{flag}={text!r}: expected comma-separated whole numbers, e.g. 1,50") from None
    if not values or min(values) < 0:
        raise SystemExit(f"{flag}={text!r}: expected comma-separated whole numbers >= 0")
    return values


def _quiet_logs() -> None:
    """The lab logs each namespace at info level; the harness shows progress instead."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def _rerender(out: Path, console: Console) -> int:
    import json

    from benchmarks import controlplane, datapath, packetcore

    found = 0
    for name in ("packetcore", "controlplane", "datapath"):
        path = out / f"{name}.json"
        if not path.exists():
            continue
        found += 1
        data = json.loads(path.read_text())
        if name == "datapath":
            datapath.write(data, out, console, json_too=False)
            continue
        table = packetcore.markdown(data) if name == "packetcore" else controlplane.markdown(data)
        (out / f"{name}.md").write_text(table)
        print(table, flush=True)
    if not found:
        console.print(f"[red]error:[/red] no datapath.json, controlplane.json or packetcore.json in {out}")
        return 2
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _quiet_logs()
    # Ctrl-C and SIGTERM both unwind through the testbed's clean-up and write partial results, even when
    # started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console(stderr=True)
    problem = _needs_root(args.verb)
    if problem:
        console.print(f"[red]error:[/red] {problem}")
        return 2
    out: Path = args.out
    only = tuple(name.strip() for name in args.configs.split(",") if name.strip())
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if reps < 1:
        console.print("[red]error:[/red] --reps must be at least 1")
        return 2
    if args.verb == "report":
        return _rerender(out, console)
    try:
        if args.verb in ("all", "packetcore"):
            from benchmarks import packetcore

            # Micro-benchmarks are cheap: 5 runs by default, the least disturbed one counts.
            pc_reps = args.reps if args.reps is not None else (1 if args.quick else 5)
            packetcore.run(packetcore.Params(quick=args.quick, reps=pc_reps), out, console)
        if args.verb in ("all", "controlplane"):
            from benchmarks import controlplane

            cp = controlplane.Params(quick=args.quick)
            cp.reps = reps
            if args.peers:
                cp.peers = _ints(args.peers, "--peers")
                if min(cp.peers) < 1:
                    raise SystemExit("--peers: every peer count must be at least 1")
            if args.start_sizes:
                cp.start_sizes = _ints(args.start_sizes, "--start-sizes")
            controlplane.run(cp, out, console)
        if args.verb in ("all", "datapath"):
            from benchmarks import datapath

            params = datapath.Params.quick_mode(only) if args.quick else datapath.Params(only=only)
            params.reps = reps
            if args.measurements:
                params.measurements = datapath.parse_measurements(args.measurements)
            if args.duration is not None:
                params.duration = args.duration
            if args.ping_count is not None:
                params.ping_count = args.ping_count
            datapath.run(params, out, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
