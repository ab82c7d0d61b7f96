"""One measurement each: iperf3 TCP and UDP, ping RTT, and a process's CPU time from /proc.

Every function runs real tools inside the pair's namespaces and raises MeasureError (with iperf3's or
ping's own words) instead of returning a zero: a failed measurement must never look like a slow one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.testbed import Pair
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


def iperf3(pair: Pair, client_args: Sequence[str], duration: float) -> dict[str, Any]:
    """A one-off iperf3 server in the server namespace and one client run; iperf3's JSON."""
    server = subprocess.Popen(netns_exec(pair.server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, start_new_session=True)
    try:
        _wait_listening(pair.server_ns, IPERF_PORT, server)
        argv = ["iperf3", "-c", pair.server_ip, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J",
                "--connect-timeout", "5000", *client_args]
        try:
            proc = subprocess.run(netns_exec(pair.client_ns, argv), capture_output=True, text=True,
                                  timeout=duration + 30, check=False)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"iperf3 {' '.join(client_args)} did not finish within {duration + 30:.0f}s") from None
        try:
            result: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise MeasureError(f"iperf3 printed no JSON (code {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[:300]}") from None
        if "error" in result:
            raise MeasureError(f"iperf3: {result['error']}")
        return result
    finally:
        _stop(server)


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


def udp(pair: Pair, length: int, duration: float) -> dict[str, float]:
    """`length`-byte UDP payloads as fast as the client can send (-b 0): received packets/s and loss."""
    before = cpu_seconds(pair.daemon_pids)
    result = iperf3(pair, ["-u", "-l", str(length), "-b", "0"], duration)
    cpu = cpu_seconds(pair.daemon_pids) - before
    received = result["end"]["sum_received"]
    sent, lost, seconds = int(received["packets"]), int(received["lost_packets"]), float(received["seconds"])
    if seconds <= 0 or sent <= 0:
        raise MeasureError("iperf3 sent no UDP packets")
    got = sent - lost
    if got <= 0:
        raise MeasureError(f"all {sent} UDP packets were lost")
    return {"kpps": got / seconds / 1e3, "sent_kpps": sent / seconds / 1e3,
            "loss_pct": 100.0 * lost / sent, "bytes": float(received["bytes"]), "cpu_s": cpu}


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
