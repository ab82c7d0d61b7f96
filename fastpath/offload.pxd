# The C side of offload.h, shared by offload.pyx (test wrappers) and io.pyx (the loops).
from libc.stdint cimport uint32_t
from posix.uio cimport iovec


cdef extern from "offload.h" nogil:
    enum:
        FP_VNET_LEN
        FP_HDR_MAX
        FP_F_NEEDS_CSUM
        FP_GSO_NONE
        FP_GSO_TCPV4
        FP_SOL_UDP
        FP_UDP_SEGMENT
        FP_UDP_GRO
        FP_GSO_MAX_SEGS
        FP_GSO_MAX_BYTES
        FP_GRO_MAX_SEGS
    ctypedef struct fp_vnet:
        unsigned char flags
        unsigned char gso_type
        unsigned short hdr_len
        unsigned short gso_size
        unsigned short csum_start
        unsigned short csum_offset
    ctypedef struct fp_tso:
        int ihl
        int hdr_len
        int payload
        int gso_size
        int nseg
    ctypedef struct fp_gro:
        int nseg
        unsigned char proto  # 6 TCP, 17 UDP
        iovec iov[66]  # FP_GRO_MAX_SEGS + 2: Cython needs a literal size
    uint32_t fp_sum(const unsigned char* p, size_t n)
    uint32_t fp_rd32(const unsigned char* p)
    void fp_vnet_read(const unsigned char* p, fp_vnet* h)
    void fp_vnet_write(unsigned char* p, const fp_vnet* h)
    int fp_csum_complete(unsigned char* pkt, size_t n, uint32_t start, uint32_t offset)
    int fp_tso_parse(const unsigned char* pkt, size_t n, const fp_vnet* vh, fp_tso* t)
    int fp_tso_segment(const unsigned char* pkt, const fp_tso* t, int i, unsigned char* hdr)
    int fp_gro_candidate(const unsigned char* p, int n)
    void fp_gro_start(fp_gro* g, const unsigned char* p, int n, int hdr_len)
    int fp_gro_append(fp_gro* g, const unsigned char* p, int n, int hdr_len)
    int fp_gro_finish(fp_gro* g)
