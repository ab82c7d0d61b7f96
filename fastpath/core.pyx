# cython: language_level=3
"""The udp backend's packet core, compiled: buffer in, verdict out; no fds, no clock.

Same Python API as flannelpy/packet.py (the reference); io.pyx calls the C-level encap_c/decap_c.
The route table has one writer (the control plane, holding the GIL) and lock-free readers (the
data-path threads, without the GIL): every slot is one 32-bit word written and read atomically,
so changing one subnet never disturbs lookups of the others.
"""

cimport cython
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint32_t fp_load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void fp_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline uint64_t fp_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    uint32_t fp_load32(const uint32_t *p) noexcept nogil
    void fp_store32(uint32_t *p, uint32_t v) noexcept nogil
    uint64_t fp_load64(const uint64_t *p) noexcept nogil

DROP = V_DROP
FORWARD = V_FORWARD
ICMP = V_ICMP
DELIVER = V_DELIVER
ICMP_REPLY_MAX = ICMP_REPLY_MAX_C

COUNTERS = (
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
assert len(COUNTERS) == NCOUNTERS
ENCAP_DROP_SEND_ERROR = C_ENCAP_DROP_SEND_ERROR
DECAP_DROP_WRITE_ERROR = C_DECAP_DROP_WRITE_ERROR
ICMP_WRITE_ERROR = C_ICMP_WRITE_ERROR

cdef uint32_t PEER_EMPTY = 0
cdef uint32_t PEER_TOMB = 0xFFFFFFFF
# Distinct PublicIPs the peer set holds at most; past that, is_peer may say no (drop label only).
cdef uint32_t PEER_MAX = 65536


def counter_name(int index):
    if not 0 <= index < NCOUNTERS:  # the module is built without bounds checks
        raise IndexError(f"counter index {index} out of range 0..{NCOUNTERS - 1}")
    return COUNTERS[index]


cdef inline void check_addr(str name, object value) except *:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name}={value!r} is not an IPv4 address as an int (0..2**32-1)")


