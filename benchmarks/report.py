"""Results on disk: the machine, medians and ratios as JSON, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    title: str  # column header
    unit: str
    fmt: str = "{:.2f}"
    ratio: bool = True  # ratios to raw veth and kernel vxlan make sense


DATAPATH_METRICS: tuple[Metric, ...] = (
    Metric("tcp1_gbps", "TCP 1 stream", "Gbit/s"),
    Metric("tcp4_gbps", "TCP 4 streams", "Gbit/s"),
    Metric("udp64_kpps", "UDP 64 B", "kpps", "{:.0f}"),
    Metric("udp64_loss_pct", "loss 64 B", "%", "{:.1f}", ratio=False),
    Metric("udp64_fwd_kpps", "64 B decap by daemon", "kpps", "{:.0f}", ratio=False),
    Metric("udp1400_kpps", "UDP 1400 B", "kpps", "{:.0f}"),
    Metric("udp1400_loss_pct", "loss 1400 B", "%", "{:.1f}", ratio=False),
    Metric("rtt_p50_ms", "RTT p50", "ms", "{:.3f}"),
    Metric("rtt_p99_ms", "RTT p99", "ms", "{:.3f}"),
    Metric("rtt_loaded_p50_ms", "RTT p50 under 1 TCP stream", "ms", "{:.3f}"),
    Metric("cpu_s_per_gb", "daemon CPU", "s/GB", "{:.2f}", ratio=False),
)


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, kernel, Python, tool versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "iperf3": _first_line(["iperf3", "--version"]),
        "etcd": _first_line(["etcd", "--version"]),
        "source": source(),
    }


def source() -> dict[str, Any]:
    """The code that was measured: commit, and the files that differed from it (a shared tree moves)."""
    root = Path(__file__).resolve().parent.parent
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    try:
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        status = ""
    modified = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "modified": modified}


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def machine_line(m: dict[str, Any]) -> str:
    src = m.get("source") or {}
    code = f"; code at {src.get('commit')}" + (f" with local changes to {', '.join(src['modified'])}"
                                              if src.get("modified") else "") if src else ""
    return (f"{m['cpu']}, {m['cores']} cores, {m.get('memory_gb')} GB RAM; Linux {m['kernel']}; {m['os']}; "
            f"Python {m['python']}; {m['iperf3']}{code}")


NOT_IN_RUN: dict[str, Any] = {"median": None, "samples": [], "errors": [], "na": "not in this run"}


def metric(config: dict[str, Any], key: str) -> dict[str, Any]:
    """A configuration's metric; results written by an older harness may lack newer keys."""
    entry: dict[str, Any] = config["metrics"].get(key, NOT_IN_RUN)
    return entry


def udp_method(params: dict[str, Any]) -> str:
    if params.get("udp_generator") == "flood":
        return ("UDP: a batched generator (sendmmsg, 64 datagrams per call) floods the other container for "
                f"{params['duration']:g} s and a recvmmsg sink counts what arrives; kpps = datagrams delivered "
                "per second, loss = 1 - delivered/sent; \"decap by daemon\" = the receiving flannelpy daemon's "
                "decap_packets counter (/metrics) over the same time")
    return "UDP: iperf3 -u -b 0 (one datagram per system call; capped by iperf3 itself)"


def _cell(metric: Metric, entry: dict[str, Any]) -> str:
    value = entry.get("median")
    if value is None:
        return "n/a" if entry.get("na") else "failed"
    return metric.fmt.format(value)


