"""Start real etcd servers (one member on loopback, or a cluster inside network namespaces).

Every process is started here and stopped by its PID; data directories live in the given workdir.
Election and heartbeat timeouts are low so a cluster forms, and fails over, within a second or two.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger()

ETCD_BINARY = "etcd"
ETCDCTL_BINARY = "etcdctl"


def etcd_available() -> bool:
    return shutil.which(ETCD_BINARY) is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range (32768-60999): a port the kernel handed out with
    bind(0) can be taken by any outgoing connection before etcd binds it ("address already in use")."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise EtcdError(f"no free TCP port found on {host} between 20000 and 32000")


@dataclass(frozen=True)
class EtcdTLS:
    """Serve clients over TLS and require a client certificate signed by ca_file."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path | None = None  # used by the health check
    client_key_file: Path | None = None


@dataclass(frozen=True)
class EtcdMemberSpec:
    name: str
    ip: str
    client_port: int = 2379
    peer_port: int = 2380
    netns: str | None = None  # run as `ip netns exec NETNS etcd ...`

    @property
    def client_url(self) -> str:
        return f"http://{self.ip}:{self.client_port}"

    @property
    def client_url_tls(self) -> str:
        return f"https://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"


class EtcdError(RuntimeError):
    pass


class EtcdCluster:
    """One or more etcd members. Use as a context manager, or call start()/stop()."""

    def __init__(self, workdir: Path, members: list[EtcdMemberSpec], *, heartbeat_ms: int = 100,
                 election_ms: int = 1000, token: str | None = None, tls: EtcdTLS | None = None,
                 extra_args: list[str] | None = None) -> None:
        if not members:
            raise ValueError("an etcd cluster needs at least one member")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"etcd member names must be unique: {names}")
        self.workdir = Path(workdir)
        self.members = list(members)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.tls = tls
        self.extra_args = list(extra_args or [])
        self.token = token or f"fp-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def local(cls, workdir: Path, name: str = "etcd0", **kwargs: Any) -> EtcdCluster:
        """One member on 127.0.0.1 with free client and peer ports."""
        client = free_port()
        peer = free_port()
        while peer == client:
            peer = free_port()
        return cls(workdir, [EtcdMemberSpec(name, "127.0.0.1", client, peer)], **kwargs)

    @property
    def endpoints(self) -> list[str]:
        return [self._client_url(m) for m in self.members]

    def _client_url(self, m: EtcdMemberSpec) -> str:
        return m.client_url_tls if self.tls else m.client_url

    def member(self, name: str) -> EtcdMemberSpec:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no etcd member named {name!r}; members: {[m.name for m in self.members]}")

    def pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def data_dir(self, name: str) -> Path:
        return self.workdir / f"{name}.etcd"

    def _command(self, m: EtcdMemberSpec) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [
            ETCD_BINARY,
            "--name", m.name,
            "--data-dir", str(self.data_dir(m.name)),
            "--listen-client-urls", self._client_url(m),
            "--advertise-client-urls", self._client_url(m),
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--log-level", "error",
            "--logger", "zap",
        ]
        if self.tls:
            cmd += ["--cert-file", str(self.tls.cert_file), "--key-file", str(self.tls.key_file),
                    "--trusted-ca-file", str(self.tls.ca_file), "--client-cert-auth"]
        cmd += self.extra_args
        if m.netns:
            cmd = ["ip", "netns", "exec", m.netns, *cmd]
        return cmd

    def _spawn(self, m: EtcdMemberSpec) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        logf = open(self.workdir / f"{m.name}.log", "ab")  # noqa: SIM115 - kept open by the child
        try:
            proc = subprocess.Popen(
                self._command(m), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the test runner does not hit etcd first
            )
        finally:
            logf.close()
        self._procs[m.name] = proc
        log.debug("etcd member started", member=m.name, pid=proc.pid, client=self._client_url(m))

    def start(self, timeout: float = 20.0) -> None:
        """Start every member and wait until each answers /health with "true"."""
        try:
            for m in self.members:
                if self.pid(m.name) is None:
                    self._spawn(m)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, timeout: float = 20.0, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = [self.member(n) for n in names] if names else list(self.members)
        while pending:
            for m in list(pending):
                proc = self._procs.get(m.name)
                if proc is None or proc.poll() is not None:
                    raise EtcdError(f"etcd member {m.name} exited; see {self.workdir / (m.name + '.log')}:\n"
                                    + self._log_tail(m.name))
                if self._healthy(m):
                    pending.remove(m)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd members {[m.name for m in pending]} not healthy after {timeout}s:\n"
                                + "\n".join(self._log_tail(m.name) for m in pending))
            time.sleep(0.1)

    def _log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _healthy(self, m: EtcdMemberSpec) -> bool:
        if m.netns:
            # The member's address is only reachable inside its namespace.
            r = subprocess.run(["ip", "netns", "exec", m.netns, ETCDCTL_BINARY,
                                "--endpoints", m.client_url, "--dial-timeout", "1s",
                                "--command-timeout", "1s", "endpoint", "health"],
                               capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, check=False)
            return r.returncode == 0
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            if self.tls.client_cert_file:
                context.load_cert_chain(str(self.tls.client_cert_file), str(self.tls.client_key_file))
        try:
            with urllib.request.urlopen(f"{self._client_url(m)}/health", timeout=1.0, context=context) as resp:
                return b'"true"' in resp.read()
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _signal(self, name: str, sig: int) -> None:
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            raise EtcdError(f"etcd member {name} is not running")
        # `ip netns exec` execs etcd in place, so the PID is etcd's own even inside a namespace.
        os.kill(proc.pid, sig)

    def kill_member(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send sig (SIGKILL by default) and wait for the member to exit."""
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused member cannot act on SIGTERM
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.debug("etcd member stopped", member=name, pid=proc.pid, signal=int(sig))

    def start_member(self, name: str, timeout: float = 20.0) -> None:
        """(Re)start a member with its existing data dir and wait until it is healthy."""
        m = self.member(name)
        if self.pid(name) is not None:
            return
        # With its data dir present etcd ignores the --initial-cluster* flags and rejoins.
        self._spawn(m)
        self.wait_healthy(timeout, [name])

    def pause_member(self, name: str) -> None:
        """SIGSTOP: the member keeps its sockets open but answers nothing (a frozen host)."""
        self._signal(name, signal.SIGSTOP)

    def resume_member(self, name: str) -> None:
        self._signal(name, signal.SIGCONT)

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL), by PID."""
        for name in list(self._procs):
            self.kill_member(name, signal.SIGTERM)
        self._procs.clear()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main() -> None:  # pragma: no cover - manual use: python -m flannelpy.lab.etcd DIR
    import sys

    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fp-etcd")
    with EtcdCluster.local(workdir) as cluster:
        print(" ".join(cluster.endpoints), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":  # pragma: no cover
    main()
