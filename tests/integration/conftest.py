"""Fixtures for tests against a real etcd server on loopback (skipped when the etcd binary is missing).

`etcd`: one member shared by a module (tests use unique key prefixes); `private_etcd`: a member of the
test's own, for tests that stop, freeze or reconfigure it. `TcpProxy` sits between a client and etcd so
a test can cut the client off while etcd keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flannelpy.lab.etcd import EtcdCluster, etcd_available
from flannelpy.subnet.registry import EtcdRegistry
from tests.conftest import unique_prefix

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.etcd)
            if not etcd_available():
                item.add_marker(pytest.mark.skip(reason="needs the etcd binary (Debian package etcd-server)"))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster.local(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster.local(tmp_path / "etcd") as cluster:
        yield cluster


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, shaped like flannel's."""
    return f"/{unique_prefix('fptest')}/network"


@pytest.fixture
async def registry(etcd: EtcdCluster) -> AsyncIterator[EtcdRegistry]:
    reg = EtcdRegistry(etcd.endpoints)
    try:
        yield reg
    finally:
        await reg.close()


def etcdctl(cluster: EtcdCluster, *args: str, input: bytes | None = None) -> str:
    proc = subprocess.run(["etcdctl", "--endpoints", ",".join(cluster.endpoints), *args], input=input,
                          capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"etcdctl {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode()


class TcpProxy:
    """A loopback TCP proxy that can cut every connection and refuse new ones, then let them in again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    async def stop(self) -> None:
        """Close the listener and cut every connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
