# The packet core's C-level interface, shared with io.pyx.
cimport cython
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    NCOUNTERS = 25
    V_DROP = 0
    V_FORWARD = 1
    V_ICMP = 2
    V_DELIVER = 3
    C_ENCAP_PACKETS = 0
    C_ENCAP_BYTES = 1
    C_DECAP_PACKETS = 2
    C_DECAP_BYTES = 3
    C_ICMP_SENT = 4
    C_ICMP_WRITE_ERROR = 5
    C_ENCAP_DROP = 6        # + 0 short, 1 not_ipv4, 2 bad_header, 3 bad_length, 4 outside_network,
                            #   5 no_route, 6 ttl_expired, 7 send_error
    C_ENCAP_DROP_SEND_ERROR = 13
    C_DECAP_DROP = 14       # + 0 short, 1 not_ipv4, 2 bad_header, 3 bad_length, 4 truncated,
                            #   5 oversized, 6 unknown_sender, 7 spoofed_source, 8 ttl_expired, 9 write_error,
                            #   10 wrong_destination
    C_DECAP_DROP_WRITE_ERROR = 23
    ICMP_REPLY_MAX_C = 96


@cython.final
cdef class RouteTable:
    cdef uint32_t* slots
    cdef uint32_t nslots
    cdef uint32_t net
    cdef uint32_t mask
    cdef int shift
    cdef readonly int prefix_len
    cdef readonly int subnet_len
    cdef uint32_t count
    cdef uint32_t* peer_keys
    cdef uint32_t* peer_refs
    cdef uint32_t peer_cap
    cdef uint32_t peer_live
    cdef uint32_t peer_tombs
    cdef int peer_bits

    cdef uint32_t index_of(self, uint32_t subnet_addr) except? 0xFFFFFFFF
    cdef uint32_t lookup_c(self, uint32_t dst) noexcept nogil
    cdef bint is_peer_c(self, uint32_t ip) noexcept nogil
    cdef void peer_add(self, uint32_t ip) noexcept
    cdef void peer_drop(self, uint32_t ip) noexcept
    cdef void peer_compact(self) noexcept


@cython.final
cdef class PacketCore:
    cdef readonly RouteTable table
    cdef readonly int mtu
    cdef uint64_t counts[NCOUNTERS]
    cdef uint32_t own_net      # our lease: what a datagram may be addressed to (own_mask 0: not set, no check)
    cdef uint32_t own_mask

    cdef int encap_c(self, unsigned char* buf, Py_ssize_t n, unsigned char* reply,
                     uint32_t* value) noexcept nogil
    cdef int decap_c(self, unsigned char* buf, Py_ssize_t n, uint32_t sender,
                     uint32_t* value) noexcept nogil
