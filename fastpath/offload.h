/* The udp backend's offload helpers: plain C, no Python, no system calls.
 *
 * - a fast Internet checksum (RFC 1071) over 8-byte words;
 * - completing a partial checksum the kernel left to us (VIRTIO_NET_HDR_F_NEEDS_CSUM);
 * - TSO split: one IPv4/TCP super-packet from a TUN opened with IFF_VNET_HDR and TUN_F_TSO4 becomes
 *   MTU-size segments (total length, IP ID, sequence number, FIN/PSH/CWR, IP and TCP checksums), each
 *   one a header written into a scratch buffer plus a slice of the super-packet's payload (no copy);
 * - GRO: consecutive in-order TCP segments of one flow, each with a valid checksum, become one
 *   super-packet written to the TUN with a virtio_net_hdr (gso TCPV4, NEEDS_CSUM), as writev pieces;
 *   equal-size UDP datagrams of one flow likewise (gso UDP_L4: the kernel cuts them apart again).
 *
 * The virtio_net_hdr is in the host's byte order (tun's legacy header on a little-endian host).
 * Used by io.pyx (the loops) and offload.pyx (the same functions for tests).
 */
#ifndef FLANNELPY_OFFLOAD_H
#define FLANNELPY_OFFLOAD_H

#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define FP_VNET_LEN 10
#define FP_F_NEEDS_CSUM 1
#define FP_GSO_NONE 0
#define FP_GSO_TCPV4 1
#define FP_GSO_UDP_L4 5
#define FP_GSO_ECN 0x80
#define FP_HDR_MAX 120   /* IPv4 header (60) + TCP header (60) at most */
#define FP_GRO_MAX_SEGS 64
#define FP_IP_MAX 65535

#define FP_TCP_FIN 0x01
#define FP_TCP_SYN 0x02
#define FP_TCP_RST 0x04
#define FP_TCP_PSH 0x08
#define FP_TCP_ACK 0x10
#define FP_TCP_URG 0x20
#define FP_TCP_CWR 0x80

#define FP_SOL_UDP 17        /* <netinet/udp.h>; spelled out for older C libraries */
#define FP_UDP_SEGMENT 103
#define FP_UDP_GRO 104
#define FP_GSO_MAX_SEGS 64   /* UDP_MAX_SEGMENTS of older kernels */
#define FP_GSO_MAX_BYTES 65507 /* one UDP datagram's payload at most, headers included in the IP limit */

typedef struct {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
} fp_vnet;

static inline void fp_vnet_read(const uint8_t *p, fp_vnet *h) {
    h->flags = p[0];
    h->gso_type = p[1];
    memcpy(&h->hdr_len, p + 2, 2);
    memcpy(&h->gso_size, p + 4, 2);
    memcpy(&h->csum_start, p + 6, 2);
    memcpy(&h->csum_offset, p + 8, 2);
}

static inline void fp_vnet_write(uint8_t *p, const fp_vnet *h) {
    p[0] = h->flags;
    p[1] = h->gso_type;
    memcpy(p + 2, &h->hdr_len, 2);
    memcpy(p + 4, &h->gso_size, 2);
    memcpy(p + 6, &h->csum_start, 2);
    memcpy(p + 8, &h->csum_offset, 2);
}

static inline uint32_t fp_rd16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static inline uint32_t fp_rd32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void fp_wr16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void fp_wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* 16-bit one's-complement addition of two folded sums. */
static inline uint32_t fp_add16(uint32_t a, uint32_t b) {
    a += b;
    return (a & 0xFFFF) + (a >> 16);
}

/* The one's-complement sum (folded to 16 bits, not complemented) of p[0..n) read as big-endian
 * 16-bit words, p being the start of the checksummed region. Sums native 64-bit words and swaps at
 * the end: the one's-complement sum commutes with byte order (RFC 1071, 2(B)). */
