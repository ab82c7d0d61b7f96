"""The udp backend's packet core in pure Python: the reference for fastpath.core (same API).

Buffer in, verdict out; no file descriptors, no clock. The compiled twin in fastpath/core.pyx must
agree with this module on every input (tests/unit/test_packet_core.py checks both, and compares them
on random packets).

Addresses are IPv4 addresses as host-order ints (`int(IPv4Address(...))`).

encap (TUN -> UDP) returns (FORWARD, peer_ip) with the TTL already decremented in place,
(ICMP, n) with a "net unreachable" of n bytes written into `reply` (to be written back into the TUN),
or (DROP, counter_index). decap (UDP -> TUN) returns (DELIVER, n) with the TTL decremented in place
(write packet[:n] into the TUN) or (DROP, counter_index).
"""

from __future__ import annotations

DROP = 0
FORWARD = 1
ICMP = 2
DELIVER = 3

# Counter order is part of the API: fastpath.core uses the same indexes.
COUNTERS: tuple[str, ...] = (
    "encap_packets",
    "encap_bytes",
    "decap_packets",
    "decap_bytes",
    "icmp_unreachable_sent",
    "icmp_unreachable_write_error",
    "encap_drop_short",
    "encap_drop_not_ipv4",
    "encap_drop_bad_header",
    "encap_drop_bad_length",
    "encap_drop_outside_network",
    "encap_drop_no_route",
    "encap_drop_ttl_expired",
    "encap_drop_send_error",
    "decap_drop_short",
    "decap_drop_not_ipv4",
    "decap_drop_bad_header",
    "decap_drop_bad_length",
    "decap_drop_truncated",
    "decap_drop_oversized",
    "decap_drop_unknown_sender",
    "decap_drop_spoofed_source",
    "decap_drop_ttl_expired",
    "decap_drop_write_error",
    "decap_drop_wrong_destination",
)
_IDX = {name: i for i, name in enumerate(COUNTERS)}
(ENCAP_PACKETS, ENCAP_BYTES, DECAP_PACKETS, DECAP_BYTES, ICMP_SENT, ICMP_WRITE_ERROR) = range(6)
ENCAP_DROP_SEND_ERROR = _IDX["encap_drop_send_error"]
DECAP_DROP_WRITE_ERROR = _IDX["decap_drop_write_error"]

# Longest ICMP reply: IPv4 header + ICMP header + quoted header with options (60) + 8 bytes.
ICMP_REPLY_MAX = 20 + 8 + 60 + 8
IPPROTO_ICMP = 1


def counter_name(index: int) -> str:
    if not 0 <= index < len(COUNTERS):
        raise IndexError(f"counter index {index} out of range 0..{len(COUNTERS) - 1}")
    return COUNTERS[index]


def _check_addr(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name}={value!r} is not an IPv4 address as an int (0..2**32-1)")


class RouteTable:
    """Subnet -> peer PublicIP, a flat array indexed by subnet number (every lease has one prefix length).

    One writer (the control plane) calls set/remove/clear; readers (the data path) call lookup and
    is_peer. Changing one slot never touches the others.
    """

    def __init__(self, network: int, prefix_len: int, subnet_len: int) -> None:
        _check_addr("network", network)
        # subnet_len >= 1: a slot index is (address - network) >> (32 - subnet_len), and a shift by 32 is
        # undefined in C (x86 would shift by 0 and index past the table).
        if not 0 <= prefix_len <= 30 or not max(prefix_len, 1) <= subnet_len <= 32:
            raise ValueError(
                f"network prefix /{prefix_len} and subnet length /{subnet_len} do not fit: "
                "need 0 <= prefix <= 30, prefix <= subnet length <= 32 and subnet length >= 1"
            )
        if subnet_len - prefix_len > 24:
            raise ValueError(
                f"/{prefix_len} network with /{subnet_len} subnets has more than 2**24 subnets; "
                "use a longer Network prefix or a shorter SubnetLen"
            )
        mask = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
        if network & ~mask & 0xFFFFFFFF:
            raise ValueError(f"network {network:#010x} has host bits set for prefix /{prefix_len}")
        self.network = network
        self.prefix_len = prefix_len
        self.subnet_len = subnet_len
        self._mask = mask
        self._shift = 32 - subnet_len
        self._slots = [0] * (1 << (subnet_len - prefix_len))
        self._peers: dict[int, int] = {}  # PublicIP -> number of subnets it holds
        self._count = 0

    @property
    def capacity(self) -> int:
        return len(self._slots)

    def _index(self, subnet_addr: int) -> int:
        _check_addr("subnet", subnet_addr)
        if subnet_addr & self._mask != self.network:
            raise ValueError(f"subnet {subnet_addr:#010x} lies outside the network")
        if subnet_addr & ((1 << self._shift) - 1):
            raise ValueError(f"subnet {subnet_addr:#010x} is not on a /{self.subnet_len} boundary")
        return (subnet_addr - self.network) >> self._shift

    def set(self, subnet_addr: int, peer_ip: int) -> None:
        i = self._index(subnet_addr)
        _check_addr("peer_ip", peer_ip)
        if peer_ip in (0, 0xFFFFFFFF):
            raise ValueError("peer_ip must be a unicast address, not 0.0.0.0 or 255.255.255.255")
        old = self._slots[i]
        if old == peer_ip:
            return
        self._peer_add(peer_ip)
        self._slots[i] = peer_ip
        if old:
            self._peer_drop(old)
        else:
            self._count += 1

    def remove(self, subnet_addr: int) -> None:
        i = self._index(subnet_addr)
        old = self._slots[i]
        if old:
            self._slots[i] = 0
            self._count -= 1
            self._peer_drop(old)

    def clear(self) -> None:
        for i in range(len(self._slots)):
            self._slots[i] = 0
        self._peers.clear()
        self._count = 0

    def lookup(self, dst: int) -> int:
        """The PublicIP of the peer whose subnet holds dst, or 0."""
        _check_addr("dst", dst)
        return self._lookup(dst)

    def _lookup(self, dst: int) -> int:  # the packet path's, on addresses read from a header
        if dst & self._mask != self.network:
            return 0
        return self._slots[(dst - self.network) >> self._shift]

    def contains(self, addr: int) -> bool:
        """Whether addr lies inside the network (any subnet, leased or not)."""
        _check_addr("addr", addr)
        return self._contains(addr)

    def _contains(self, addr: int) -> bool:
        return addr & self._mask == self.network

    def is_peer(self, ip: int) -> bool:
        """Whether ip is the PublicIP of at least one current lease."""
        _check_addr("ip", ip)
        return ip in self._peers

    def _is_peer(self, ip: int) -> bool:
        return ip in self._peers

    def _peer_add(self, ip: int) -> None:
        self._peers[ip] = self._peers.get(ip, 0) + 1

    def _peer_drop(self, ip: int) -> None:
        n = self._peers[ip] - 1
        if n:
            self._peers[ip] = n
        else:
            del self._peers[ip]

    def __len__(self) -> int:
        return self._count


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of data."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    s = sum((b[i] << 8) | b[i + 1] for i in range(0, len(b), 2))
    return ~_fold(s) & 0xFFFF


