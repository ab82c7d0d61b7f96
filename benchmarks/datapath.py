"""Data-path benchmark: every configuration on one testbed, measured round-robin, medians and ratios.

Each repetition visits every configuration in turn and runs the same six measurements on it (TCP 1 and
4 streams, UDP 64 B and 1400 B from a batched generator, ping on an idle path and under one TCP stream), so
drift of the machine over the run hits every configuration alike.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import report, traffic
from benchmarks.testbed import PRESETS, Config, Pair, SetupError, Testbed, default_configs, preset_names

MEASUREMENTS = ("tcp1", "tcp4", "udp64", "udp1400", "ping", "ping_loaded")
REFERENCES = {"ratio_to_raw_veth": "raw-veth", "ratio_to_kernel_vxlan": "kernel-vxlan"}


@dataclass
class Params:
    reps: int = 3
    duration: float = 4.0  # seconds per iperf3 test
    ping_count: int = 300
    ping_interval: float = 0.01
    quick: bool = False
    only: tuple[str, ...] = ()  # configuration names; empty: all
    measurements: tuple[str, ...] = MEASUREMENTS  # a subset skips the others (shown as not measured)
    udp_generator: str = "flood"  # UDP rates: benchmarks/udpflood.pyx, 64 datagrams per system call

    @classmethod
    def quick_mode(cls, only: tuple[str, ...] = ()) -> Params:
        """One repetition, one second per measurement."""
        return cls(reps=1, duration=1.0, ping_count=100, quick=True, only=only)


def parse_measurements(text: str) -> tuple[str, ...]:
    """--measurements: a comma-separated subset of MEASUREMENTS, kept in the harness's order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(MEASUREMENTS))
    if unknown or not names:
        raise SystemExit(f"--measurements={text!r}: choose one or more of {','.join(MEASUREMENTS)}")
    return tuple(m for m in MEASUREMENTS if m in names)


def select_configs(only: tuple[str, ...]) -> list[Config]:
    """The default set, or the named configurations and presets in the order given."""
    configs = default_configs()
    if not only:
        return [c for c in configs if c.default]
    names = list(dict.fromkeys(n for name in only for n in (preset_names(name) or (name,))))
    by_name = {c.name: c for c in configs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; choose from: {', '.join(by_name)} "
                         f"or a preset: default, {', '.join(PRESETS)}")
    return [by_name[n] for n in names]


def measure(pair: Pair, what: str, params: Params) -> dict[str, float]:
    if what == "tcp1":
        return traffic.tcp(pair, 1, params.duration)
    if what == "tcp4":
        return traffic.tcp(pair, 4, params.duration)
    if what == "udp64":
        return traffic.udp(pair, 64, params.duration)
    if what == "udp1400":
        return traffic.udp(pair, 1400, params.duration)
    if what == "ping":
        return traffic.ping(pair, params.ping_count, params.ping_interval)
    if what == "ping_loaded":
        return traffic.loaded_ping(pair, params.ping_count, params.ping_interval, ramp=0.5 if params.quick else 1.0)
    raise ValueError(what)


def _samples(runs: list[dict[str, Any]], what: str, field: str) -> tuple[list[float], list[str]]:
    values, errors = [], []
    for run in runs:
        result = run.get(what)
        if result is None:
            continue
        if "error" in result:
            errors.append(result["error"])
        elif field not in result:
            errors.append(f"the {what} measurement gave no {field}")
        else:
            values.append(float(result[field]))
    return values, errors


def _cpu_per_packet(runs: list[dict[str, Any]]) -> tuple[list[float], list[str]]:
    """Daemon CPU microseconds per 64 B datagram delivered by the flood."""
    values, errors = [], []
    for run in runs:
        result = run.get("udp64")
        if result is None:
            continue
        if "error" in result:
            errors.append(result["error"])
        elif "received" in result:  # the flood; iperf3's UDP results of older runs lack it
            values.append(1e6 * result["cpu_s"] / result["received"])
    return values, errors


def _cpu_per_gb(runs: list[dict[str, Any]]) -> tuple[list[float], list[str]]:
    values, errors = [], []
    for run in runs:
        tcps = [run.get("tcp1"), run.get("tcp4")]
        if any(t is None or "error" in t for t in tcps):
            errors.append("TCP test failed in this repetition")
            continue
        gigabytes = sum(t["bytes"] for t in tcps if t) / 1e9
        values.append(sum(t["cpu_s"] for t in tcps if t) / gigabytes)
    return values, errors


