"""Traffic probes run inside a lab container (`ip netns exec <ns> python probe.py ...`); stdlib only.

Each verb prints one JSON object on stdout:
  ping DST              ICMP echo over a raw socket: sent, received, rtt_ms, unreachable (ICMP errors)
  tcp-recv PORT         accept one connection, read to EOF: bytes, sha256
  tcp-send DST PORT N   send N random bytes: bytes, sha256
  udp-unreach DST PORT  connected UDP socket with IP_RECVERR: the errno the kernel reports, if any

The image has no ping(8); a raw socket also lets us see ICMP errors for ICMP packets precisely.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from types import FrameType

ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO = 0, 3, 8
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, _checksum(header + payload), ident, seq) + payload


class _Stop:
    requested = False

    def set(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def ping(dst: str, count: int, interval: float, wait: float) -> dict[str, object]:
    """count=0: until SIGTERM/SIGINT. Replies still in flight get `wait` seconds after the last send."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    payload = b"flannelpy-lab-ping".ljust(56, b".")
    sent: dict[int, float] = {}
    rtts: list[float] = []
    unreachable: dict[str, int] = {}
    seq = 0
    next_send = time.monotonic()
    last_send = 0.0
    while True:
        now = time.monotonic()
        sending = not stop.requested and (count == 0 or seq < count)
        if sending and now >= next_send:
            seq += 1
            sent[seq] = now
            try:
                sock.sendto(_echo(ident, seq & 0xFFFF, payload), (dst, 0))
            except OSError as e:  # e.g. ENETUNREACH: no route at all in this namespace
                name = errno.errorcode.get(e.errno or 0, str(e.errno))
                unreachable[name] = unreachable.get(name, 0) + 1
            last_send = now
            next_send = now + interval
        if not sending and (len(rtts) == seq or now - last_send >= wait):
            break
        timeout = max(0.0, (next_send if sending else last_send + wait) - now)
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            continue
        try:
            packet = sock.recv(65535)
        except InterruptedError:
            continue
        ihl = (packet[0] & 0x0F) * 4
        icmp_type, code = packet[ihl], packet[ihl + 1]
        if icmp_type == ICMP_ECHO_REPLY:
            rid, rseq = struct.unpack("!HH", packet[ihl + 4 : ihl + 8])
            if rid == ident and rseq in sent:
                rtts.append((time.monotonic() - sent.pop(rseq)) * 1000)
        elif icmp_type == ICMP_DEST_UNREACH:
            # The quoted packet: inner IP header + the first 8 bytes of our echo request.
            inner = packet[ihl + 8 :]
            inner_ihl = (inner[0] & 0x0F) * 4
            if len(inner) >= inner_ihl + 8 and inner[inner_ihl] == ICMP_ECHO:
                rid = struct.unpack("!H", inner[inner_ihl + 4 : inner_ihl + 6])[0]
                if rid == ident:
                    name = {0: "net", 1: "host", 3: "port"}.get(code, f"code{code}")
                    unreachable[name] = unreachable.get(name, 0) + 1
    return {
        "dst": dst,
        "sent": seq,
        "received": len(rtts),
        "rtt_ms": round(sum(rtts) / len(rtts), 3) if rtts else None,
        "unreachable": unreachable,
    }


def tcp_recv(port: int, bind: str) -> dict[str, object]:
    srv = socket.create_server((bind, port), reuse_port=False)
    print(json.dumps({"listening": port}), flush=True)  # the caller waits for this line
    conn, peer = srv.accept()
    digest = hashlib.sha256()
    total = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        digest.update(view[:n])
        total += n
    conn.close()
    return {"bytes": total, "sha256": digest.hexdigest(), "peer": peer[0]}


def tcp_send(dst: str, port: int, size: int, connect_timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((dst, port), timeout=connect_timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.settimeout(None)
    digest = hashlib.sha256()
    started = time.monotonic()
    left = size
    while left:
        chunk = os.urandom(min(left, 1 << 20))
        digest.update(chunk)
        sock.sendall(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the receiver to close: all bytes were read
    sock.close()
    return {"bytes": size, "sha256": digest.hexdigest(), "seconds": round(time.monotonic() - started, 3)}


def udp_unreach(dst: str, port: int, timeout: float) -> dict[str, object]:
    """What a container's connected UDP socket learns when its destination has no route."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Without IP_RECVERR Linux reports only "hard" ICMP errors to UDP sockets; net unreachable is soft.
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    sock.connect((dst, port))
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    sent = 0
    while time.monotonic() < deadline:
        try:
            sock.send(b"flannelpy-lab-probe")
            sent += 1
            sock.recv(2048)
        except TimeoutError:
            continue
        except OSError as e:
            return {"dst": dst, "sent": sent, "error": errno.errorcode.get(e.errno or 0, str(e.errno))}
    return {"dst": dst, "sent": sent, "error": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("ping")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=3, help="0 = until SIGTERM")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--wait", type=float, default=2.0)
    p = sub.add_parser("tcp-recv")
    p.add_argument("port", type=int)
    p.add_argument("--bind", default="0.0.0.0")
    p = sub.add_parser("tcp-send")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("size", type=int)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p = sub.add_parser("udp-unreach")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.verb == "ping":
        result = ping(args.dst, args.count, args.interval, args.wait)
    elif args.verb == "tcp-recv":
        result = tcp_recv(args.port, args.bind)
    elif args.verb == "tcp-send":
        result = tcp_send(args.dst, args.port, args.size, args.connect_timeout)
    else:
        result = udp_unreach(args.dst, args.port, args.timeout)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