static inline uint32_t fp_sum(const uint8_t *p, size_t n) {
    /* Two accumulators: two independent add-with-carry chains run in parallel (~1.6x). */
    unsigned __int128 a1 = 0, a2 = 0;
    uint64_t w0, w1, w2, w3;
    while (n >= 32) {
        memcpy(&w0, p, 8); memcpy(&w1, p + 8, 8); memcpy(&w2, p + 16, 8); memcpy(&w3, p + 24, 8);
        a1 += w0; a2 += w1; a1 += w2; a2 += w3;
        p += 32; n -= 32;
    }
    while (n >= 8) {
        memcpy(&w0, p, 8);
        a1 += w0;
        p += 8; n -= 8;
    }
    unsigned __int128 acc = a1 + a2;
    uint64_t tail = 0;
    if (n) {
        memcpy(&tail, p, n);  /* zero padding: a lone last byte is the high byte of a big-endian word */
        acc += tail;
    }
    uint64_t s = (uint64_t)acc + (uint64_t)(acc >> 64);
    if (s < (uint64_t)acc) s += 1;
    s = (s & 0xFFFFFFFFu) + (s >> 32);
    s = (s & 0xFFFFFFFFu) + (s >> 32);
    s = (s & 0xFFFF) + (s >> 16);
    s = (s & 0xFFFF) + (s >> 16);
    s = (s & 0xFFFF) + (s >> 16);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    s = ((s & 0xFF) << 8) | (s >> 8);
#endif
    return (uint32_t)s;
}

/* The folded pseudo-header sum of an IPv4 packet's transport part of `len` bytes. */
static inline uint32_t fp_pseudo(const uint8_t *ip, uint32_t proto, uint32_t len) {
    uint32_t s = fp_rd16(ip + 12) + fp_rd16(ip + 14) + fp_rd16(ip + 16) + fp_rd16(ip + 18) + proto + len;
    s = (s & 0xFFFF) + (s >> 16);
    return (s & 0xFFFF) + (s >> 16);
}

static inline void fp_ip_csum(uint8_t *ip, int ihl) {
    ip[10] = 0;
    ip[11] = 0;
    fp_wr16(ip + 10, ~fp_sum(ip, (size_t)ihl) & 0xFFFF);
}

/* A partial checksum (NEEDS_CSUM): the field at start+offset holds the pseudo-header sum; the sum of
 * everything from start to the end goes there, complemented (0 is sent as 0xFFFF, as the kernel does).
 * 0 done, -1 offsets outside the packet. */
static inline int fp_csum_complete(uint8_t *pkt, size_t n, uint32_t start, uint32_t offset) {
    if ((size_t)start + offset + 2 > n)
        return -1;
    uint32_t c = ~fp_sum(pkt + start, n - start) & 0xFFFF;
    fp_wr16(pkt + start + offset, c ? c : 0xFFFF);
    return 0;
}

/* --- TSO split --------------------------------------------------------------------------------- */

typedef struct {
    int ihl;          /* IPv4 header length */
    int hdr_len;      /* IPv4 + TCP headers */
    int payload;      /* bytes after the headers */
    int gso_size;     /* payload bytes per segment */
    int nseg;
} fp_tso;

/* Checks a TCPv4 super-packet. -1: splittable; else the packet core's drop reason (0 short,
 * 1 not IPv4, 2 bad header, 3 bad length), for the counters. */
static inline int fp_tso_parse(const uint8_t *pkt, size_t n, const fp_vnet *vh, fp_tso *t) {
    if (n < 20)
        return 0;
    if ((pkt[0] >> 4) != 4)
        return 1;
    int ihl = (pkt[0] & 0x0F) * 4;
    if (ihl < 20 || (size_t)ihl > n)
        return 2;
    if (fp_rd16(pkt + 2) != n)
        return 3;
    if ((vh->gso_type & ~FP_GSO_ECN) != FP_GSO_TCPV4 || pkt[9] != 6 || (fp_rd16(pkt + 6) & 0x3FFF) != 0)
        return 2;
    if ((size_t)ihl + 20 > n)
        return 2;
    int thl = (pkt[ihl + 12] >> 4) * 4;
    if (thl < 20 || (size_t)(ihl + thl) > n || vh->gso_size == 0)
        return 2;
    t->ihl = ihl;
    t->hdr_len = ihl + thl;
    t->payload = (int)n - t->hdr_len;
    t->gso_size = vh->gso_size;
    t->nseg = t->payload > 0 ? (t->payload + t->gso_size - 1) / t->gso_size : 1;
    return -1;
}

/* Segment i of a parsed super-packet: writes its headers (t->hdr_len bytes) into hdr and returns
 * its payload length; the payload is pkt + t->hdr_len + i * t->gso_size. The TCP checksum covers
 * the pseudo-header, the new TCP header and that payload. */