SOURCES = {
    "tcp1_gbps": ("tcp1", "gbps"), "tcp4_gbps": ("tcp4", "gbps"),
    "udp64_kpps": ("udp64", "kpps"), "udp64_loss_pct": ("udp64", "loss_pct"),
    "udp1400_kpps": ("udp1400", "kpps"), "udp1400_loss_pct": ("udp1400", "loss_pct"),
    "rtt_p50_ms": ("ping", "p50_ms"), "rtt_p99_ms": ("ping", "p99_ms"),
    "rtt_loaded_p50_ms": ("ping_loaded", "p50_ms"), "rtt_loaded_p99_ms": ("ping_loaded", "p99_ms"),
}
# From the daemons' own counters (/metrics): flannelpy only.
COUNTER_SOURCES = {"udp64_fwd_kpps": ("udp64", "fwd_kpps"), "udp1400_fwd_kpps": ("udp1400", "fwd_kpps")}


def aggregate(config: Config, runs: list[dict[str, Any]],
              measured: tuple[str, ...] = MEASUREMENTS) -> dict[str, dict[str, Any]]:
    """metric key -> {median, samples, errors, na}; a metric without a value is None, never 0.

    `na` says why a metric has no value although nothing failed (no daemon, not asked for).
    """
    def entry(values: list[float], errors: list[str], na: str | None = None) -> dict[str, Any]:
        return {"median": report.median(values), "samples": values, "errors": errors, "na": na}

    skipped = "not measured (--measurements)"
    metrics: dict[str, dict[str, Any]] = {}
    for key, (what, field) in SOURCES.items():
        metrics[key] = entry(*_samples(runs, what, field)) if what in measured else entry([], [], skipped)
    for key, (what, field) in COUNTER_SOURCES.items():
        if what not in measured:
            metrics[key] = entry([], [], skipped)
        elif not config.has_counters:
            metrics[key] = entry([], [], "no daemon" if not config.has_daemon else "no data-path counters")
        else:
            values, errors = _samples(runs, what, field)
            metrics[key] = entry(values, errors)
    if not config.has_daemon:
        metrics["cpu_s_per_gb"] = entry([], [], "no daemon")
        metrics["udp64_cpu_us_per_packet"] = entry([], [], "no daemon")
    else:
        metrics["cpu_s_per_gb"] = (entry(*_cpu_per_gb(runs)) if {"tcp1", "tcp4"} <= set(measured)
                                   else entry([], [], skipped))
        metrics["udp64_cpu_us_per_packet"] = (entry(*_cpu_per_packet(runs)) if "udp64" in measured
                                              else entry([], [], skipped))
    return metrics


def add_ratios(configs: list[dict[str, Any]]) -> None:
    by_name = {c["name"]: c for c in configs}
    for key, ref_name in REFERENCES.items():
        ref = by_name.get(ref_name)
        for c in configs:
            c[key] = {}
            if ref is None:
                continue
            for m in report.DATAPATH_METRICS:
                if not m.ratio:
                    continue
                value, base = c["metrics"][m.key]["median"], ref["metrics"][m.key]["median"]
                c[key][m.key] = value / base if value is not None and base else None