@cython.final
cdef class RouteTable:
    """Subnet -> peer PublicIP, a flat array indexed by subnet number; see flannelpy/packet.py."""

    def __cinit__(self, object network, int prefix_len, int subnet_len):
        self.slots = NULL
        self.peer_keys = NULL
        self.peer_refs = NULL
        check_addr("network", network)
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
        cdef uint32_t mask = <uint32_t>((<uint64_t>0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF)
        cdef uint32_t net = <uint32_t>network
        if net & ~mask:
            raise ValueError(f"network {network:#010x} has host bits set for prefix /{prefix_len}")
        self.net = net
        self.mask = mask
        self.prefix_len = prefix_len
        self.subnet_len = subnet_len
        self.shift = 32 - subnet_len
        self.nslots = <uint32_t>1 << (subnet_len - prefix_len)
        self.count = 0
        self.slots = <uint32_t*>calloc(self.nslots, sizeof(uint32_t))
        # Every peer holds at least one slot, so 2 x slots keeps the probe sequences short.
        cdef uint32_t want = 2 * (self.nslots if self.nslots < PEER_MAX else PEER_MAX)
        self.peer_bits = 4
        while (<uint32_t>1 << self.peer_bits) < want:
            self.peer_bits += 1
        self.peer_cap = <uint32_t>1 << self.peer_bits
        self.peer_keys = <uint32_t*>calloc(self.peer_cap, sizeof(uint32_t))
        self.peer_refs = <uint32_t*>calloc(self.peer_cap, sizeof(uint32_t))
        self.peer_live = 0
        self.peer_tombs = 0
        if self.slots == NULL or self.peer_keys == NULL or self.peer_refs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.slots)
        free(self.peer_keys)
        free(self.peer_refs)

    @property
    def network(self):
        return self.net

    @property
    def capacity(self):
        return self.nslots

    cdef uint32_t index_of(self, uint32_t subnet_addr) except? 0xFFFFFFFF:
        if subnet_addr & self.mask != self.net:
            raise ValueError(f"subnet {subnet_addr:#010x} lies outside the network")
        if self.shift < 32 and subnet_addr & ((<uint32_t>1 << self.shift) - 1):
            raise ValueError(f"subnet {subnet_addr:#010x} is not on a /{self.subnet_len} boundary")
        return (subnet_addr - self.net) >> self.shift

    def set(self, object subnet_addr, object peer_ip):
        check_addr("subnet", subnet_addr)
        check_addr("peer_ip", peer_ip)
        cdef uint32_t i = self.index_of(<uint32_t>subnet_addr)
        cdef uint32_t peer = <uint32_t>peer_ip
        if peer == 0 or peer == 0xFFFFFFFF:
            raise ValueError("peer_ip must be a unicast address, not 0.0.0.0 or 255.255.255.255")
        cdef uint32_t old = self.slots[i]
        if old == peer:
            return
        self.peer_add(peer)
        fp_store32(&self.slots[i], peer)
        if old:
            self.peer_drop(old)
        else:
            self.count += 1

    def remove(self, object subnet_addr):
        check_addr("subnet", subnet_addr)
        cdef uint32_t i = self.index_of(<uint32_t>subnet_addr)
        cdef uint32_t old = self.slots[i]
        if old:
            fp_store32(&self.slots[i], 0)
            self.count -= 1
            self.peer_drop(old)

    def clear(self):
        cdef uint32_t i
        for i in range(self.nslots):
            fp_store32(&self.slots[i], 0)
        for i in range(self.peer_cap):
            fp_store32(&self.peer_keys[i], PEER_EMPTY)
            self.peer_refs[i] = 0
        self.count = 0
        self.peer_live = 0
        self.peer_tombs = 0

    cdef inline uint32_t lookup_c(self, uint32_t dst) noexcept nogil:
        if dst & self.mask != self.net:
            return 0
        return fp_load32(&self.slots[(dst - self.net) >> self.shift])

    def lookup(self, object dst):
        """The PublicIP of the peer whose subnet holds dst, or 0."""
        check_addr("dst", dst)
        return self.lookup_c(<uint32_t>dst)

    def contains(self, object addr):
        """Whether addr lies inside the network (any subnet, leased or not)."""
        check_addr("addr", addr)
        return (<uint32_t>addr) & self.mask == self.net

    cdef inline bint is_peer_c(self, uint32_t ip) noexcept nogil:
        if ip == PEER_EMPTY or ip == PEER_TOMB:
            return False  # never a peer (set() refuses them); they would match empty or deleted slots
        cdef uint32_t cap_mask = self.peer_cap - 1
        cdef uint32_t h = ((ip * <uint32_t>2654435761) >> (32 - self.peer_bits)) & cap_mask
        cdef uint32_t step, key
        for step in range(self.peer_cap):
            key = fp_load32(&self.peer_keys[h])
            if key == ip:
                return True
            if key == PEER_EMPTY:
                return False
            h = (h + 1) & cap_mask
        return False

    def is_peer(self, object ip):
        """Whether ip is the PublicIP of at least one current lease."""
        check_addr("ip", ip)
        return self.is_peer_c(<uint32_t>ip)

    cdef void peer_add(self, uint32_t ip) noexcept:
        cdef uint32_t cap_mask = self.peer_cap - 1
        cdef uint32_t h = ((ip * <uint32_t>2654435761) >> (32 - self.peer_bits)) & cap_mask
        cdef uint32_t step, key
        cdef long free_at = -1
        for step in range(self.peer_cap):
            key = self.peer_keys[h]
            if key == ip:
                self.peer_refs[h] += 1
                return
            if key == PEER_TOMB and free_at < 0:
                free_at = h
            if key == PEER_EMPTY:
                if free_at < 0:
                    free_at = h
                break
            h = (h + 1) & cap_mask
        if free_at < 0 or self.peer_live >= PEER_MAX:
            return  # full: only the drop label of this peer's spoofed datagrams suffers
        if self.peer_keys[free_at] == PEER_TOMB:
            self.peer_tombs -= 1
        self.peer_refs[free_at] = 1
        fp_store32(&self.peer_keys[free_at], ip)
        self.peer_live += 1

    cdef void peer_drop(self, uint32_t ip) noexcept:
        cdef uint32_t cap_mask = self.peer_cap - 1
        cdef uint32_t h = ((ip * <uint32_t>2654435761) >> (32 - self.peer_bits)) & cap_mask
        cdef uint32_t step, key
        for step in range(self.peer_cap):
            key = self.peer_keys[h]
            if key == ip:
                self.peer_refs[h] -= 1
                if self.peer_refs[h] == 0:
                    fp_store32(&self.peer_keys[h], PEER_TOMB)
                    self.peer_live -= 1
                    self.peer_tombs += 1
                    if self.peer_tombs * 4 > self.peer_cap:
                        self.peer_compact()
                return
            if key == PEER_EMPTY:
                return
            h = (h + 1) & cap_mask

    cdef void peer_compact(self) noexcept:
        # In place: a reader racing with this may classify one drop as unknown_sender instead of
        # spoofed_source; lookups (the accept decision) never read the peer set.
        cdef uint32_t n = self.peer_live
        cdef uint32_t* keys = <uint32_t*>calloc(n + 1, sizeof(uint32_t))
        cdef uint32_t* refs = <uint32_t*>calloc(n + 1, sizeof(uint32_t))
        cdef uint32_t i, j = 0, h, k
        cdef uint32_t cap_mask = self.peer_cap - 1
        if keys == NULL or refs == NULL:
            free(keys)
            free(refs)
            return
        for i in range(self.peer_cap):
            k = self.peer_keys[i]
            if k != PEER_EMPTY and k != PEER_TOMB:
                keys[j] = k
                refs[j] = self.peer_refs[i]
                j += 1
        for i in range(self.peer_cap):
            fp_store32(&self.peer_keys[i], PEER_EMPTY)
            self.peer_refs[i] = 0
        for i in range(j):
            h = ((keys[i] * <uint32_t>2654435761) >> (32 - self.peer_bits)) & cap_mask
            while self.peer_keys[h] != PEER_EMPTY:
                h = (h + 1) & cap_mask
            self.peer_refs[h] = refs[i]
            fp_store32(&self.peer_keys[h], keys[i])
        self.peer_live = j
        self.peer_tombs = 0
        free(keys)
        free(refs)

    def __len__(self):
        return self.count


