"""The daemon as an operator runs it: signals, exit codes, restarts, health, logs and the operator verbs.

Two hosts in namespaces with the `alloc` backend (lease only), so these tests are about the control plane.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flannelpy.lab.cluster import Cluster, SubnetEnv

HEALTHZ_PORT = 8471


@pytest.fixture(scope="module")
def alloc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(hosts=2, containers_per_host=0, backend="alloc", etcd_prefix="/coreos.com/network",
                 network="10.5.0.0/16", workdir=tmp_path_factory.mktemp("alloc"),
                 daemon_args=[f"--healthz-port={HEALTHZ_PORT}", "--log-format=json"]) as c:
        yield c


def _subnet(c: Cluster, host: str) -> IPv4Network:
    return SubnetEnv.read(c.subnet_file(host)).subnet.network


def _wait_exit(c: Cluster, host: str, timeout: float = 30.0) -> int:
    proc = c.daemons[host]
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flannelpy on {host} did not exit; log:\n{c.log_tail(host)}")


def _http(c: Cluster, host: str, path: str) -> tuple[int, str]:
    code = (
        "import sys, urllib.request, urllib.error\n"
        f"try:\n r = urllib.request.urlopen('http://127.0.0.1:{HEALTHZ_PORT}{path}', timeout=5)\n"
        " print(r.status); print(r.read().decode(), end='')\n"
        "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode(), end='')\n"
    )
    out = c.run(c.host(host), [sys.executable, "-c", code]).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def _restart(c: Cluster, host: str) -> None:
    c.subnet_file(host).unlink(missing_ok=True)
    c.start_daemon(host)
    c.wait_subnet_env(host)


def test_hosts_hold_distinct_leases_that_match_their_subnet_files(alloc: Cluster) -> None:
    subnets = {h: _subnet(alloc, h) for h in alloc.topology.hosts}
    assert len(set(subnets.values())) == len(subnets)
    leases = alloc.leases()
    for host, subnet in subnets.items():
        assert subnet in leases
        assert leases[subnet]["PublicIP"] == str(alloc.host(host).address)
        assert leases[subnet]["BackendType"] == "alloc"
        assert "PublicIPv6" in leases[subnet]


def test_health_readiness_and_metrics_answer(alloc: Cluster) -> None:
    host = next(iter(alloc.topology.hosts))
    assert _http(alloc, host, "/healthz") == (200, "flanneld is running\n")
    assert _http(alloc, host, "/readyz")[0] == 200
    status, metrics = _http(alloc, host, "/metrics")
    assert status == 200
    assert f'flannel_backend_info{{subnet="{_subnet(alloc, host)}",type="alloc"' in metrics
    assert "flannel_routes 1.0" in metrics  # the other host


def test_logs_are_one_json_object_per_line_with_the_startup_lines(alloc: Cluster) -> None:
    host = next(iter(alloc.topology.hosts))
    lines = [line for line in alloc.log_file(host).read_text().splitlines() if line.strip()]
    # Nothing else on stdout/stderr either (gRPC's C core once added its own lines at every iptables call).
    assert all(line.startswith("{") for line in lines), [line for line in lines if not line.startswith("{")][:5]
    events = [json.loads(line)["event"] for line in lines]
    assert any(e.startswith("Using interface with name") for e in events)
    assert any(e.startswith("Wrote subnet file") for e in events)


def test_leases_verb_lists_every_lease(alloc: Cluster) -> None:
    host = alloc.host(next(iter(alloc.topology.hosts)))
    out = alloc.run(host, [sys.executable, "-m", "flannelpy", "leases", "--json",
                           f"--etcd-endpoints={','.join(alloc.endpoints)}"]).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["subnet"] for r in rows} == {str(_subnet(alloc, h)) for h in alloc.topology.hosts}
    assert all(r["backend"] == "alloc" and r["ttl"].endswith("s") for r in rows)


def test_sigterm_exits_zero_keeps_the_lease_and_a_restart_gets_it_back(alloc: Cluster) -> None:
    host = list(alloc.topology.hosts)[-1]
    before = _subnet(alloc, host)
    assert alloc.stop_daemon(host) == 0
    assert before in alloc.leases()
    _restart(alloc, host)
    assert _subnet(alloc, host) == before
    assert "Found lease" in alloc.log_file(host).read_text() or "reusing" in alloc.log_file(host).read_text()


def test_restart_after_the_lease_key_was_deleted_takes_the_subnet_file_subnet(alloc: Cluster) -> None:
    host = list(alloc.topology.hosts)[-1]
    before = _subnet(alloc, host)
    assert alloc.stop_daemon(host) == 0
    alloc.delete_lease(before)
    alloc.start_daemon(host)  # the old subnet file is still there: it names the subnet to ask for
    deadline = time.monotonic() + 30
    while before not in alloc.leases():
        assert time.monotonic() < deadline, alloc.log_tail(host)
        time.sleep(0.2)
    assert alloc.leases()[before]["PublicIP"] == str(alloc.host(host).address)


def test_a_deleted_lease_shuts_its_daemon_down_with_exit_code_4(alloc: Cluster) -> None:
    host = list(alloc.topology.hosts)[-1]
    alloc.wait_subnet_env(host)
    time.sleep(1.0)  # the daemon is past start-up and watching
    alloc.delete_lease(_subnet(alloc, host))
    assert _wait_exit(alloc, host) == 4
    assert "Lease has been revoked" in alloc.log_file(host).read_text()
    alloc.daemons.pop(host)
    _restart(alloc, host)


def _run_daemon_briefly(c: Cluster, host: str, prefix: str, seconds: float) -> tuple[int, str]:
    argv = c.host(host).exec_argv([
        sys.executable, "-m", "flannelpy", f"--etcd-endpoints={','.join(c.endpoints)}",
        f"--etcd-prefix={prefix}", f"--iface={c.host(host).iface}",
        f"--subnet-file={c.host_dir(host) / 'other.env'}",
    ])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(Path(__file__).resolve().parents[2]))
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    return proc.returncode, out


def test_missing_config_says_how_to_write_it_with_the_v3_api(alloc: Cluster) -> None:
    host = next(iter(alloc.topology.hosts))
    code, out = _run_daemon_briefly(alloc, host, "/nothing/here", 4.0)
    assert code == 0  # SIGTERM while waiting for the config is a clean exit
    assert "flannel config not found in etcd store" in out
    assert "etcdctl put /nothing/here/config" in out and "flannelpy config set" in out
    # With the etcd this daemon uses, so that both commands work as printed.
    endpoints = ",".join(alloc.endpoints)
    assert f"--endpoints={endpoints}" in out and f"--etcd-endpoints={endpoints}" in out


def test_invalid_config_exits_2_naming_the_key(alloc: Cluster) -> None:
    host = next(iter(alloc.topology.hosts))
    alloc.etcdctl("put", "/bad/network/config", '{"Network":"10.5.0.0/16","SubnetLen":31}')
    code, out = _run_daemon_briefly(alloc, host, "/bad/network", 20.0)
    assert code == 2, out
    assert "SubnetLen=31" in out


def test_systemd_is_told_ready_only_after_the_subnet_file_is_written(alloc: Cluster, tmp_path: Path) -> None:
    import socket

    host = next(iter(alloc.topology.hosts))
    alloc.etcdctl("put", "/notify/network/config", '{"Network":"10.6.0.0/16","Backend":{"Type":"alloc"}}')
    sock_path = tmp_path / "notify.sock"
    subnet_file = alloc.host_dir(host) / "notify.env"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        argv = alloc.host(host).exec_argv([
            sys.executable, "-m", "flannelpy", f"--etcd-endpoints={','.join(alloc.endpoints)}",
            "--etcd-prefix=/notify/network", f"--iface={alloc.host(host).iface}", f"--subnet-file={subnet_file}",
        ])
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": str(sock_path),
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            message = sock.recv(1024)
            assert message == b"READY=1"
            assert subnet_file.exists()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert sock.recv(1024) == b"STOPPING=1"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_log_stream_that_breaks_does_not_stop_the_daemon(alloc: Cluster) -> None:
    """stderr is a pipe whose reader goes away (journald restarted, `flannelpy ... | head`): the daemon keeps
    carrying leases, as flanneld does; the lines that cannot be written are lost, nothing else."""
    host = next(iter(alloc.topology.hosts))
    alloc.etcdctl("put", "/brokenlog/network/config", '{"Network":"10.7.0.0/16","Backend":{"Type":"alloc"}}')
    port = HEALTHZ_PORT + 1
    argv = alloc.host(host).exec_argv([
        sys.executable, "-m", "flannelpy", f"--etcd-endpoints={','.join(alloc.endpoints)}",
        "--etcd-prefix=/brokenlog/network", f"--iface={alloc.host(host).iface}",
        f"--subnet-file={alloc.host_dir(host) / 'brokenlog.env'}", f"--healthz-port={port}",
    ])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[2]))
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Wrote subnet file" in line:
                break
        proc.stderr.close()  # the reader is gone: every later write fails with EPIPE
        peer = IPv4Network("10.7.99.0/24")
        alloc.etcdctl("put", f"/brokenlog/network/subnets/{peer.network_address}-24",
                      '{"PublicIP":"10.99.9.9","PublicIPv6":null,"BackendType":"alloc"}')  # logged as a new route

        def metric(name: str) -> float | None:
            code = (f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', "
                    "timeout=5).read().decode())")
            out = alloc.run(alloc.host(host), [sys.executable, "-c", code], check=False).stdout
            return next((float(line.split()[1]) for line in out.splitlines() if line.startswith(name + " ")), None)

        deadline = time.monotonic() + 20
        while metric("flannel_routes") != 1:
            assert proc.poll() is None, f"the daemon exited with {proc.returncode} when its log broke"
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert (metric("flannel_log_lines_lost_total") or 0) >= 1  # what tells the operator
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_start_up_exits_0_every_time(alloc: Cluster) -> None:
    """SIGTERM just as the lease watch is being set up (gRPC then lost the cancellation: the daemon hung in 1 of
    3-4 tries, devices and rules left, further SIGTERMs ignored)."""
    host = list(alloc.topology.hosts)[-1]
    assert alloc.stop_daemon(host) == 0
    try:
        for _ in range(4):
            mark = len(alloc.log_file(host).read_text().splitlines())
            proc = alloc.start_daemon(host)
            alloc.daemons.pop(host)
            deadline = time.monotonic() + 30
            while not any("Installed ip-masq and forward rules" in line
                          for line in alloc.log_file(host).read_text().splitlines()[mark:]):
                assert proc.poll() is None and time.monotonic() < deadline, alloc.log_tail(host)
                time.sleep(0.002)
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(30) == 0, alloc.log_tail(host)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        _restart(alloc, host)


def test_an_unwritable_subnet_file_is_one_error_line_and_exit_1(alloc: Cluster, tmp_path: Path) -> None:
    host = next(iter(alloc.topology.hosts))
    alloc.etcdctl("put", "/nofile/network/config", '{"Network":"10.8.0.0/16","Backend":{"Type":"alloc"}}')
    where = alloc.host_dir(host) / "a-directory"  # --subnet-file naming a directory: the write fails
    where.mkdir(exist_ok=True)
    argv = alloc.host(host).exec_argv([
        sys.executable, "-m", "flannelpy", f"--etcd-endpoints={','.join(alloc.endpoints)}",
        "--etcd-prefix=/nofile/network", f"--iface={alloc.host(host).iface}", f"--subnet-file={where}",
        "--log-format=json",
    ])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert all(line.startswith("{") for line in lines), lines[-5:]  # no traceback
    errors = [json.loads(line) for line in lines if json.loads(line)["level"] == "error"]
    assert len(errors) == 1 and f"cannot write the subnet file {where}" in errors[0]["event"], errors
