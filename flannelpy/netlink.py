"""Runs pyroute2's asyncio API on a stock asyncio loop in its own thread.

The control plane runs on uvloop, and uvloop cannot open netlink datagram endpoints (pyroute2 issue #1335,
uvloop issue #676: "cannot open a UDP handle, invalid family 16"). Rather than give up either, every
coroutine that talks netlink is handed to one dedicated thread whose loop is asyncio's own; callers await
the result from whatever loop they run on. Objects pyroute2 creates (AsyncIPRoute) must be created and used
only inside coroutines passed to `run_netlink`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def netlink_loop() -> asyncio.AbstractEventLoop:
    """The process's netlink loop, started on first use (a daemon thread: it never blocks exit)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.SelectorEventLoop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=serve, name="netlink", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


async def run_netlink(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that uses pyroute2's asyncio API on the netlink loop and await its result."""
    loop = netlink_loop()
    try:
        current = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if current is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def run_netlink_sync(coro: Coroutine[Any, Any, T]) -> T:
    """The same from synchronous code (tests, command-line verbs)."""
    return asyncio.run_coroutine_threadsafe(coro, netlink_loop()).result()
