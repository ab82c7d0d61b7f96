"""A ping that remembers which echo requests were answered, to measure traffic gaps; stdlib only.

    python gap_probe.py DST [--interval 0.02]      until SIGTERM; then one JSON line on stdout:
    {"dst":..., "sent":N, "received":M, "lost":K, "longest_gap_s":G, "gap_start":T0, "gap_end":T1}

longest_gap_s is the longest stretch of unanswered requests: from the first unanswered request after an
answered one to the next answered request (wall-clock times gap_start and gap_end, time.time()).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from types import FrameType

ICMP_ECHO, ICMP_ECHO_REPLY = 8, 0
WAIT_AFTER = 2.0  # seconds to wait for replies in flight after the last request


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo(ident: int, seq: int) -> bytes:
    payload = b"flannelpy-gap-probe".ljust(32, b".")
    header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, _checksum(header + payload), ident, seq) + payload


def summarise(sent_at: list[float], answered: set[int]) -> dict[str, float | int | None]:
    """Sequence numbers are 0-based indexes into sent_at."""
    longest, start, end = 0.0, None, None
    gap_from: int | None = None
    for seq, t in enumerate(sent_at):
        if seq in answered:
            if gap_from is not None:
                length = t - sent_at[gap_from]
                if length > longest:
                    longest, start, end = length, sent_at[gap_from], t
                gap_from = None
        elif gap_from is None:
            gap_from = seq
    if gap_from is not None:  # still unanswered at the end
        length = sent_at[-1] - sent_at[gap_from]
        if length >= longest:
            longest, start, end = length, sent_at[gap_from], None
    return {"sent": len(sent_at), "received": len(answered), "lost": len(sent_at) - len(answered),
            "longest_gap_s": round(longest, 4), "gap_start": start, "gap_end": end}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dst")
    p.add_argument("--interval", type=float, default=0.02)
    ns = p.parse_args(argv)
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    sent_at: list[float] = []
    answered: set[int] = set()
    next_send = time.monotonic()
    stopped_at: float | None = None
    print("started", flush=True)
    while True:
        now = time.monotonic()
        if stop and stopped_at is None:
            stopped_at = now
        if stopped_at is not None and (now - stopped_at >= WAIT_AFTER or len(answered) == len(sent_at)):
            break
        if stopped_at is None and now >= next_send:
            seq = len(sent_at)
            sent_at.append(time.time())
            try:
                sock.sendto(_echo(ident, seq & 0xFFFF), (ns.dst, 0))
            except OSError:
                pass  # counted as unanswered
            next_send = now + ns.interval
        timeout = max(0.0, next_send - time.monotonic()) if stopped_at is None else 0.05
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        if not ready:
            continue
        data, _ = sock.recvfrom(2048)
        ihl = (data[0] & 0x0F) * 4
        if len(data) < ihl + 8:
            continue
        kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if kind != ICMP_ECHO_REPLY or rid != ident:
            continue
        # The 16-bit sequence wraps after 65536 requests: map it to the newest matching index.
        base = (len(sent_at) - 1) - ((len(sent_at) - 1 - rseq) % 65536)
        if 0 <= base < len(sent_at):
            answered.add(base)
    print(json.dumps({"dst": ns.dst, **summarise(sent_at, answered)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