def datapath_markdown(data: dict[str, Any]) -> str:
    """The table: one row per configuration, medians; then ratios; then failures with their reasons."""
    p = data["params"]
    lines = [
        f"Data path, medians of {p['reps']} repetition(s), {p['duration']:g} s per iperf3 test and UDP flood, "
        f"{p['ping_count']} pings at {p['ping_interval'] * 1000:g} ms; {data['started']}.",
        "",
        f"Machine: {machine_line(data['machine'])}.",
        "",
        "| configuration | " + " | ".join(f"{m.title} ({m.unit})" for m in DATAPATH_METRICS) + " |",
        "|---|" + "---:|" * len(DATAPATH_METRICS),
    ]
    notes = []
    for c in data["configs"]:
        if c["status"] == "skipped":
            notes.append(f"- {c['label']}: skipped ({c['reason']})")
            continue
        if c["status"] == "failed" and not any(e.get("median") is not None for e in c["metrics"].values()):
            lines.append(f"| {c['label']} | " + " | ".join("failed" for _ in DATAPATH_METRICS) + " |")
            notes.append(f"- {c['label']}: failed: {c['reason']}")
            continue
        lines.append(f"| {c['label']} | " + " | ".join(_cell(m, metric(c, m.key)) for m in DATAPATH_METRICS)
                     + " |")
        for m in DATAPATH_METRICS:
            errors = metric(c, m.key).get("errors") or []
            if metric(c, m.key).get("median") is None and errors:
                notes.append(f"- {c['label']}, {m.title}: failed: {errors[-1]}")
    ratio_metrics = [m for m in DATAPATH_METRICS if m.ratio]
    for ref_key, ref_title in (("ratio_to_raw_veth", "raw veth"), ("ratio_to_kernel_vxlan", "kernel vxlan")):
        lines += ["", f"Ratio to {ref_title} (medians; RTT: higher is slower):", "",
                  "| configuration | " + " | ".join(m.title for m in ratio_metrics) + " |",
                  "|---|" + "---:|" * len(ratio_metrics)]
        for c in data["configs"]:
            if c["status"] == "skipped" or not c.get(ref_key):
                continue
            cells = [c[ref_key].get(m.key) for m in ratio_metrics]
            if all(v is None for v in cells):
                continue
            lines.append(f"| {c['label']} | " + " | ".join("—" if v is None else f"{v:.2f}x" for v in cells) + " |")
    if data.get("interrupted"):
        lines[:0] = ["**Interrupted** (Ctrl-C or SIGTERM): partial results.", ""]
    lines += ["", "daemon CPU: user+system seconds of the two daemons during the TCP tests, per GB received "
              "(n/a: no daemon, the kernel does the work, or no such counter).", "", udp_method(p) + "."]
    if notes:
        lines += ["", "Not measured:", "", *notes]
    return "\n".join(lines) + "\n"


UDP_STEPS = ("flannelpy-udp-batch1", "flannelpy-udp-batch64", "flannelpy-udp-tso", "flannelpy-udp-tso-gso",
             "flannelpy-udp-compiled")


