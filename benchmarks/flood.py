"""UDP packet rate with a batched generator and sink: `python -m benchmarks.flood sink|send ...`.

The harness runs `sink` in the server container and `send` in the client container; each prints one JSON
line. The hot loops (sendmmsg/recvmmsg, 64 datagrams per call, no GIL) are benchmarks/udpflood.pyx,
compiled on first use into a cache keyed by the source (benchmarks/pyxcache.py), so the processes started
in the namespaces load the build the harness made.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
from types import ModuleType

from benchmarks import pyxcache

BATCH = 64
PORT = 5301
RCVBUF = 8 << 20  # room for bursts, so the sink's own socket is rarely where packets drop


def load() -> ModuleType:
    """benchmarks/udpflood.pyx, compiled on first use (cached, see benchmarks/pyxcache.py)."""
    return pyxcache.load("udpflood", depends=[pyxcache.HERE.parent / "fastpath" / "sockets.pxd"])


def _sink(args: argparse.Namespace) -> dict[str, object]:
    mod = load()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root): past net.core.rmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    # A receive timeout lets the loop check its deadlines while nothing arrives.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))
    sock.bind(("0.0.0.0", args.port))
    print("ready", flush=True)
    packets, nbytes, span, _, fatal = mod.sink_loop(sock.fileno(), 65535, args.seconds, args.idle,
                                                    args.wait_first, BATCH)
    sock.close()
    return {"packets": packets, "bytes": nbytes, "span_s": span,
            "error": os.strerror(fatal) if fatal else None}


def _send(args: argparse.Namespace) -> dict[str, object]:
    mod = load()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((args.to, args.port))
    sent, seconds, errors, fatal = mod.send_loop(sock.fileno(), args.size, args.seconds, BATCH)
    sock.close()
    return {"sent": sent, "seconds": seconds, "size": args.size,
            "send_errors": {os.strerror(e): n for e, n in errors.items()},
            "error": os.strerror(fatal) if fatal else None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flood",
                                description="batched UDP generator (send) and counting sink (sink)")
    sub = p.add_subparsers(dest="role", required=True)
    sink = sub.add_parser("sink", help="count datagrams arriving on --port")
    sink.add_argument("--port", type=int, default=PORT)
    sink.add_argument("--seconds", type=float, required=True, help="counting window from the first datagram")
    sink.add_argument("--idle", type=float, default=0.3, help="after the window: stop once quiet this long")
    sink.add_argument("--wait-first", type=float, default=10.0, help="give up if nothing arrives this long")
    send = sub.add_parser("send", help="flood --to:--port with --size-byte datagrams for --seconds")
    send.add_argument("--to", required=True)
    send.add_argument("--port", type=int, default=PORT)
    send.add_argument("--size", type=int, required=True, help="UDP payload bytes")
    send.add_argument("--seconds", type=float, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = _sink(args) if args.role == "sink" else _send(args)
    except OSError as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