cdef inline uint32_t rd32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline void wr16(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline uint32_t fold(uint32_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


cdef uint32_t csum(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t s = 0
    cdef Py_ssize_t i = 0
    while i + 1 < n:
        s += (<uint32_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        s += <uint32_t>p[i] << 8
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~(<uint32_t>s)) & 0xFFFF


def checksum(const unsigned char[::1] data):
    """The Internet checksum (RFC 1071) of data."""
    if data.shape[0] == 0:
        return 0xFFFF
    return csum(&data[0], data.shape[0])


cdef inline void decrement_ttl(unsigned char* buf) noexcept nogil:
    # RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), m = the 16-bit word holding TTL and protocol.
    cdef uint32_t ttl = buf[8]
    cdef uint32_t proto = buf[9]
    cdef uint32_t old = (ttl << 8) | proto
    cdef uint32_t new = ((ttl - 1) << 8) | proto
    cdef uint32_t hc = (<uint32_t>buf[10] << 8) | buf[11]
    cdef uint32_t s = fold(((~hc) & 0xFFFF) + ((~old) & 0xFFFF) + new)
    hc = (~s) & 0xFFFF
    buf[8] = <unsigned char>(ttl - 1)
    wr16(buf + 10, hc)


cdef inline int header_drop(const unsigned char* buf, Py_ssize_t n) noexcept nogil:
    """0 short, 1 not IPv4, 2 bad IHL, -1 fine."""
    if n < 20:
        return 0
    if buf[0] >> 4 != 4:
        return 1
    cdef Py_ssize_t ihl = (buf[0] & 0x0F) * 4
    if ihl < 20 or ihl > n:
        return 2
    return -1


cdef Py_ssize_t net_unreachable(const unsigned char* pkt, Py_ssize_t n, unsigned char* reply) noexcept nogil:
    # Sourced from the unreachable destination, not the TUN's address: the kernel accepts it on the
    # TUN (rp_filter: that address routes back via the TUN) and forwards it to the sender.
    cdef Py_ssize_t quote = (pkt[0] & 0x0F) * 4 + 8
    if quote > n:
        quote = n
    cdef Py_ssize_t m = 28 + quote
    memset(reply, 0, 28)
    reply[0] = 0x45
    wr16(reply + 2, <uint32_t>m)
    reply[8] = 64
    reply[9] = 1
    memcpy(reply + 12, pkt + 16, 4)
    memcpy(reply + 16, pkt + 12, 4)
    wr16(reply + 10, csum(reply, 20))
    reply[20] = 3
    reply[21] = 0
    memcpy(reply + 28, pkt, quote)
    wr16(reply + 22, csum(reply + 20, m - 20))
    return m


@cython.final
cdef inline bint icmp_query(const unsigned char* buf, Py_ssize_t n) noexcept nogil:
    """An ICMP query or its reply (echo, router, timestamp, information, address mask: Linux's non-error
    types), which may be answered with an error; errors and unknown types may not."""
    cdef Py_ssize_t ihl = (buf[0] & 0x0F) * 4
    cdef unsigned char t
    if n <= ihl:
        return 0
    t = buf[ihl]
    return t == 0 or 8 <= t <= 10 or 13 <= t <= 18


cdef class PacketCore:
    """Verdicts for one node: the route table, the TUN MTU and the counters."""

    def __cinit__(self, RouteTable table not None, int mtu):
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu={mtu} out of range: an IPv4 MTU is 68..65535")
        self.table = table
        self.mtu = mtu
        memset(self.counts, 0, sizeof(self.counts))

    def set_own_subnet(self, object network, int prefix_len):
        """Our lease's subnet (network address as an int): decap then delivers only datagrams addressed to it
        (others: wrong_destination). Until it is set, any destination is delivered."""
        cdef uint32_t mask, net
        if not 0 < prefix_len <= 32:
            raise ValueError(f"prefix_len={prefix_len} out of range 1..32")
        check_addr("network", network)
        mask = <uint32_t>((<uint64_t>0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF)
        net = <uint32_t>network
        self.own_mask = 0  # no half-set pair is ever seen by a loop (mask 0 matches every address)
        self.own_net = net & mask
        self.own_mask = mask

    cdef int encap_c(self, unsigned char* buf, Py_ssize_t n, unsigned char* reply,
                     uint32_t* value) noexcept nogil:
        cdef int bad = header_drop(buf, n)
        cdef uint32_t total, dst, src, peer, frag_off
        if bad < 0:
            total = (<uint32_t>buf[2] << 8) | buf[3]
            if total < <uint32_t>((buf[0] & 0x0F) * 4) or total != <uint32_t>n:
                bad = 3
        if bad >= 0:
            self.counts[C_ENCAP_DROP + bad] += 1
            value[0] = C_ENCAP_DROP + bad
            return V_DROP
        dst = rd32(buf + 16)
        if dst & self.table.mask != self.table.net:
            self.counts[C_ENCAP_DROP + 4] += 1
            value[0] = C_ENCAP_DROP + 4
            return V_DROP
        peer = self.table.lookup_c(dst)
        if peer == 0:
            self.counts[C_ENCAP_DROP + 5] += 1
            value[0] = C_ENCAP_DROP + 5
            frag_off = ((<uint32_t>buf[6] & 0x1F) << 8) | buf[7]
            src = rd32(buf + 12)
            # No ICMP error about an ICMP error (RFC 1122 3.2.2; queries such as ping get one, as from Linux),
            # about a non-first fragment, or to a source that cannot take one (RFC 1812 4.3.2.7).
            if ((buf[9] == 1 and not icmp_query(buf, n)) or frag_off != 0 or src == 0 or (src >> 28) >= 0xE
                    or (src >> 24) == 127):
                return V_DROP
            value[0] = <uint32_t>net_unreachable(buf, n, reply)
            self.counts[C_ICMP_SENT] += 1
            return V_ICMP
        if buf[8] <= 1:
            self.counts[C_ENCAP_DROP + 6] += 1
            value[0] = C_ENCAP_DROP + 6
            return V_DROP
        decrement_ttl(buf)
        self.counts[C_ENCAP_PACKETS] += 1
        self.counts[C_ENCAP_BYTES] += n
        value[0] = peer
        return V_FORWARD

    cdef int decap_c(self, unsigned char* buf, Py_ssize_t n, uint32_t sender,
                     uint32_t* value) noexcept nogil:
        cdef int bad
        cdef uint32_t total
        if n > self.mtu:
            bad = 5
        else:
            bad = header_drop(buf, n)
            if bad < 0:
                total = (<uint32_t>buf[2] << 8) | buf[3]
                if total > <uint32_t>n:
                    bad = 4
                elif total < <uint32_t>((buf[0] & 0x0F) * 4) or total != <uint32_t>n:
                    bad = 3
            # sender 0: an empty slot (no lease) would otherwise "match" it
            if bad < 0 and (sender == 0 or self.table.lookup_c(rd32(buf + 12)) != sender):
                bad = 7 if self.table.is_peer_c(sender) else 6
            if bad < 0 and buf[8] <= 1:
                bad = 8
            # A peer sends us only what its route table sends to our subnet; anything else (the host's own
            # addresses, other networks) would be delivered or forwarded by our kernel on a peer's word.
            if bad < 0 and rd32(buf + 16) & self.own_mask != self.own_net:
                bad = 10
        if bad >= 0:
            self.counts[C_DECAP_DROP + bad] += 1
            value[0] = C_DECAP_DROP + bad
            return V_DROP
        decrement_ttl(buf)
        self.counts[C_DECAP_PACKETS] += 1
        self.counts[C_DECAP_BYTES] += n
        value[0] = <uint32_t>n
        return V_DELIVER

    def encap(self, unsigned char[::1] packet not None, unsigned char[::1] reply not None, length=None):
        """A packet read from the TUN: (FORWARD, peer_ip), (ICMP, reply_len) or (DROP, counter)."""
        cdef Py_ssize_t n = packet.shape[0] if length is None else length
        if not 0 <= n <= packet.shape[0]:
            raise ValueError(f"length={n} outside the buffer (0..{packet.shape[0]})")
        if reply.shape[0] < ICMP_REPLY_MAX_C:
            raise ValueError(f"reply buffer must hold {ICMP_REPLY_MAX_C} bytes, got {reply.shape[0]}")
        cdef uint32_t value = 0
        cdef unsigned char empty = 0
        cdef unsigned char* p = &packet[0] if packet.shape[0] else &empty
        cdef int v = self.encap_c(p, n, &reply[0], &value)
        return v, value

    def decap(self, unsigned char[::1] packet not None, object sender, length=None):
        """A datagram of `length` bytes from `sender` (outer source IP): (DELIVER, n) or (DROP, counter)."""
        check_addr("sender", sender)
        cdef Py_ssize_t n = packet.shape[0] if length is None else length
        if n <= self.mtu and not 0 <= n <= packet.shape[0]:
            raise ValueError(f"length={n} outside the buffer (0..{packet.shape[0]})")
        cdef uint32_t value = 0
        cdef unsigned char empty = 0
        cdef unsigned char* p = &packet[0] if packet.shape[0] else &empty
        cdef int v = self.decap_c(p, n, <uint32_t>sender, &value)
        return v, value

    def count(self, int index, uint64_t n=1):
        """Add n to a counter (the I/O loops count send and write errors here)."""
        if not 0 <= index < NCOUNTERS:
            raise IndexError(f"counter index {index} out of range")
        self.counts[index] += n

    def counters(self):
        cdef int i
        return {COUNTERS[i]: fp_load64(&self.counts[i]) for i in range(NCOUNTERS)}