def _decrement_ttl(buf: bytearray | memoryview) -> None:
    """TTL - 1 with the header checksum patched incrementally (RFC 1624, eqn. 3)."""
    ttl = buf[8]
    proto = buf[9]
    old = (ttl << 8) | proto
    new = ((ttl - 1) << 8) | proto
    hc = (buf[10] << 8) | buf[11]
    s = _fold((~hc & 0xFFFF) + (~old & 0xFFFF) + new)
    hc = ~s & 0xFFFF
    buf[8] = ttl - 1
    buf[10] = hc >> 8
    buf[11] = hc & 0xFF


def _u32(buf: bytearray | memoryview, off: int) -> int:
    return (buf[off] << 24) | (buf[off + 1] << 16) | (buf[off + 2] << 8) | buf[off + 3]


def _put16(buf: bytearray | memoryview, off: int, v: int) -> None:
    buf[off] = (v >> 8) & 0xFF
    buf[off + 1] = v & 0xFF


def _put32(buf: bytearray | memoryview, off: int, v: int) -> None:
    buf[off] = (v >> 24) & 0xFF
    buf[off + 1] = (v >> 16) & 0xFF
    buf[off + 2] = (v >> 8) & 0xFF
    buf[off + 3] = v & 0xFF


def _may_answer(src: int) -> bool:
    """No ICMP error to 0.0.0.0, loopback, 255.255.255.255, multicast or class E (RFC 1812 4.3.2.7)."""
    return src != 0 and (src >> 28) < 0xE and (src >> 24) != 127


# ICMP types that are queries or their replies (echo, router, timestamp, information, address mask): Linux's
# non-error types. Only these may be answered with an ICMP error (RFC 1122 3.2.2); errors and unknown types not.
_ICMP_QUERIES = frozenset({0, 8, 9, 10, 13, 14, 15, 16, 17, 18})


def _icmp_query(packet: bytearray | memoryview, n: int) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return n > ihl and packet[ihl] in _ICMP_QUERIES