static inline int fp_tso_segment(const uint8_t *pkt, const fp_tso *t, int i, uint8_t *hdr) {
    int off = i * t->gso_size;
    int plen = t->payload - off;
    if (plen > t->gso_size)
        plen = t->gso_size;
    if (plen < 0)
        plen = 0;
    int ihl = t->ihl;
    int thl = t->hdr_len - ihl;
    memcpy(hdr, pkt, (size_t)t->hdr_len);
    fp_wr16(hdr + 2, (uint32_t)(t->hdr_len + plen));
    fp_wr16(hdr + 4, (fp_rd16(pkt + 4) + (uint32_t)i) & 0xFFFF);
    fp_ip_csum(hdr, ihl);
    uint8_t *th = hdr + ihl;
    fp_wr32(th + 4, fp_rd32(pkt + ihl + 4) + (uint32_t)off);
    if (i > 0)
        th[13] &= (uint8_t)~FP_TCP_CWR;
    if (i < t->nseg - 1)
        th[13] &= (uint8_t)~(FP_TCP_FIN | FP_TCP_PSH);
    th[16] = 0;
    th[17] = 0;
    uint32_t s = fp_pseudo(hdr, 6, (uint32_t)(thl + plen));
    s = fp_add16(s, fp_sum(th, (size_t)thl));
    s = fp_add16(s, fp_sum(pkt + t->hdr_len + off, (size_t)plen));
    fp_wr16(th + 16, ~s & 0xFFFF);
    return plen;
}

/* --- GRO ----------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t vnet[FP_VNET_LEN];
    uint8_t hdr[FP_HDR_MAX];
    const uint8_t *head;     /* the first segment as received (written as is when it stays alone) */
    int head_len;
    int hdr_len;
    int mss;                 /* payload of the first segment: every other one has at most this much */
    int total;               /* IP total length of the super-packet so far */
    int nseg;
    int closed;              /* a short, PSH or FIN segment ended the run */
    uint32_t next_seq;
    uint8_t or_flags;        /* FIN/PSH of appended segments, set on the super-packet */
    uint8_t proto;           /* 6 TCP, 17 UDP */
    struct iovec iov[FP_GRO_MAX_SEGS + 2];
} fp_gro;

/* The header length of a packet that may start or join a run, or 0. IPv4 without options, DF, not a
 * fragment, an IP header checksum and a transport checksum that verify (a corrupted packet is written
 * alone for the kernel to drop, never hidden inside a super-packet, whose IP header is rebuilt from the
 * first one's), then either TCP with ACK and data and no SYN/RST/URG, or UDP with data, a length that
 * matches and a checksum (not 0). */
static inline int fp_gro_candidate(const uint8_t *p, int n) {
    if (n < 29 || p[0] != 0x45 || (fp_rd16(p + 6) & 0xBFFF) != 0 || !(p[6] & 0x40))
        return 0;
    if (fp_sum(p, 20) != 0xFFFF)
        return 0;
    if ((int)fp_rd16(p + 2) != n)
        return 0;
    int hl;
    if (p[9] == 6) {
        if (n < 40)
            return 0;
        int thl = (p[32] >> 4) * 4;
        if (thl < 20 || 20 + thl >= n)
            return 0;
        uint8_t f = p[33];
        if (!(f & FP_TCP_ACK) || (f & (FP_TCP_SYN | FP_TCP_RST | FP_TCP_URG)))
            return 0;
        hl = 20 + thl;
    } else if (p[9] == 17) {
        if ((int)fp_rd16(p + 24) != n - 20 || (p[26] == 0 && p[27] == 0))
            return 0;
        hl = 28;
    } else {
        return 0;
    }
    uint32_t s = fp_add16(fp_pseudo(p, p[9], (uint32_t)(n - 20)), fp_sum(p + 20, (size_t)(n - 20)));
    if (s != 0xFFFF)
        return 0;
    return hl;
}

static inline void fp_gro_start(fp_gro *g, const uint8_t *p, int n, int hdr_len) {
    g->head = p;
    g->head_len = n;
    g->hdr_len = hdr_len;
    g->mss = n - hdr_len;
    g->total = n;
    g->nseg = 1;
    g->next_seq = fp_rd32(p + 24) + (uint32_t)g->mss;
    g->or_flags = 0;
    g->proto = p[9];
    g->closed = p[9] == 6 && (p[33] & (FP_TCP_FIN | FP_TCP_PSH)) != 0;
    g->iov[2].iov_base = (void *)(p + hdr_len);
    g->iov[2].iov_len = (size_t)g->mss;
}

