"""One measurement each: iperf3 TCP, a batched UDP flood, ping RTT (idle, and under a TCP stream), and a
process's CPU time from /proc.

Every function runs real tools inside the pair's namespaces and raises MeasureError (with the tool's
own words) instead of returning a zero: a failed measurement must never look like a slow one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from benchmarks import flood
from benchmarks.testbed import METRICS_PORT, PROJECT_ROOT, Pair
from flannelpy.lab.topology import netns_exec

IPERF_PORT = 5201
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_RTT = re.compile(r"time=([0-9.]+) ms")


class MeasureError(RuntimeError):
    pass


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of every thread of each process (fields 14 and 15 of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError as e:
            raise MeasureError(f"process {pid} is gone ({e.strerror})") from None
        fields = stat[stat.rindex(")") + 2:].split()  # comm may contain spaces; fields start at 3
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def _wait_listening(netns: str, port: int, server: subprocess.Popen[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(netns_exec(netns, ["ss", "-Hltn", f"sport = :{port}"]), capture_output=True,
                             text=True, check=False).stdout
        if out.strip():
            return
        if server.poll() is not None:
            raise MeasureError(f"iperf3 server exited with code {server.returncode}: "
                               f"{(server.communicate()[1] or '').strip()}")
        if time.monotonic() > deadline:
            raise MeasureError(f"iperf3 server in {netns} not listening on {port} after {timeout}s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)


@contextlib.contextmanager
def _iperf3_server(pair: Pair) -> Iterator[None]:
    """A one-off iperf3 server in the server namespace, listening until the block ends."""
    server = subprocess.Popen(netns_exec(pair.server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, start_new_session=True)
    try:
        _wait_listening(pair.server_ns, IPERF_PORT, server)
        yield
    finally:
        _stop(server)


def _iperf3_argv(pair: Pair, client_args: Sequence[str], duration: float) -> list[str]:
    # iperf3 reads -t as whole seconds (and 0 as "forever").
    return netns_exec(pair.client_ns, ["iperf3", "-c", pair.server_ip, "-p", str(IPERF_PORT), "-t",
                                       str(max(1, round(duration))), "-J", "--connect-timeout", "5000",
                                       *client_args])


def _iperf3_result(stdout: str, stderr: str, code: int | None) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(stdout)
    except ValueError:
        raise MeasureError(f"iperf3 printed no JSON (code {code}): {(stderr or stdout).strip()[:300]}") from None
    if "error" in result:
        raise MeasureError(f"iperf3: {result['error']}")
    return result


def iperf3(pair: Pair, client_args: Sequence[str], duration: float) -> dict[str, Any]:
    """A one-off iperf3 server in the server namespace and one client run; iperf3's JSON."""
    with _iperf3_server(pair):
        try:
            proc = subprocess.run(_iperf3_argv(pair, client_args, duration), capture_output=True, text=True,
                                  timeout=duration + 30, check=False)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"iperf3 {' '.join(client_args)} did not finish within {duration + 30:.0f}s") from None
        return _iperf3_result(proc.stdout, proc.stderr, proc.returncode)


def tcp(pair: Pair, streams: int, duration: float) -> dict[str, float]:
    """Receiver-side goodput in Gbit/s and the bytes moved, plus the daemons' CPU seconds meanwhile."""
    before = cpu_seconds(pair.daemon_pids)
    result = iperf3(pair, ["-P", str(streams)], duration)
    cpu = cpu_seconds(pair.daemon_pids) - before
    received = result["end"]["sum_received"]
    bps = float(received["bits_per_second"])
    if bps <= 0:
        raise MeasureError("iperf3 received nothing")
    retransmits = result["end"].get("sum_sent", {}).get("retransmits")
    return {"gbps": bps / 1e9, "bytes": float(received["bytes"]), "cpu_s": cpu,
            "retransmits": float(retransmits) if retransmits is not None else math.nan}


def _flood_argv(netns: str, args: Sequence[str]) -> list[str]:
    return netns_exec(netns, [sys.executable, "-m", "benchmarks.flood", *args])


def _flood_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                       os.environ.get("PYTHONPATH")]))}


def _json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


_METRIC = re.compile(r'^flannel_(packets|drops)_total\{direction="(encap|decap)"(?:,reason="(\w+)")?\} (\S+)$', re.M)
_SCRAPE = ("import http.client,sys\n"
           "c=http.client.HTTPConnection('127.0.0.1',int(sys.argv[1]),timeout=5)\n"
           "c.request('GET','/metrics')\nr=c.getresponse()\nsys.stdout.write(r.read().decode())\n"
           "sys.exit(r.status!=200)\n")


