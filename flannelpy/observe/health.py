"""/healthz, /readyz and /metrics on --healthz-ip:--healthz-port (a tiny asyncio HTTP server).

flanneld's /healthz answers 200 whatever happens; here /healthz fails when the event loop is stuck and
/readyz fails until the lease is held, the backend is up, the subnet file is written and etcd answered
recently, so an orchestrator can act on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from flannelpy.errors import FlannelError
from flannelpy.observe.metrics import render_metrics

log = structlog.get_logger()

ETCD_STALE_AFTER = 60.0  # seconds without a successful etcd call before /readyz fails
LOOP_STALE_AFTER = 5.0  # a heartbeat older than this means the event loop is blocked
# A request is a line and a few headers: whoever sends more, or slower, is not a health probe. Without these a
# client sending a header every few seconds held a connection (an fd, 64 KiB of buffer) for as long as it liked.
REQUEST_TIMEOUT = 5.0  # seconds for the whole request, headers included, and the answer
REQUEST_MAX = 8192  # bytes of request line and headers
CONNECTIONS_MAX = 256  # open at once; more are closed at once


class HealthServer:
    def __init__(self, node: Any, registry: Any, host: str, port: int) -> None:
        self.node = node
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._beat = time.monotonic()
        self._ticker: asyncio.Task[None] | None = None
        self._open = 0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=REQUEST_MAX)
        except OSError as e:
            raise FlannelError(f"cannot serve health checks on {self.host}:{self.port}: {e.strerror or e}; "
                               "choose a free --healthz-port (0 turns the server off) or another "
                               "--healthz-ip") from None
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self._ticker = asyncio.ensure_future(self._tick())
        log.info("Health server listening", address=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _tick(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(1.0)

    def readiness(self) -> list[str]:
        """What keeps the node from being ready; empty when ready."""
        problems = []
        if self.node.lease is None:
            problems.append("no lease")
        if self.node.backend is None or self.node.lease is None:
            problems.append("backend not up")
        if not self.node.subnet_file_written:
            problems.append("subnet file not written")
        last = getattr(self.registry, "last_success", None)
        if last is None or time.time() - last > ETCD_STALE_AFTER:
            problems.append("etcd not reached recently")
        return problems

    def liveness(self) -> list[str]:
        lag = time.monotonic() - self._beat
        return [f"event loop stalled for {lag:.1f}s"] if lag > LOOP_STALE_AFTER else []

    def respond(self, path: str) -> tuple[int, str, str]:
        if path == "/healthz":
            bad = self.liveness()
            return (503, "\n".join(bad) + "\n", "text/plain") if bad else (200, "flanneld is running\n", "text/plain")
        if path == "/readyz":
            bad = self.readiness()
            return (503, "\n".join(bad) + "\n", "text/plain") if bad else (200, "ready\n", "text/plain")
        if path == "/metrics":
            body, ctype = render_metrics(self.node, self.registry)
            return 200, body, ctype
        return 404, "not found\n", "text/plain"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > CONNECTIONS_MAX:
                return
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readline()
                size = len(line)
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    size += len(header)
                    if size > REQUEST_MAX:
                        return
                parts = line.decode("latin-1").split()
                path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
                status, body, ctype = self.respond(path)
                data = body.encode()
                reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                    f"Connection: close\r\n\r\n".encode() + data
                )
                await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError, ValueError):
            pass  # slow, gone, or a line over the limit (readline's ValueError): not a request worth an answer
        except Exception as e:  # a bug of ours: one log line, not asyncio's multi-line traceback
            log.error("health request failed", error=repr(e))
        finally:
            self._open -= 1
            writer.close()