/* Appends packet p (already a candidate with header length hdr_len) to the run if it continues it:
 * same protocol, addresses, TOS, TTL and ports, no more payload than the first, room left; for TCP
 * also the same ack, window, options and flags (but CWR/FIN/PSH) and the next sequence number (UDP
 * datagrams keep their boundaries: the kernel cuts the super-packet at every gso_size bytes again).
 * 1 appended, 0 not. */
static inline int fp_gro_append(fp_gro *g, const uint8_t *p, int n, int hdr_len) {
    const uint8_t *h = g->head;
    int plen = n - hdr_len;
    if (g->nseg == 0 || g->closed || hdr_len != g->hdr_len || plen > g->mss || p[9] != g->proto)
        return 0;
    if (g->nseg >= FP_GRO_MAX_SEGS || g->total + plen > FP_IP_MAX)
        return 0;
    if (p[1] != h[1] || p[8] != h[8] || memcmp(p + 12, h + 12, 8) != 0)
        return 0;
    if (g->proto == 17) {
        if (memcmp(p + 20, h + 20, 4) != 0)  /* ports */
            return 0;
        g->iov[2 + g->nseg].iov_base = (void *)(p + hdr_len);
        g->iov[2 + g->nseg].iov_len = (size_t)plen;
        g->nseg += 1;
        g->total += plen;
        if (plen < g->mss)
            g->closed = 1;
        return 1;
    }
    if (memcmp(p + 20, h + 20, 4) != 0 || memcmp(p + 28, h + 28, 4) != 0)    /* ports, ack */
        return 0;
    if (p[32] != h[32] || ((p[33] ^ h[33]) & (uint8_t)~(FP_TCP_CWR | FP_TCP_FIN | FP_TCP_PSH)) ||
        (p[33] & FP_TCP_CWR) || memcmp(p + 34, h + 34, 2) != 0)              /* window */
        return 0;
    if (hdr_len > 40 && memcmp(p + 40, h + 40, (size_t)(hdr_len - 40)) != 0)  /* options */
        return 0;
    if (fp_rd32(p + 24) != g->next_seq)
        return 0;
    g->iov[2 + g->nseg].iov_base = (void *)(p + hdr_len);
    g->iov[2 + g->nseg].iov_len = (size_t)plen;
    g->nseg += 1;
    g->total += plen;
    g->next_seq += (uint32_t)plen;
    g->or_flags |= p[33] & (FP_TCP_FIN | FP_TCP_PSH);
    if (plen < g->mss || (p[33] & (FP_TCP_FIN | FP_TCP_PSH)))
        g->closed = 1;
    return 1;
}

/* Fills g->iov for writev on a TUN with IFF_VNET_HDR and returns the iovec count: a lone segment as
 * received behind an empty header; several as one super-packet (head's headers with the total
 * length, the IP checksum, FIN/PSH of the tail, the TCP pseudo-header sum for NEEDS_CSUM). */
static inline int fp_gro_finish(fp_gro *g) {
    memset(g->vnet, 0, FP_VNET_LEN);
    g->iov[0].iov_base = g->vnet;
    g->iov[0].iov_len = FP_VNET_LEN;
    if (g->nseg <= 1) {
        g->iov[1].iov_base = (void *)g->head;
        g->iov[1].iov_len = (size_t)g->head_len;
        return 2;
    }
    uint8_t *hdr = g->hdr;
    fp_vnet v;
    memcpy(hdr, g->head, (size_t)g->hdr_len);
    fp_wr16(hdr + 2, (uint32_t)g->total);
    fp_ip_csum(hdr, 20);
    v.flags = FP_F_NEEDS_CSUM;
    v.hdr_len = (uint16_t)g->hdr_len;
    v.gso_size = (uint16_t)g->mss;
    v.csum_start = 20;
    if (g->proto == 17) {
        fp_wr16(hdr + 24, (uint32_t)(g->total - 20));
        fp_wr16(hdr + 26, fp_pseudo(hdr, 17, (uint32_t)(g->total - 20)));
        v.gso_type = FP_GSO_UDP_L4;
        v.csum_offset = 6;
    } else {
        hdr[33] |= g->or_flags;
        fp_wr16(hdr + 36, fp_pseudo(hdr, 6, (uint32_t)(g->total - 20)));
        v.gso_type = FP_GSO_TCPV4 | ((hdr[33] & FP_TCP_CWR) ? FP_GSO_ECN : 0);
        v.csum_offset = 16;
    }
    fp_vnet_write(g->vnet, &v);
    g->iov[1].iov_base = hdr;
    g->iov[1].iov_len = (size_t)g->hdr_len;
    return 2 + g->nseg;
}

#endif
