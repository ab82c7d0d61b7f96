"""The benchmark report's rules, on made-up results: a missing number reads "failed" or "n/a", never 0."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import datapath, report
from benchmarks.testbed import Config

MACHINE = {"cpu": "test cpu", "cores": 2, "memory_gb": 1.0, "kernel": "6.1", "os": "Debian", "python": "3.11",
           "iperf3": "iperf 3.12", "source": {"commit": "abc1234", "modified": []}}
UDP = Config("flannelpy-udp-compiled", "flannelpy udp (compiled)", "daemon", tag="uc", backend="udp")
RAW = Config("raw-veth", "raw veth", "raw")


def _flood(kpps: float, fwd: float | None = None) -> dict[str, float]:
    result = {"kpps": kpps, "sent_kpps": 2 * kpps, "loss_pct": 50.0, "sent": 2000 * kpps,
              "received": 1000 * kpps, "seconds": 1.0, "cpu_s": 0.5}
    if fwd is not None:
        result["fwd_kpps"] = fwd
    return result


def _data(configs: list[dict[str, Any]], measurements: tuple[str, ...]) -> dict[str, Any]:
    params = datapath.Params(reps=1, duration=1.0, measurements=measurements)
    data = {"kind": "datapath", "started": "now", "machine": MACHINE, "params": vars(params), "configs": configs}
    datapath.add_ratios(configs)
    return data


def _entry(config: Config, runs: list[dict[str, Any]], measured: tuple[str, ...]) -> dict[str, Any]:
    return {"name": config.name, "label": config.label, "status": "ok", "reason": None, "runs": runs,
            "metrics": datapath.aggregate(config, runs, measured)}


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_measurements_left_out_read_na_and_do_not_fail_the_configuration() -> None:
    measured = ("udp64", "ping")
    runs = [{"rep": 1, "udp64": _flood(80.0, fwd=79.0), "ping": {"p50_ms": 0.4, "p99_ms": 1.0, "loss_pct": 0.0}}]
    udp = _entry(UDP, runs, measured)
    assert all(m["median"] is not None or m["na"] for m in udp["metrics"].values())
    assert udp["metrics"]["tcp1_gbps"]["na"].startswith("not measured")
    assert udp["metrics"]["udp64_fwd_kpps"]["median"] == 79.0
    assert udp["metrics"]["udp64_cpu_us_per_packet"]["median"] == pytest.approx(1e6 * 0.5 / 80_000)
    raw = _entry(RAW, [{"rep": 1, "udp64": _flood(200.0), "ping": {"p50_ms": 0.05, "p99_ms": 0.1}}], measured)
    assert raw["metrics"]["udp64_fwd_kpps"]["na"] == "no daemon"
    host_gw = Config("flannelpy-host-gw", "flannelpy host-gw", "daemon", tag="hg", backend="host-gw")
    kernel_forwards = _entry(host_gw, [{"rep": 1, "udp64": _flood(90.0, fwd=0.0)}], measured)
    assert kernel_forwards["metrics"]["udp64_fwd_kpps"]["median"] is None  # its daemon forwards nothing itself
    assert kernel_forwards["metrics"]["udp64_fwd_kpps"]["na"] == "no data-path counters"
    table = report.datapath_markdown(_data([raw, udp], measured))
    cells = dict(zip([f"{m.title} ({m.unit})" for m in report.DATAPATH_METRICS], _row(table, UDP.label),
                     strict=True))
    assert cells["TCP 1 stream (Gbit/s)"] == "n/a" and cells["UDP 64 B (kpps)"] == "80"
    assert cells["64 B decap by daemon (kpps)"] == "79"
    assert "0.00" not in _row(table, UDP.label) and "batched generator" in table


def test_rtt_under_load_is_a_column_with_its_ratio_to_kernel_vxlan() -> None:
    measured = ("ping", "ping_loaded")
    kvx = Config("kernel-vxlan", "kernel vxlan", "kernel")

    def runs(idle: float, loaded: list[float]) -> list[dict[str, Any]]:
        return [{"rep": i + 1, "ping": {"p50_ms": idle, "p99_ms": idle},
                 "ping_loaded": {"p50_ms": v, "p99_ms": 2 * v, "loss_pct": 0.0, "load_gbps": 5.0}}
                for i, v in enumerate(loaded)]
    udp = _entry(UDP, runs(0.35, [2.5, 2.0, 3.0]), measured)
    vxlan = _entry(kvx, runs(0.16, [0.05, 0.04, 0.06]), measured)
    assert udp["metrics"]["rtt_loaded_p50_ms"]["median"] == 2.5
    assert udp["metrics"]["rtt_loaded_p99_ms"]["median"] == 5.0
    table = report.datapath_markdown(_data([vxlan, udp], measured))
    assert "RTT p50 under 1 TCP stream" in table
    assert "2.500" in _row(table, UDP.label)
    assert "50.00x" in table  # 2.5 ms against kernel vxlan's 0.05


def test_a_failed_flood_reads_failed_with_its_reason_never_zero() -> None:
    runs = [{"rep": 1, "udp64": {"error": "none of 5000 UDP datagrams of 64 B arrived"},
             "ping": {"p50_ms": 0.4, "p99_ms": 1.0}}]
    udp = _entry(UDP, runs, ("udp64", "ping"))
    assert udp["metrics"]["udp64_kpps"]["median"] is None and not udp["metrics"]["udp64_kpps"]["na"]
    table = report.datapath_markdown(_data([udp], ("udp64", "ping")))
    assert "failed" in _row(table, UDP.label)
    assert "none of 5000 UDP datagrams of 64 B arrived" in table


def test_results_of_an_older_harness_without_the_new_columns_still_render() -> None:
    udp = _entry(UDP, [{"rep": 1, "udp64": _flood(30.0, fwd=30.0)}], ("udp64",))
    del udp["metrics"]["udp64_fwd_kpps"], udp["metrics"]["udp64_cpu_us_per_packet"]  # iperf3 era: no such keys
    data = _data([udp], ("udp64",))
    del data["params"]["udp_generator"]
    table = report.datapath_markdown(data)
    assert "iperf3" in table and _row(table, UDP.label)[2] == "30"
