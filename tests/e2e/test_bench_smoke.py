"""The benchmark harness in quick mode, end to end, in two short runs side by side.

What a user checks after `python -m benchmarks ... --quick`: every configuration whose parts exist produced a
number, the ones that cannot run say why instead of showing zeros, the files are written, and nothing is left
behind. No timing thresholds: the numbers only have to exist.

To stay short, the work is split into four runs at once (the data-path ones each on its own testbed):
  full     `datapath --quick` for raw veth, flannelpy udp (compiled) and flanneld udp (a fake binary): every
           measurement (TCP, the UDP flood with the daemons' counters, ping);
  rest     `datapath --quick --measurements ping` for every other configuration, the udp steps and flanneld
           vxlan included: each must come up and carry traffic, and the measurements left out show as not
           measured, never as zeros;
  control  `controlplane --quick` with one peer and an empty etcd;
  core     `packetcore --quick`.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.testbed import default_configs

ROOT = Path(__file__).resolve().parents[2]
FULL = ("raw-veth", "flannelpy-udp-compiled", "flanneld-udp")
BACKENDS = {"flannelpy-host-gw": "host-gw", "flannelpy-vxlan": "vxlan", "flannelpy-udp-compiled": "udp",
            "flannelpy-udp-python": "udp", "flannelpy-udp-batch1": "udp"}
RATES = ("tcp1_gbps", "tcp4_gbps", "udp64_kpps", "udp1400_kpps", "rtt_p50_ms", "rtt_p99_ms", "rtt_loaded_p50_ms")
FAKE_FLANNELD = "#!/bin/sh\necho 'fake flanneld: not a real binary' >&2\nexit 3\n"

pytestmark = [
    pytest.mark.root,
    pytest.mark.etcd,
    pytest.mark.slow,
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("iperf3", "ping", "ss")),
                       reason="needs iperf3, ping and ss (scripts/setup.sh installs them)"),
]


@functools.cache
def _implemented(backend: str) -> str | None:
    """None when the backend (and for udp the compiled fast path) can be imported here, else why not."""
    try:
        from flannelpy.backend.base import backend_class

        backend_class(backend)
        if backend == "udp":
            importlib.import_module("fastpath.io")
            importlib.import_module("fastpath.core")
    except Exception as e:  # not built, not written yet: that configuration may fail, with its reason
        return f"{type(e).__name__}: {e}"
    return None


def _must_work(names: set[str]) -> set[str]:
    return {n for n in names if n in ("raw-veth", "kernel-vxlan")
            or (n in BACKENDS and _implemented(BACKENDS[n]) is None)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The four quick runs at once; a fake flanneld that exits at once stands in for FLANNELD_BIN."""
    top = tmp_path_factory.mktemp("bench")
    fake = top / "fake-flanneld"
    fake.write_text(FAKE_FLANNELD)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    rest = [c.name for c in default_configs() if c.name not in FULL]
    argvs = {
        # iperf3 runs whole seconds (1 s); the UDP floods take the 0.5.
        "full": ["datapath", "--quick", "--configs", ",".join(FULL), "--ping-count", "20", "--duration", "0.5"],
        "rest": ["datapath", "--quick", "--configs", ",".join(rest), "--measurements", "ping", "--ping-count", "20"],
        "control": ["controlplane", "--quick", "--peers", "1", "--start-sizes", "0"],
        "core": ["packetcore", "--quick"],
    }
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLANNELD_BIN": str(fake)}
    procs = {name: subprocess.Popen([sys.executable, "-m", "benchmarks", *argv, "--out", str(top / name)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in argvs.items()}
    runs: dict[str, Any] = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the harness removes its testbed on SIGTERM
            _, err = proc.communicate(timeout=60)
        results = {kind: json.loads((top / name / f"{kind}.json").read_text())
                   for kind in ("datapath", "controlplane", "packetcore") if (top / name / f"{kind}.json").exists()}
        runs[name] = {"code": proc.returncode, "stderr": err, "out": top / name, "results": results}
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split())
    return {"runs": runs, "rest": rest, "top": top, "new_netns": after - before}


def _configs(bench: dict[str, Any], run: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bench["runs"][run]["results"]["datapath"]["configs"]}


def test_every_run_exits_zero_and_writes_json_markdown_and_chart(bench: dict[str, Any]) -> None:
    for name, run in bench["runs"].items():
        assert run["code"] == 0, f"{name}: {run['stderr'][-3000:]}"
    out = {name: run["out"] for name, run in bench["runs"].items()}
    for path in [out["full"] / "datapath.png", out["rest"] / "datapath.png",
                 *(out[run] / f"{kind}.{ext}" for run, kind in (("full", "datapath"), ("rest", "datapath"),
                                                               ("control", "controlplane"), ("core", "packetcore"))
                   for ext in ("json", "md"))]:
        assert path.stat().st_size > 0, path
    assert (out["full"] / "datapath.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_default_configuration_is_covered_by_one_of_the_runs(bench: dict[str, Any]) -> None:
    covered = set(_configs(bench, "full")) | set(_configs(bench, "rest"))
    assert {c.name for c in default_configs()} <= covered  # the udp steps and flanneld's too


def test_the_full_run_has_every_measurement_including_the_udp_flood_and_daemon_counters(
        bench: dict[str, Any]) -> None:
    configs = _configs(bench, "full")
    for name in _must_work(set(FULL)):
        c = configs[name]
        assert c["status"] == "ok", f"{name}: {c['reason']}"
        for key in RATES:
            value = c["metrics"][key]["median"]
            assert isinstance(value, float) and value > 0, f"{name} {key} = {value!r}"
        for key in ("udp64_loss_pct", "udp1400_loss_pct"):
            assert 0 <= c["metrics"][key]["median"] <= 100, f"{name} {key}"
        run = c["runs"][0]
        for what in ("udp64", "udp1400"):  # delivered never exceeds what the generator sent
            assert 0 < run[what]["received"] <= run[what]["sent"], (name, run[what])
        assert run["ping_loaded"]["load_gbps"] > 0, (name, run["ping_loaded"])  # the RTT was taken under load
        cpu, fwd = c["metrics"]["cpu_s_per_gb"], c["metrics"]["udp64_fwd_kpps"]
        if name.startswith("flannelpy"):
            assert cpu["median"] is not None and cpu["median"] >= 0, f"{name}: daemon CPU missing"
            assert fwd["median"] is not None and fwd["median"] > 0, f"{name}: no decap counter from /metrics"
        else:
            assert cpu["median"] is None and cpu["na"], "the kernel configurations have no daemon to charge"
            assert fwd["median"] is None and fwd["na"]
    table = (bench["runs"]["full"]["out"] / "datapath.md").read_text()
    for name in _must_work(set(FULL)):
        assert f"| {configs[name]['label']} |" in table
    assert "Ratio to raw veth" in table and "batched generator" in table


def test_every_other_configuration_carried_traffic_and_the_rest_shows_as_not_measured(
        bench: dict[str, Any]) -> None:
    configs = _configs(bench, "rest")
    for name in _must_work(set(bench["rest"])):
        c = configs[name]
        assert c["status"] == "ok", f"{name}: {c['reason']}"
        for key in ("rtt_p50_ms", "rtt_p99_ms"):
            value = c["metrics"][key]["median"]
            assert isinstance(value, float) and value > 0, f"{name} {key} = {value!r}"
        for key in ("tcp1_gbps", "udp64_kpps", "udp1400_loss_pct"):
            m = c["metrics"][key]
            assert m["median"] is None and "not measured" in m["na"] and not m["errors"], (name, key, m)


def test_a_configuration_that_cannot_run_is_reported_failed_with_its_reason_not_as_zeros(
        bench: dict[str, Any]) -> None:
    for run, name in (("full", "flanneld-udp"), ("rest", "flanneld-vxlan")):  # FLANNELD_BIN exits 3
        c = _configs(bench, run)[name]
        assert c["status"] == "failed"
        assert "exited with code 3" in c["reason"] and "fake flanneld" in c["reason"]
        assert all(m["median"] is None for m in c["metrics"].values())
        table = (bench["runs"][run]["out"] / "datapath.md").read_text()
        assert f"| {c['label']} | failed |" in table and "fake flanneld" in table
    for run in ("full", "rest"):  # whatever failed carries a reason, and no failed metric shows as 0
        for c in _configs(bench, run).values():
            if c["status"] != "ok":
                assert c["reason"]
            for key, m in c["metrics"].items():
                if m["median"] is None and not m["na"]:
                    assert c["status"] != "ok", f"{c['name']} {key}"


def test_control_plane_and_packet_core_produced_numbers(bench: dict[str, Any]) -> None:
    cp = bench["runs"]["control"]["results"]["controlplane"]
    for r in cp["lease_to_route"]:
        assert "error" not in r, r
        assert r["p50_ms"]["n"] > 0 and r["last_peer_ms"]["p50"] > 0
    assert [r["peers"] for r in cp["lease_to_route"]] == [1]
    for r in cp["acquire"]:
        assert r["duplicates"] == 0 and r["acquired"] == r["acquirers"] == 100
        assert r["keys_in_etcd"] == 100 and r["distinct_holders_in_etcd"] == 100
    alloc = [r for r in cp["start"] if r["backend"] == "alloc"]
    assert {r["leases"] for r in alloc} == {0}
    assert all(r.get("seconds", 0) > 0 for r in alloc), alloc
    pc = bench["runs"]["core"]["results"]["packetcore"]
    assert len(pc["results"]) == 8  # encap and decap at 64, 512, 1400, 1472 bytes
    for row in pc["results"]:
        assert row["python"]["ns_per_packet"] > 0
        if "compiled" not in pc["errors"]:
            assert row["compiled"]["ns_per_packet"] > 0


def test_nothing_is_left_behind(bench: dict[str, Any]) -> None:
    prefixes = [bench["runs"][run]["results"][kind].get("testbed_prefix")
                for run, kind in (("full", "datapath"), ("rest", "datapath"), ("control", "controlplane"))]
    assert all(prefixes)
    left = [ns for ns in bench["new_netns"] if any(ns.startswith(p + "-") for p in prefixes)]
    assert left == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    assert str(bench["top"]) not in ps  # no daemon still running with our subnet files
