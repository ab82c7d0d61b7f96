"""The benchmark harness in quick mode (one repetition, one second per measurement), end to end.

What a user checks after `python -m benchmarks all --quick`: every configuration whose parts exist produced a
number for every measurement, the ones that cannot run say why instead of showing zeros, the files are
written, and nothing is left behind. No timing thresholds: the numbers only have to exist.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLANNELPY_CONFIGS = {
    "flannelpy-host-gw": "host-gw",
    "flannelpy-vxlan": "vxlan",
    "flannelpy-udp-compiled": "udp",
    "flannelpy-udp-python": "udp",
    "flannelpy-udp-batch1": "udp",
}
RATES = ("tcp1_gbps", "tcp4_gbps", "udp64_kpps", "udp1400_kpps", "rtt_p50_ms", "rtt_p99_ms")

pytestmark = [
    pytest.mark.root,
    pytest.mark.etcd,
    pytest.mark.slow,
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("iperf3", "ping", "ss")),
                       reason="needs iperf3, ping and ss (scripts/setup.sh installs them)"),
]


def _implemented(backend: str) -> str | None:
    """None when the backend (and for udp the compiled fast path) can be imported here, else why not."""
    code = (f"from flannelpy.backend.base import backend_class; backend_class({backend!r})"
            + ("; import fastpath.io, fastpath.core" if backend == "udp" else ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of everything; a fake flanneld that exits at once stands in for FLANNELD_BIN."""
    out = tmp_path_factory.mktemp("bench")
    fake = out / "fake-flanneld"
    fake.write_text("#!/bin/sh\necho 'fake flanneld: not a real binary' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLANNELD_BIN": str(fake)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "all", "--quick", "--peers", "1,3",
                           "--start-sizes", "0,200", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split())
    results = {kind: json.loads((out / f"{kind}.json").read_text())
               for kind in ("datapath", "controlplane", "packetcore") if (out / f"{kind}.json").exists()}
    return {"proc": proc, "out": out, "results": results, "new_netns": after - before}


def test_the_harness_exits_zero_and_writes_json_markdown_and_chart(bench: dict[str, Any]) -> None:
    proc, out = bench["proc"], bench["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("datapath.json", "datapath.md", "datapath.png", "controlplane.json", "controlplane.md",
                 "packetcore.json", "packetcore.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "datapath.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_implemented_configuration_produced_a_number_for_every_measurement(bench: dict[str, Any]) -> None:
    data = bench["results"]["datapath"]
    configs = {c["name"]: c for c in data["configs"]}
    expected = {"raw-veth", "kernel-vxlan", *FLANNELPY_CONFIGS}
    assert expected <= set(configs)
    must_work = {"raw-veth", "kernel-vxlan"} | {
        name for name, backend in FLANNELPY_CONFIGS.items() if _implemented(backend) is None}
    for name in must_work:
        c = configs[name]
        assert c["status"] == "ok", f"{name}: {c['reason']}"
        for key in RATES:
            value = c["metrics"][key]["median"]
            assert isinstance(value, float) and value > 0, f"{name} {key} = {value!r}"
        for key in ("udp64_loss_pct", "udp1400_loss_pct"):
            assert 0 <= c["metrics"][key]["median"] <= 100, f"{name} {key}"
        cpu = c["metrics"]["cpu_s_per_gb"]
        if name.startswith("flannelpy"):
            assert cpu["median"] is not None and cpu["median"] >= 0, f"{name}: daemon CPU missing"
        else:
            assert cpu["median"] is None and cpu["na"], "the kernel configurations have no daemon to charge"
    table = (bench["out"] / "datapath.md").read_text()
    for name in must_work:
        assert f"| {configs[name]['label']} |" in table
    assert "Ratio to raw veth" in table and "Ratio to kernel vxlan" in table


def test_a_configuration_that_cannot_run_is_reported_failed_with_its_reason_not_as_zeros(
        bench: dict[str, Any]) -> None:
    data = bench["results"]["datapath"]
    configs = {c["name"]: c for c in data["configs"]}
    for name in ("flanneld-udp", "flanneld-vxlan"):  # FLANNELD_BIN is a script that exits 3
        c = configs[name]
        assert c["status"] == "failed"
        assert "exited with code 3" in c["reason"] and "fake flanneld" in c["reason"]
        assert all(m["median"] is None for m in c["metrics"].values())
        assert c["label"] in (bench["out"] / "datapath.md").read_text()
    for c in configs.values():  # whatever failed carries a reason, and no failed metric shows as 0
        if c["status"] != "ok":
            assert c["reason"]
        for key, m in c["metrics"].items():
            if m["median"] is None and not m["na"]:
                assert c["status"] != "ok", f"{c['name']} {key}"


def test_control_plane_and_packet_core_produced_numbers(bench: dict[str, Any]) -> None:
    cp = bench["results"]["controlplane"]
    for r in cp["lease_to_route"]:
        assert "error" not in r, r
        assert r["p50_ms"]["n"] > 0 and r["last_peer_ms"]["p50"] > 0
    assert [r["peers"] for r in cp["lease_to_route"]] == [1, 3]
    for r in cp["acquire"]:
        assert r["duplicates"] == 0 and r["acquired"] == r["acquirers"] == 100
        assert r["keys_in_etcd"] == 100 and r["distinct_holders_in_etcd"] == 100
    alloc = [r for r in cp["start"] if r["backend"] == "alloc"]
    assert {r["leases"] for r in alloc} == {0, 200}
    assert all(r.get("seconds", 0) > 0 for r in alloc), alloc
    pc = bench["results"]["packetcore"]
    assert len(pc["results"]) == 8  # encap and decap at 64, 512, 1400, 1472 bytes
    for row in pc["results"]:
        assert row["python"]["ns_per_packet"] > 0
        if "compiled" not in pc["errors"]:
            assert row["compiled"]["ns_per_packet"] > 0


def test_nothing_is_left_behind(bench: dict[str, Any]) -> None:
    prefixes = [bench["results"][k].get("testbed_prefix") for k in ("datapath", "controlplane")]
    assert all(prefixes)
    left = [ns for ns in bench["new_netns"] if any(ns.startswith(p + "-") for p in prefixes)]
    assert left == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    assert str(bench["out"]) not in ps  # no daemon still running with our subnet files
