"""What an operator looks at, read from the tests: /metrics and /healthz inside a host namespace, the daemon's
JSON log, /proc (memory, file descriptors, TCP connections to etcd), the etcd leader, and traffic gaps."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from flannelpy.lab.cluster import Cluster
from flannelpy.lab.topology import Container

T = TypeVar("T")
GAP_PROBE = Path(__file__).with_name("gap_probe.py")


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll check() until it returns something truthy; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


# -- HTTP endpoints of the daemon -----------------------------------------------------------------

_HTTP = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode(), end='')\n"
    "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode(), end='')\n"
)


def http_get(cluster: Cluster, host: str, port: int, path: str) -> tuple[int, str]:
    out = cluster.run(cluster.host(host), [sys.executable, "-c", _HTTP, f"http://127.0.0.1:{port}{path}"]).stdout
    status, _, body = out.partition("\n")
    return int(status), body


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def metrics(cluster: Cluster, host: str, port: int) -> dict[str, float]:
    """Prometheus samples, e.g. {'flannel_drops_total{reason="decap_drop_short"}': 3.0, 'flannel_routes': 2.0}."""
    status, body = http_get(cluster, host, port, "/metrics")
    assert status == 200, body
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def labels(sample: str) -> dict[str, str]:
    inner = sample.partition("{")[2].rstrip("}")
    return dict(re.findall(r'(\w+)="([^"]*)"', inner))


def drops(samples: dict[str, float]) -> dict[str, float]:
    """Drop counters by the packet core's names (decap_drop_short, ...), whichever label layout /metrics uses."""
    out = {}
    for key, value in samples.items():
        if key.startswith("flannel_drops_total{"):
            lab = labels(key)
            name = f"{lab['direction']}_drop_{lab['reason']}" if "direction" in lab else lab["reason"]
            out[name] = value
    return out


# -- logs -------------------------------------------------------------------------------------------

def log_events(cluster: Cluster, host: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (--log-format=json); gRPC's own stderr lines are skipped."""
    events = []
    for line in cluster.log_file(host).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def count_events(cluster: Cluster, host: str, event: str, after: int = 0, **fields: Any) -> int:
    return sum(1 for e in log_events(cluster, host)[after:]
               if str(e.get("event", "")).startswith(event) and all(e.get(k) == v for k, v in fields.items()))


def log_length(cluster: Cluster, host: str) -> int:
    return len(log_events(cluster, host))


# -- /proc ------------------------------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for PID {pid}")


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def etcd_connections(cluster: Cluster, host: str, pid: int) -> set[str]:
    """Addresses of the etcd members the daemon `pid` on `host` holds established TCP connections to."""
    out = cluster.run(cluster.host(host), ["ss", "-Htnp", "state", "established", "( dport = :2379 )"]).stdout
    peers = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            fields = line.split()
            address = fields[3].rsplit(":", 1)[0].strip("[]")  # Recv-Q Send-Q Local Peer Process
            peers.add(address.removeprefix("::ffff:"))
    return peers


# -- etcd -------------------------------------------------------------------------------------------

def etcd_leader(cluster: Cluster) -> str:
    """The name of the etcd member that leads (the member names are the host names)."""
    assert cluster.etcd is not None
    status = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json"))
    leader = status[0]["Status"]["leader"]
    members = json.loads(cluster.etcdctl("member", "list", "-w", "json"))["members"]
    return next(str(m["name"]) for m in members if m["ID"] == leader)


def member_at(cluster: Cluster, address: str) -> str:
    assert cluster.etcd is not None
    return next(m.name for m in cluster.etcd.members if m.ip == address)


# -- traffic ----------------------------------------------------------------------------------------

class GapPing:
    """ICMP echo from `src` to `dst` every `interval` s until stop(); stop() returns sent/received/lost and
    the longest gap in answers (see gap_probe.py)."""

    def __init__(self, cluster: Cluster, src: Container, dst: Container, interval: float = 0.02) -> None:
        self.src, self.dst = src, dst
        self._proc = cluster.popen(src, [sys.executable, str(GAP_PROBE), str(dst.address),
                                         "--interval", str(interval)])
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if "started" not in line:
            self._proc.kill()
            raise AssertionError(f"gap probe in {src.name} did not start: {self._proc.communicate(timeout=5)}")

    def stop(self) -> dict[str, Any]:
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            out, err = self._proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, err = self._proc.communicate(timeout=5)
        try:
            result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise AssertionError(f"gap probe {self.src.name} -> {self.dst.name} printed nothing: {err!r}") from None
        result["path"] = f"{self.src.name}->{self.dst.name}"
        return result
