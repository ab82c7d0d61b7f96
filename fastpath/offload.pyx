# cython: language_level=3
"""The offload helpers of offload.h (TSO split, GRO coalescing, checksums) on Python bytes, for tests.

The loops in io.pyx call the same C functions on their buffers; here each call copies, which is fine
for tests and useless for speed.
"""

from libc.stdint cimport uint32_t
from libc.string cimport memcpy

VNET_LEN = FP_VNET_LEN
GSO_NONE = FP_GSO_NONE
GSO_TCPV4 = FP_GSO_TCPV4
F_NEEDS_CSUM = FP_F_NEEDS_CSUM


class OffloadError(ValueError):
    """A packet the offload code refuses, with the packet core's drop reason (0..3)."""

    def __init__(self, reason):
        super().__init__(f"not splittable: drop reason {reason}")
        self.reason = reason


def checksum_sum(const unsigned char[::1] data):
    """The folded one's-complement sum of data (not complemented), as fp_sum computes it."""
    if data.shape[0] == 0:
        return 0
    return fp_sum(&data[0], data.shape[0])


def vnet_header(int flags=0, int gso_type=0, int hdr_len=0, int gso_size=0, int csum_start=0,
                int csum_offset=0):
    """A virtio_net_hdr (host byte order) as bytes."""
    cdef fp_vnet h
    cdef unsigned char out[FP_VNET_LEN]
    h.flags = flags
    h.gso_type = gso_type
    h.hdr_len = hdr_len
    h.gso_size = gso_size
    h.csum_start = csum_start
    h.csum_offset = csum_offset
    fp_vnet_write(out, &h)
    return bytes(out[:FP_VNET_LEN])


def parse_vnet_header(const unsigned char[::1] data):
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) of the first 10 bytes."""
    if data.shape[0] < FP_VNET_LEN:
        raise ValueError(f"a virtio_net_hdr has {FP_VNET_LEN} bytes, got {data.shape[0]}")
    cdef fp_vnet h
    fp_vnet_read(&data[0], &h)
    return (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset)


def complete_checksum(data, int start, int offset):
    """data with the partial checksum at start+offset completed (VIRTIO_NET_HDR_F_NEEDS_CSUM)."""
    cdef bytearray out = bytearray(data)
    cdef unsigned char[::1] view = out
    if len(out) == 0 or fp_csum_complete(&view[0], len(out), start, offset) < 0:
        raise ValueError(f"checksum at {start}+{offset} lies outside the {len(out)}-byte packet")
    return bytes(out)


def tso_split(packet, int gso_size, int gso_type=FP_GSO_TCPV4):
    """The MTU-size segments (bytes) of a TCPv4 super-packet, as the encap loop builds them."""
    cdef bytes pkt = bytes(packet)
    cdef const unsigned char* p = pkt
    cdef fp_vnet vh
    cdef fp_tso t
    cdef unsigned char hdr[FP_HDR_MAX]
    vh.flags = 0
    vh.gso_type = gso_type
    vh.hdr_len = 0
    vh.gso_size = gso_size
    vh.csum_start = 0
    vh.csum_offset = 0
    cdef int bad = fp_tso_parse(p, len(pkt), &vh, &t)
    if bad >= 0:
        raise OffloadError(bad)
    out = []
    cdef int i, plen
    for i in range(t.nseg):
        plen = fp_tso_segment(p, &t, i, hdr)
        start = t.hdr_len + i * t.gso_size
        out.append(bytes(hdr[:t.hdr_len]) + pkt[start:start + plen])
    return out


def gro_coalesce(packets):
    """What the decap loop writes to the TUN for these delivered packets, in order: each item is
    virtio_net_hdr + packet (a super-packet where consecutive segments of one flow coalesce)."""
    cdef list keep = [bytes(p) for p in packets]
    cdef list out = []
    cdef fp_gro g
    cdef int hl, k, j
    cdef bytes b
    g.nseg = 0

    def flush():
        if g.nseg == 0:
            return
        k = fp_gro_finish(&g)
        parts = []
        for j in range(k):
            parts.append((<unsigned char*>g.iov[j].iov_base)[:g.iov[j].iov_len])
        out.append(b"".join(parts))
        g.nseg = 0

    for b in keep:
        hl = fp_gro_candidate(b, len(b))
        if hl == 0 or g.nseg == 0 or not fp_gro_append(&g, b, len(b), hl):
            flush()
            if hl:
                fp_gro_start(&g, b, len(b), hl)
            else:
                out.append(vnet_header() + b)
    flush()
    return out
