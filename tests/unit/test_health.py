"""/healthz and /readyz fail when they should (flanneld's /healthz answers 200 whatever happens)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from flannelpy.errors import FlannelError
from flannelpy.observe.health import ETCD_STALE_AFTER, LOOP_STALE_AFTER, HealthServer
from flannelpy.routes import RouteTable


def _server(**node: Any) -> tuple[HealthServer, SimpleNamespace]:
    state = {"lease": object(), "backend": object(), "subnet_file_written": True, "routes": RouteTable(),
             "config": None, "last_event_at": None, **node}
    fake_node = SimpleNamespace(counters=dict, **state)
    registry = SimpleNamespace(last_success=time.time(), reconnects=0)
    return HealthServer(fake_node, registry, "127.0.0.1", 0), registry


def test_ready_node_answers_200() -> None:
    server, _ = _server()
    assert server.respond("/readyz")[0] == 200
    assert server.respond("/healthz") == (200, "flanneld is running\n", "text/plain")


@pytest.mark.parametrize(("node", "problem"), [
    ({"lease": None}, "no lease"),
    ({"backend": None}, "backend not up"),
    ({"subnet_file_written": False}, "subnet file not written"),
])
def test_readyz_names_what_is_missing(node: dict[str, Any], problem: str) -> None:
    server, _ = _server(**node)
    status, body, _ = server.respond("/readyz")
    assert status == 503
    assert problem in body


def test_readyz_fails_when_etcd_has_not_answered_recently() -> None:
    server, registry = _server()
    registry.last_success = time.time() - ETCD_STALE_AFTER - 1
    status, body, _ = server.respond("/readyz")
    assert (status, body) == (503, "etcd not reached recently\n")


def test_healthz_fails_when_the_event_loop_is_stuck() -> None:
    server, _ = _server()
    server._beat = time.monotonic() - LOOP_STALE_AFTER - 1  # the ticker has not run for that long
    status, body, _ = server.respond("/healthz")
    assert status == 503 and "event loop stalled" in body


async def test_served_over_http_with_status_codes() -> None:
    server, _ = _server(lease=None)
    await server.start()
    try:
        async def get(path: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return data

        assert (await get("/healthz")).startswith(b"HTTP/1.1 200 OK")
        assert (await get("/readyz")).startswith(b"HTTP/1.1 503 Service Unavailable")
        assert (await get("/nope")).startswith(b"HTTP/1.1 404")
        metrics = await get("/metrics")
        assert metrics.startswith(b"HTTP/1.1 200") and b"flannel_routes 0.0" in metrics
    finally:
        await server.stop()


async def test_a_port_in_use_is_a_clear_error_naming_the_flag() -> None:
    first, _ = _server()
    await first.start()
    try:
        second = HealthServer(SimpleNamespace(), SimpleNamespace(), "127.0.0.1", first.port)
        with pytest.raises(FlannelError, match=rf"127\.0\.0\.1:{first.port}: .*--healthz-port"):
            await second.start()
    finally:
        await first.stop()


async def test_an_oversized_request_line_is_dropped_quietly_and_the_server_goes_on() -> None:
    server, _ = _server()
    unhandled: list[dict[str, Any]] = []  # what asyncio would print as a multi-line traceback
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
        await writer.drain()
        try:  # closed, no answer, nothing raised in the server (a reset if it closed with our bytes unread)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        assert unhandled == []
    finally:
        await server.stop()


async def test_a_slow_or_endless_request_is_cut_and_extra_connections_are_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A client sending a header every so often held its connection (an fd, a buffer) for as long as it liked;
    # hundreds of them ran the daemon out of fds (its /healthz and iptables checks failed).
    import flannelpy.observe.health as health

    async def cut(reader: asyncio.StreamReader) -> bool:
        """Closed without an answer: EOF, or a reset when the server closed with our bytes unread."""
        try:
            return await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            return True

    monkeypatch.setattr(health, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(health, "CONNECTIONS_MAX", 3)
    server, _ = _server()
    await server.start()
    try:
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", server.port)
        slow_w.write(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(20):  # a header every 0.1 s: each line is quick, the request never ends
            slow_w.write(b"X-a: b\r\n")
            await slow_w.drain()
            await asyncio.sleep(0.1)
            if slow_r.at_eof():
                break
        assert await cut(slow_r)  # cut before the request was complete
        slow_w.close()

        long_r, long_w = await asyncio.open_connection("127.0.0.1", server.port)
        long_w.write(b"GET /healthz HTTP/1.1\r\n" + (b"X-a: " + b"b" * 50 + b"\r\n") * 200)
        await long_w.drain()
        assert await cut(long_r)  # 11 KB of headers: not a probe
        long_w.close()

        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        extra_r, extra_w = await asyncio.open_connection("127.0.0.1", server.port)
        assert await cut(extra_r)  # over the cap: closed at once
        extra_w.close()
        for _, w in held:
            w.close()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 OK")
        writer.close()
    finally:
        await server.stop()