def run(params: Params, out_dir: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    configs = select_configs(params.only)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    results: dict[str, dict[str, Any]] = {
        c.name: {"name": c.name, "label": c.label, "status": "pending", "reason": None,
                 "setup_seconds": None, "detail": {}, "runs": []}
        for c in configs
    }
    data: dict[str, Any] = {"kind": "datapath", "started": started, "machine": report.machine(),
                            "params": asdict(params), "configs": [], "interrupted": False}
    runnable = [c for c in configs if not c.skip_reason]
    for c in configs:
        if c.skip_reason:
            results[c.name].update(status="skipped", reason=c.skip_reason)
    t0 = time.monotonic()
    flood_problem = None
    if {"udp64", "udp1400"} & set(params.measurements):
        with console.status("compiling benchmarks/udpflood.pyx (first run only)"):
            flood_problem = traffic.prepare_flood()
        if flood_problem:
            console.print(f"[red]UDP generator: {flood_problem}[/red]")
    try:
        with Testbed(out_dir / "logs") as bed, _progress(console) as progress:
            total = len(runnable) + params.reps * len(runnable) * len(params.measurements)
            task = progress.add_task("building the testbed", total=total)
            data["testbed_prefix"] = bed.prefix
            pairs: list[Pair] = []
            for c in runnable:
                progress.update(task, description=f"setting up {c.label}")
                ts = time.monotonic()
                try:
                    pair = bed.setup(c)
                except SetupError as e:
                    results[c.name].update(status="failed", reason=str(e))
                    console.print(f"[red]{c.label}: failed: {e}[/red]")
                    progress.advance(task, 1 + params.reps * len(params.measurements))
                    continue
                results[c.name].update(setup_seconds=round(time.monotonic() - ts, 2), detail=pair.detail)
                pairs.append(pair)
                progress.advance(task)
            _round_robin(bed, pairs, params, results, progress, task, flood_problem)
    except KeyboardInterrupt:
        data["interrupted"] = True
        console.print("[yellow]interrupted: the testbed is removed; partial results are written[/yellow]")
    data["seconds"] = round(time.monotonic() - t0, 1)
    for c in configs:
        entry = results[c.name]
        entry["metrics"] = aggregate(c, entry["runs"], params.measurements)
        if entry["status"] == "pending":
            missing = [k for k, v in entry["metrics"].items() if v["median"] is None and not v["na"]]
            entry["status"] = "ok" if not missing else ("partial" if len(missing) < len(entry["metrics"]) else "failed")
            if missing:
                first = next((e for k in missing for e in entry["metrics"][k]["errors"]),
                             "the run was interrupted first" if data["interrupted"] else "not measured")
                entry["reason"] = f"no value for {', '.join(missing)}: {first}"
        data["configs"].append(entry)
    add_ratios(data["configs"])
    write(data, out_dir, console)
    if data["interrupted"]:
        raise KeyboardInterrupt
    return data


def _round_robin(bed: Testbed, pairs: list[Pair], params: Params, results: dict[str, dict[str, Any]],
                 progress: Progress, task: Any, flood_problem: str | None = None) -> None:
    for rep in range(params.reps):
        for pair in pairs:
            entry = results[pair.config.name]
            run_result: dict[str, Any] = {"rep": rep + 1}
            entry["runs"].append(run_result)
            for what in params.measurements:
                progress.update(task, description=f"run {rep + 1}/{params.reps}: {pair.config.label}: {what}")
                dead = bed.daemon_alive(pair)
                if dead:
                    run_result[what] = {"error": dead}
                elif flood_problem and what.startswith("udp"):
                    run_result[what] = {"error": f"no UDP generator: {flood_problem}"}
                else:
                    try:
                        run_result[what] = measure(pair, what, params)
                    except traffic.MeasureError as e:
                        run_result[what] = {"error": str(e)}
                progress.advance(task)


class _LineProgress(Progress):
    """Without a terminal (CI logs, pipes) a bar cannot redraw: print each step on its own line instead."""

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if "description" in kwargs and not self.console.is_terminal:
            task = self.tasks[0] if self.tasks else None
            done = f"[{int(task.completed)}/{int(task.total or 0)}] " if task else ""
            self.console.print(f"{done}{kwargs['description']}", markup=False, highlight=False)


def _progress(console: Console) -> Progress:
    return _LineProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         console=console, transient=False, disable=not console.is_terminal)


def write(data: dict[str, Any], out_dir: Path, console: Console, *, json_too: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if json_too:
        report.write_json(out_dir / "datapath.json", data)
    table = report.datapath_markdown(data)
    steps = report.udp_steps_markdown(data)
    if steps:
        table += "\n" + steps
    (out_dir / "datapath.md").write_text(table)
    problem = report.datapath_chart(data, out_dir / "datapath.png")
    print(table, flush=True)  # stdout, unwrapped: the table is the result
    if problem:
        console.print(f"[yellow]{problem}[/yellow]")
    console.print(f"wrote {out_dir / 'datapath.json'}, " * json_too + f"{out_dir / 'datapath.md'}"
                  + ("" if problem else f", {out_dir / 'datapath.png'}"))
