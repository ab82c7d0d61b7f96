"""Fuzz target for the udp decap path (datagram from the network -> TUN), shared by the hypothesis test,
the atheris run and the AddressSanitizer run; stdlib plus this project.

Every input goes through both implementations (fastpath.core and flannelpy.packet) and must:
- get DROP with a decap drop counter, or DELIVER with a length inside the buffer, the same in both;
- move exactly one counter by one (decap_packets or one decap drop reason): every drop is counted;
- be delivered only if its inner source lies in a subnet leased to the datagram's sender, with TTL - 1
  and the header checksum still valid if it was; both implementations leave the same bytes.

    python decap_fuzz.py --random N [--seed S]     N random and mutated datagrams (no atheris needed)
    python decap_fuzz.py --atheris [libFuzzer flags, e.g. -max_total_time=20]
    python decap_fuzz.py --io N                    N random datagrams through fastpath.io's decap loop
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import time
from ipaddress import IPv4Address
from typing import Any

NET = int(IPv4Address("10.10.0.0"))
SUBNET_B = int(IPv4Address("10.10.2.0"))
SUBNET_C = int(IPv4Address("10.10.3.0"))
PEER_B = int(IPv4Address("192.168.0.2"))
PEER_C = int(IPv4Address("192.168.0.3"))
STRANGER = int(IPv4Address("192.168.0.66"))
SENDERS = (PEER_B, PEER_C, STRANGER, 0, 0xFFFFFFFF)
MTU = 1472


def checksum(data: bytes | bytearray) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: int, dst: int, payload: bytes, ttl: int = 64, proto: int = 17, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 0x1234, 0, ttl, proto, 0,
                                src.to_bytes(4, "big"), dst.to_bytes(4, "big")) + options)
    hdr[10:12] = checksum(hdr).to_bytes(2, "big")
    return bytes(hdr) + payload


def seeds() -> list[bytes]:
    """Valid datagrams: the mutations start from these, so the fuzzer gets past the header checks."""
    return [
        ipv4(SUBNET_B + 5, NET + 0x0105, b"x" * 20),
        ipv4(SUBNET_C + 9, NET + 0x0102, b"", ttl=2, proto=1),
        ipv4(SUBNET_B + 1, NET + 0x0101, b"y" * 1000, options=b"\x01" * 8),
        ipv4(SUBNET_B + 1, NET + 0x0101, b"z" * (MTU - 20)),
        ipv4(NET + 0x0901, NET + 0x0101, b"spoofed"),
    ]


class Target:
    """Both packet cores with the same route table: 10.10.2.0/24 -> PEER_B, 10.10.3.0/24 -> PEER_C."""

    def __init__(self) -> None:
        import fastpath.core as compiled
        import flannelpy.packet as reference

        self.impls: list[tuple[str, Any, Any]] = []
        for name, mod in (("compiled", compiled), ("python", reference)):
            table = mod.RouteTable(NET, 16, 24)
            table.set(SUBNET_B, PEER_B)
            table.set(SUBNET_C, PEER_C)
            self.impls.append((name, mod, mod.PacketCore(table, MTU)))
        self.deliver = reference.DELIVER
        self.drop = reference.DROP
        self.names = reference.COUNTERS

    def check(self, data: bytes, sender: int, length: int | None = None) -> None:
        outcomes = []
        for name, _mod, core in self.impls:
            buf = bytearray(data)
            before = core.counters()
            verdict, value = core.decap(buf, sender, length) if length is not None else core.decap(buf, sender)
            after = core.counters()
            moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
            n = len(data) if length is None else length
            if verdict == self.deliver:
                assert 20 <= value <= n <= len(buf), (name, value, n)
                assert moved == {"decap_packets": 1, "decap_bytes": value}, (name, moved)
                src = int.from_bytes(data[12:16], "big")
                assert core.table.lookup(src) == sender != 0, f"{name} delivered a spoofed source"
                ihl = (buf[0] & 0x0F) * 4
                assert buf[8] == data[8] - 1, name
                # The checksum is patched, not verified (the kernel checks it when the TUN hands it over).
                assert (checksum(buf[:ihl]) == 0) == (checksum(data[:ihl]) == 0), name
                assert buf[:8] == data[:8] and buf[12:value] == data[12:value], name
            else:
                assert verdict == self.drop, (name, verdict)
                reason = self.names[value]
                assert reason.startswith("decap_drop_"), (name, reason)
                assert moved == {reason: 1}, f"{name}: drop {reason} counted as {moved}"
                assert buf == bytearray(data), f"{name} changed a dropped datagram"
            outcomes.append((verdict, value, bytes(buf)))
        assert outcomes[0] == outcomes[1], f"implementations disagree on {data.hex()} from {sender:#x}: {outcomes}"


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            buf = buf[: rng.randint(0, len(buf))]
        elif op == 3:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif len(buf) >= 20:  # a plausible header with a random field
            field = rng.choice([(0, 1), (2, 2), (8, 1), (12, 4)])
            buf[field[0]:field[0] + field[1]] = rng.randbytes(field[1])
    return bytes(buf)


def random_datagram(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return rng.randbytes(rng.choice([0, 1, 19, 20, 21, rng.randint(0, MTU + 200)]))
    return mutate(rng, rng.choice(seeds()))


def run_random(count: int, seed: int) -> None:
    rng = random.Random(seed)
    target = Target()
    for _ in range(count):
        data = random_datagram(rng)
        length = None if rng.random() < 0.8 else rng.randint(0, len(data))
        target.check(data, rng.choice(SENDERS), length)


def run_atheris(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        import flannelpy.packet  # noqa: F401
    target = Target()

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        sender = SENDERS[fdp.ConsumeIntInRange(0, len(SENDERS) - 1)]
        seed = fdp.ConsumeIntInRange(0, len(seeds()))
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        if seed < len(seeds()):  # splice fuzz bytes into a valid datagram so the deep checks are reached
            base = seeds()[seed]
            cut = len(body) % (len(base) + 1)
            body = base[:cut] + body[: len(base) - cut] + base[cut + len(body[: len(base) - cut]):]
        target.check(body, sender)

    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()


def run_io(count: int, seed: int) -> None:
    """Random datagrams into fastpath.io's decap loop (recvmmsg, MSG_TRUNC, TUN writes) via a FakeNode."""
    from flannelpy.backend.udp.fake import FakeNode, free_port

    rng = random.Random(seed)
    port = free_port("127.0.0.2")
    from ipaddress import IPv4Network

    node = FakeNode("compiled", IPv4Network("10.10.0.0/16"), 24, IPv4Network("10.10.1.0/24"), "127.0.0.2", port)
    node.table.set(SUBNET_B, int(IPv4Address("127.0.0.1")))
    sent = 0

    def seen() -> int:
        c = node.core.counters()
        return int(c["decap_packets"] + sum(v for k, v in c.items() if k.startswith("decap_drop_")))

    def catch_up(timeout: float) -> None:
        # Flow control: a slow loop (AddressSanitizer, a loaded machine) must not make the kernel drop
        # datagrams in the socket buffer, where no counter of ours could see them.
        deadline = time.monotonic() + timeout
        while seen() != sent and time.monotonic() < deadline:
            while node.tun.receive(timeout=0.01) is not None:
                pass

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            for i in range(count):
                data = random_datagram(rng)
                if rng.random() < 0.5 and len(data) >= 20:  # inner source in the sender's subnet
                    data = data[:12] + (SUBNET_B + 7).to_bytes(4, "big") + data[16:]
                s.sendto(data[:65000], ("127.0.0.2", port))
                sent += 1
                if i % 32 == 31:
                    catch_up(10)
        catch_up(10)
        assert seen() == sent, f"{sent} datagrams sent, {seen()} accounted for: {node.core.counters()}"
        assert not node.errors, node.errors
    finally:
        node.stop()


def main(argv: list[str]) -> int:
    seed = 1
    if "--seed" in argv:
        seed = int(argv[argv.index("--seed") + 1])
    if argv and argv[0] == "--random":
        run_random(int(argv[1]), seed)
    elif argv and argv[0] == "--io":
        run_io(int(argv[1]), seed)
    elif argv and argv[0] == "--atheris":
        run_atheris(argv[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