def daemon_counters(netns: Sequence[str]) -> list[dict[str, float]]:
    """Each host's data-path counters from its daemon's /metrics: {"encap_packets": n, "decap_drops": n, ...}."""
    procs = [subprocess.Popen(netns_exec(ns, [sys.executable, "-I", "-c", _SCRAPE, str(METRICS_PORT)]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for ns in netns]
    found = []
    for ns, proc in zip(netns, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise MeasureError(f"/metrics of the daemon in {ns} did not answer within 15s") from None
        if proc.returncode != 0:
            raise MeasureError(f"/metrics of the daemon in {ns}: {(err.strip().splitlines() or ['?'])[-1]}")
        counters: dict[str, float] = {}
        for kind, direction, _reason, value in _METRIC.findall(out):
            key = f"{direction}_{kind}"
            counters[key] = counters.get(key, 0.0) + float(value)
        found.append(counters)
    return found


def prepare_flood() -> str | None:
    """Compile the UDP generator and sink before the run (the namespaced processes only load it); None if ok."""
    try:
        flood.load()
    except Exception as e:  # pyximport raises whatever the compiler step raised
        return f"cannot compile benchmarks/udpflood.pyx: {type(e).__name__}: {str(e)[:300]}"
    return None


def udp(pair: Pair, size: int, duration: float) -> dict[str, float]:
    """`size`-byte UDP payloads from a batched generator for `duration` s: delivered packets/s and loss.

    The generator (client container) and the sink (server container) move 64 datagrams per system call
    (benchmarks/udpflood.pyx). With daemons that serve /metrics, their counters give the data path's own
    rates: packets the sending host's daemon encapsulated and the receiving host's daemon decapsulated.
    """
    sink = subprocess.Popen(_flood_argv(pair.server_ns, ["sink", "--port", str(flood.PORT),
                                                         "--seconds", f"{duration:g}"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=_flood_env(), start_new_session=True)
    try:
        assert sink.stdout is not None
        ready, _, _ = select.select([sink.stdout], [], [], 30)
        line = sink.stdout.readline().strip() if ready else ""
        if line != "ready":
            _stop(sink)
            raise MeasureError(f"UDP sink did not start: {line or (sink.communicate()[1] or '').strip()[-300:]}")
        counters = daemon_counters(pair.metrics_netns) if pair.metrics_netns else []
        cpu = cpu_seconds(pair.daemon_pids)
        try:
            send = subprocess.run(_flood_argv(pair.client_ns, ["send", "--to", pair.server_ip, "--port",
                                                               str(flood.PORT), "--size", str(size),
                                                               "--seconds", f"{duration:g}"]),
                                  capture_output=True, text=True, env=_flood_env(), timeout=duration + 30,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"UDP generator did not finish within {duration + 30:.0f}s") from None
        sent = _json_line(send.stdout)
        if sent is None or sent.get("error"):
            why = sent["error"] if sent else (send.stderr.strip().splitlines() or ["no output"])[-1]
            raise MeasureError(f"UDP generator failed: {why}")
        try:
            out, err = sink.communicate(timeout=duration + 15)
        except subprocess.TimeoutExpired:
            raise MeasureError("UDP sink did not finish") from None
        cpu = cpu_seconds(pair.daemon_pids) - cpu
        after = daemon_counters(pair.metrics_netns) if pair.metrics_netns else []
    finally:
        _stop(sink)
    got = _json_line(out)
    if got is None or got.get("error"):
        raise MeasureError(f"UDP sink failed: {got['error'] if got else (err.strip().splitlines() or ['?'])[-1]}")
    n_sent, seconds, received = int(sent["sent"]), float(sent["seconds"]), int(got["packets"])
    if n_sent <= 0 or seconds <= 0:
        raise MeasureError(f"the UDP generator sent nothing: {sent.get('send_errors') or 'no error given'}")
    if received <= 0:
        raise MeasureError(f"none of {n_sent} UDP datagrams of {size} B arrived")
    result = {"kpps": received / seconds / 1e3, "sent_kpps": n_sent / seconds / 1e3,
              "loss_pct": max(0.0, 100.0 * (n_sent - received) / n_sent), "sent": float(n_sent),
              "received": float(received), "seconds": seconds, "cpu_s": cpu}
    if counters:
        def delta(host: int, key: str) -> float:
            return after[host].get(key, 0.0) - counters[host].get(key, 0.0)

        # Host 1 encapsulates what the generator sent; host 2 decapsulates it towards the sink.
        result.update(encap_kpps=delta(0, "encap_packets") / seconds / 1e3,
                      fwd_kpps=delta(1, "decap_packets") / seconds / 1e3,
                      daemon_drops=delta(0, "encap_drops") + delta(1, "decap_drops"))
    return result


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ping(pair: Pair, count: int, interval: float = 0.01) -> dict[str, float]:
    """ping(8) at `interval` seconds: RTT p50/p99 in ms and loss."""
    argv = ["ping", "-n", "-i", f"{interval:g}", "-c", str(count), "-W", "1", pair.server_ip]
    proc = subprocess.run(netns_exec(pair.client_ns, argv), capture_output=True, text=True,
                          timeout=count * interval + 30, check=False)
    rtts = [float(m.group(1)) for m in _RTT.finditer(proc.stdout)]
    if not rtts:
        raise MeasureError(f"no ping reply (code {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] }")
    return {"p50_ms": percentile(rtts, 50), "p99_ms": percentile(rtts, 99),
            "loss_pct": 100.0 * (count - len(rtts)) / count}


def loaded_ping(pair: Pair, count: int, interval: float = 0.01, ramp: float = 1.0) -> dict[str, float]:
    """ping(8) from the client to the server while one iperf3 TCP stream runs the same way: what a request
    waits behind a bulk transfer (bufferbloat). RTT p50/p99 in ms, loss, and the stream's Gbit/s."""
    duration = ramp + count * interval + 1.0
    with _iperf3_server(pair):
        client = subprocess.Popen(_iperf3_argv(pair, [], duration), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            time.sleep(ramp)  # past slow start: the queues a long transfer builds
            result = ping(pair, count, interval)
            try:
                out, err = client.communicate(timeout=duration + 30)
            except subprocess.TimeoutExpired:
                raise MeasureError(f"the iperf3 load did not finish within {duration + 30:.0f}s") from None
            load = _iperf3_result(out, err, client.returncode)
        finally:
            _stop(client)
    bps = float(load["end"]["sum_received"]["bits_per_second"])
    if bps <= 0:
        raise MeasureError("the iperf3 load moved nothing: this RTT was not measured under load")
    return {**result, "load_gbps": bps / 1e9}