class PacketCore:
    """Verdicts for one node: the route table, the TUN MTU and the counters."""

    def __init__(self, table: RouteTable, mtu: int) -> None:
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu={mtu} out of range: an IPv4 MTU is 68..65535")
        self.table = table
        self.mtu = mtu
        self._counts = [0] * len(COUNTERS)
        self._own_net = self._own_mask = 0  # not set: any destination is delivered

    def set_own_subnet(self, network: int, prefix_len: int) -> None:
        """Our lease's subnet: decap then delivers only datagrams addressed to it (others: wrong_destination)."""
        if not 0 < prefix_len <= 32:
            raise ValueError(f"prefix_len={prefix_len} out of range 1..32")
        _check_addr("network", network)
        mask = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
        self._own_mask = 0
        self._own_net = network & mask
        self._own_mask = mask

    def _header_drop(self, buf: bytearray | memoryview, length: int, base: int) -> int:
        """Index of the drop counter (relative names) when buf[:length] is not one IPv4 packet, else -1."""
        if length < 20:
            return base + 0
        if buf[0] >> 4 != 4:
            return base + 1
        ihl = (buf[0] & 0x0F) * 4
        if ihl < 20 or ihl > length:
            return base + 2
        return -1

    def encap(self, packet: bytearray | memoryview, reply: bytearray | memoryview,
              length: int | None = None) -> tuple[int, int]:
        """A packet read from the TUN: (FORWARD, peer_ip), (ICMP, reply_len) or (DROP, counter).

        reply (at least ICMP_REPLY_MAX bytes) receives the ICMP answer when there is one.
        """
        n = len(packet) if length is None else length
        if not 0 <= n <= len(packet):
            raise ValueError(f"length={n} outside the buffer (0..{len(packet)})")
        if len(reply) < ICMP_REPLY_MAX:
            raise ValueError(f"reply buffer must hold {ICMP_REPLY_MAX} bytes, got {len(reply)}")
        c = self._counts
        base = _IDX["encap_drop_short"]
        bad = self._header_drop(packet, n, base)
        if bad < 0:
            total = (packet[2] << 8) | packet[3]
            if total < (packet[0] & 0x0F) * 4 or total != n:
                bad = base + 3  # bad_length
        if bad >= 0:
            c[bad] += 1
            return DROP, bad
        dst = _u32(packet, 16)
        table = self.table
        if not table._contains(dst):
            c[base + 4] += 1
            return DROP, base + 4
        peer = table._lookup(dst)
        if peer == 0:
            c[base + 5] += 1
            frag_off = ((packet[6] & 0x1F) << 8) | packet[7]
            src = _u32(packet, 12)
            if (packet[9] == IPPROTO_ICMP and not _icmp_query(packet, n)) or frag_off != 0 or not _may_answer(src):
                return DROP, base + 5
            m = self._net_unreachable(packet, n, reply)
            c[ICMP_SENT] += 1
            return ICMP, m
        if packet[8] <= 1:
            c[base + 6] += 1
            return DROP, base + 6
        _decrement_ttl(packet)
        c[ENCAP_PACKETS] += 1
        c[ENCAP_BYTES] += n
        return FORWARD, peer

    @staticmethod
    def _net_unreachable(packet: bytearray | memoryview, n: int, reply: bytearray | memoryview) -> int:
        # Sourced from the unreachable destination, not the TUN's address: the kernel accepts it on
        # the TUN (rp_filter: that address routes back via the TUN) and forwards it to the sender.
        quote = min(n, (packet[0] & 0x0F) * 4 + 8)
        m = 28 + quote
        reply[0:28] = bytes(28)
        reply[0] = 0x45
        _put16(reply, 2, m)
        reply[8] = 64
        reply[9] = IPPROTO_ICMP
        reply[12:16] = packet[16:20]
        reply[16:20] = packet[12:16]
        _put16(reply, 10, checksum(reply[0:20]))
        reply[20] = 3  # destination unreachable
        reply[21] = 0  # net unreachable
        reply[28:m] = packet[0:quote]
        _put16(reply, 22, checksum(reply[20:m]))
        return m

    def decap(self, packet: bytearray | memoryview, sender: int, length: int | None = None) -> tuple[int, int]:
        """A datagram of `length` bytes from `sender` (outer source IP): (DELIVER, n) or (DROP, counter)."""
        _check_addr("sender", sender)
        n = len(packet) if length is None else length
        c = self._counts
        base = _IDX["decap_drop_short"]
        if n > self.mtu:
            c[base + 5] += 1
            return DROP, base + 5
        if not 0 <= n <= len(packet):
            raise ValueError(f"length={n} outside the buffer (0..{len(packet)})")
        bad = self._header_drop(packet, n, base)
        if bad < 0:
            total = (packet[2] << 8) | packet[3]
            if total > n:
                bad = base + 4  # truncated
            elif total < (packet[0] & 0x0F) * 4 or total != n:
                bad = base + 3  # bad_length
        if bad >= 0:
            c[bad] += 1
            return DROP, bad
        table = self.table
        if sender == 0 or table._lookup(_u32(packet, 12)) != sender:  # 0 would "match" an empty slot
            bad = base + 7 if table._is_peer(sender) else base + 6
            c[bad] += 1
            return DROP, bad
        if packet[8] <= 1:
            c[base + 8] += 1
            return DROP, base + 8
        if _u32(packet, 16) & self._own_mask != self._own_net:  # only what is addressed to our subnet
            c[base + 10] += 1
            return DROP, base + 10
        _decrement_ttl(packet)
        c[DECAP_PACKETS] += 1
        c[DECAP_BYTES] += n
        return DELIVER, n

    def count(self, index: int, n: int = 1) -> None:
        """Add n to a counter (the I/O loops count send and write errors here)."""
        if not 0 <= index < len(COUNTERS):
            raise IndexError(f"counter index {index} out of range")
        self._counts[index] += n

    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, self._counts, strict=True))