def udp_steps_markdown(data: dict[str, Any]) -> str:
    """The udp backend step by step, and issue 6's goals checked on this run's medians ("" if not measured)."""
    by_name = {c["name"]: c for c in data["configs"]}
    steps = [by_name[n] for n in UDP_STEPS if n in by_name and by_name[n]["status"] != "skipped"]
    if len(steps) < 2:
        return ""

    def med(c: dict[str, Any] | None, key: str) -> float | None:
        return None if c is None else metric(c, key)["median"]

    def cell(c: dict[str, Any], key: str, fmt: str) -> str:
        entry = metric(c, key)
        return _cell(Metric(key, "", "", fmt), entry)

    kvx = by_name.get("kernel-vxlan")
    flood = data["params"].get("udp_generator") == "flood"
    lines = ["| udp data path | TCP 1 stream (Gbit/s) | TCP 4 streams (Gbit/s) | UDP 64 B delivered (kpps) | "
             "loss 64 B (%) | 64 B decap by daemon (kpps) | daemon CPU per 64 B packet (µs) | RTT p50 (ms) | "
             "RTT p99 (ms) | RTT p50 under 1 TCP stream (ms) | daemon CPU (s/GB) | TCP 1 vs kernel vxlan |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in steps:
        t1, kv = med(c, "tcp1_gbps"), med(kvx, "tcp1_gbps")
        lines.append(f"| {c['label']} | {cell(c, 'tcp1_gbps', '{:.2f}')} | {cell(c, 'tcp4_gbps', '{:.2f}')} | "
                     f"{cell(c, 'udp64_kpps', '{:.0f}')} | {cell(c, 'udp64_loss_pct', '{:.1f}')} | "
                     f"{cell(c, 'udp64_fwd_kpps', '{:.0f}')} | {cell(c, 'udp64_cpu_us_per_packet', '{:.1f}')} | "
                     f"{cell(c, 'rtt_p50_ms', '{:.3f}')} | {cell(c, 'rtt_p99_ms', '{:.3f}')} | "
                     f"{cell(c, 'rtt_loaded_p50_ms', '{:.3f}')} | {cell(c, 'cpu_s_per_gb', '{:.2f}')} | "
                     + (f"{t1 / kv:.2f}x |" if t1 is not None and kv else "— |"))
    best, base = by_name.get("flannelpy-udp-compiled"), by_name.get("flannelpy-udp-batch1")
    goals = []

    def goal(text: str, value: float | None, limit: float | None, at_least: bool) -> None:
        if value is None or limit is None:
            goals.append(f"| {text} | not measured | |")
            return
        met = value >= limit if at_least else value <= limit
        goals.append(f"| {text} | {value:.3g} vs {limit:.3g} | {'met' if met else 'not met'} |")

    if best is not None:
        for key, name in (("tcp1_gbps", "1 stream"), ("tcp4_gbps", "4 streams")):
            k = med(kvx, key)
            goal(f"TCP {name} >= 0.5x kernel vxlan (Gbit/s)", med(best, key), None if k is None else 0.5 * k, True)
        b = med(base, "udp64_kpps")
        how = "batched generator" if flood else "iperf3, capped by iperf3 itself"
        goal(f"UDP 64 B delivered >= 2x one packet per syscall (kpps, {how})", med(best, "udp64_kpps"),
             None if b is None else 2 * b, True)
        k = med(kvx, "rtt_p50_ms")
        goal("ping RTT p50 <= 2x kernel vxlan (ms)", med(best, "rtt_p50_ms"), None if k is None else 2 * k, False)
        b = med(base, "cpu_s_per_gb")
        goal("daemon CPU per GB <= 0.5x one packet per syscall (s/GB)", med(best, "cpu_s_per_gb"),
             None if b is None else 0.5 * b, False)
    text = ("The udp backend step by step (same run, medians; daemon CPU per 64 B packet: both daemons' CPU "
            "seconds during the 64 B flood per datagram delivered):\n\n" + "\n".join(lines) + "\n")
    if goals:
        text += ("\nIssue 6's goals, on this run (all offloads on, as by default, against the references):\n\n"
                 "| goal | measured vs limit | |\n|---|---:|---|\n" + "\n".join(goals) + "\n")
    return text


def datapath_chart(data: dict[str, Any], path: Path) -> str | None:
    """A PNG with TCP throughput, UDP packet rate and RTT side by side; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'flannelpy[bench]'); no chart written"
    configs = [c for c in data["configs"] if c["status"] != "skipped"]
    labels = [c["label"].replace(" (", "\n(") for c in configs]
    nan = float("nan")

    def values(key: str) -> list[float]:
        return [metric(c, key)["median"] or nan for c in configs]  # failed: no bar, labelled below

    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    panels = (
        ("TCP throughput (Gbit/s, log scale)", (("tcp1_gbps", "1 stream"), ("tcp4_gbps", "4 streams")), True),
        ("UDP datagrams delivered (kpps)", (("udp64_kpps", "64 B"), ("udp1400_kpps", "1400 B")), False),
        ("ping RTT (ms, log scale)", (("rtt_p50_ms", "p50"), ("rtt_p99_ms", "p99"),
                                      ("rtt_loaded_p50_ms", "p50 under 1 TCP stream")), True),
    )
    for ax, (title, series, log_scale) in zip(axes, panels, strict=True):
        if log_scale:
            ax.set_yscale("log")
        width = 0.8 / len(series)
        for i, (key, name) in enumerate(series):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(configs))]
            ys = values(key)
            bars = ax.bar(xs, ys, width, label=name)
            for c, bar, y in zip(configs, bars, ys, strict=True):
                x = bar.get_x() + bar.get_width() / 2
                if y != y:  # NaN: failed, or not measured (--measurements, no daemon)
                    na = metric(c, key)["na"]
                    ax.annotate("n/a" if na else "failed", (x, 0.02), xycoords=("data", "axes fraction"),
                                ha="center", rotation=90, fontsize=7, color="gray" if na else "red")
                else:
                    ax.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=6, rotation=90,
                                xytext=(0, 2), textcoords="offset points")
        ax.set_title(title)
        ax.set_xticks(range(len(configs)))
        ax.set_xlim(-0.5, len(configs) - 0.5)  # a panel with no value at all keeps its labels in view
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    m = data["machine"]
    fig.suptitle(f"flannelpy data path: medians of {data['params']['reps']} run(s); {m['cores']} cores, "
                 f"Linux {m['kernel']}, Python {m['python']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def simple_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
