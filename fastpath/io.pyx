# cython: language_level=3
"""The udp backend's I/O loops: TUN -> UDP (encap) and UDP -> TUN (decap), in batches.

Each loop runs in its own thread started by the backend and holds the GIL only to start and to
report how it ended. Per wake-up a loop moves at most `batch` packets (non-blocking TUN reads, one
recvmmsg), then polls again together with the stop eventfd, so a stop request is never starved.
Buffers are sized from the TUN MTU. The verdicts come from fastpath.core (PacketCore.encap_c /
decap_c); send and write failures are counted there too.

Offloads (each one optional, chosen by the backend from what the kernel accepted; see offload.h):
vnet_hdr: the TUN was opened with IFF_VNET_HDR (and TUNSETOFFLOAD TSO4): every read and write carries a
virtio_net_hdr, reads may be TCP super-packets, which are split into MTU-size segments here; gso: the
datagrams of one peer go out in one sendmsg with UDP_SEGMENT; gro: the socket has UDP_GRO, received
buffers are split by the cmsg's segment size, and (with vnet_hdr) consecutive TCP segments of one flow
are coalesced into one super-packet for the TUN. Every segment goes through the packet core on its
own, so routes, TTL, ICMP, ingress checks and counters are per packet as without offloads, and each
datagram on the wire still carries exactly one IPv4 packet of at most the MTU.
"""

cimport cython
from libc.errno cimport EAGAIN, EBADF, EINTR, EINVAL, EIO, EPIPE, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

import os

import structlog

log = structlog.get_logger()

from fastpath.core cimport (
    C_DECAP_DROP,
    C_DECAP_DROP_WRITE_ERROR,
    C_ENCAP_DROP,
    C_ENCAP_DROP_SEND_ERROR,
    C_ICMP_WRITE_ERROR,
    ICMP_REPLY_MAX_C,
    V_DELIVER,
    V_FORWARD,
    V_ICMP,
    PacketCore,
)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec* iov, int iovcnt)

cdef extern from "offload.h" nogil:
    enum:
        FP_VNET_LEN
        FP_F_NEEDS_CSUM
        FP_GSO_NONE
        FP_HDR_MAX
        FP_SOL_UDP
        FP_UDP_SEGMENT
        FP_UDP_GRO
        FP_GSO_MAX_SEGS
        FP_GSO_MAX_BYTES
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
        iovec iov[66]
    void fp_vnet_read(const unsigned char* p, fp_vnet* h)
    int fp_csum_complete(unsigned char* pkt, size_t n, uint32_t start, uint32_t offset)
    int fp_tso_parse(const unsigned char* pkt, size_t n, const fp_vnet* vh, fp_tso* t)
    int fp_tso_segment(const unsigned char* pkt, const fp_tso* t, int i, unsigned char* hdr)
    int fp_gro_candidate(const unsigned char* p, int n)
    void fp_gro_start(fp_gro* g, const unsigned char* p, int n, int hdr_len)
    int fp_gro_append(fp_gro* g, const unsigned char* p, int n, int hdr_len)
    int fp_gro_finish(fp_gro* g)

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t count)
    ssize_t write(int fd, const void* buf, size_t count)
    int close(int fd)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    unsigned short htons(unsigned short)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr* CMSG_FIRSTHDR(msghdr* m)
    cmsghdr* CMSG_NXTHDR(msghdr* m, cmsghdr* c)
    unsigned char* CMSG_DATA(cmsghdr* c)
    size_t CMSG_SPACE(size_t n)
    size_t CMSG_LEN(size_t n)
    int sendmmsg(int fd, mmsghdr* msgvec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr* msgvec, unsigned int vlen, int flags, void* timeout)
    enum:
        AF_INET
        MSG_DONTWAIT
        MSG_TRUNC

DEFAULT_BATCH = 64
MAX_BATCH = 1024


cdef inline int wait_readable(int fd, int stop_fd) noexcept nogil:
    """1: fd readable; 0: stop requested; -1: poll failed (errno); -2: fd closed (EBADF)."""
    cdef pollfd fds[2]
    cdef int r
    fds[0].fd = stop_fd
    fds[0].events = POLLIN
    fds[1].fd = fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        r = poll(fds, 2, -1)
        if r < 0:
            if errno == EINTR:
                continue
            return -1
        if fds[0].revents:
            return 0
        if fds[1].revents & POLLNVAL:
            return -2  # the fd was closed under us
        if fds[1].revents:
            return 1


cdef enum:
    ARENA = 512 * 1024          # TUN reads of one wake-up (a read takes 64 KiB + header at most)
    HDR_SCRATCH = 256 * 1024    # segment headers of one wake-up
    MSGCAP = 1024               # messages per sendmmsg
    DGRAMCAP = 4096             # datagrams pending (two iovecs each: headers, payload)
    CMSG_SZ = 32                # room for one UDP_SEGMENT / UDP_GRO control message
    GRO_SLOTS = 64              # receive buffers per recvmmsg with UDP_GRO
    GRO_SLOT = 65536 + 64       # a coalesced buffer holds one UDP datagram's worth at most


cdef struct Sender:
    int sock
    unsigned short nport
    int gso
    int gso_error
    int nmsg
    int niov
    mmsghdr* msgs
    iovec* iovs
    sockaddr_in* addrs
    unsigned char* cmsgs
    int* seglen
    int* nseg
    int* nbytes
    int* closed


cdef int sender_init(Sender* s, int sock, unsigned short nport, int gso) noexcept:
    memset(s, 0, sizeof(Sender))
    s.sock = sock
    s.nport = nport
    s.gso = gso
    s.msgs = <mmsghdr*>calloc(MSGCAP, sizeof(mmsghdr))
    s.iovs = <iovec*>calloc(2 * DGRAMCAP, sizeof(iovec))
    s.addrs = <sockaddr_in*>calloc(MSGCAP, sizeof(sockaddr_in))
    s.cmsgs = <unsigned char*>calloc(MSGCAP, CMSG_SZ)
    s.seglen = <int*>calloc(MSGCAP, sizeof(int))
    s.nseg = <int*>calloc(MSGCAP, sizeof(int))
    s.nbytes = <int*>calloc(MSGCAP, sizeof(int))
    s.closed = <int*>calloc(MSGCAP, sizeof(int))
    if (s.msgs == NULL or s.iovs == NULL or s.addrs == NULL or s.cmsgs == NULL or s.seglen == NULL
            or s.nseg == NULL or s.nbytes == NULL or s.closed == NULL):
        return -1
    return 0


cdef void sender_free(Sender* s) noexcept:
    free(s.msgs); free(s.iovs); free(s.addrs); free(s.cmsgs)
    free(s.seglen); free(s.nseg); free(s.nbytes); free(s.closed)
    memset(s, 0, sizeof(Sender))


cdef void sender_push(Sender* s, uint64_t* counts, unsigned char* h, size_t hl, unsigned char* p,
                      size_t pl, uint32_t peer) noexcept nogil:
    """Queues one datagram (headers h, payload p) for peer: into the last message as one more UDP GSO
    segment when it continues it (same peer, not longer than its segments, room left), else as a new
    message."""
    cdef int length = <int>(hl + pl)
    cdef int m = s.nmsg - 1
    cdef iovec* iov
    cdef uint32_t addr = htonl(peer)
    if (s.gso and m >= 0 and s.addrs[m].sin_addr.s_addr == addr and not s.closed[m]
            and length <= s.seglen[m] and s.nseg[m] < FP_GSO_MAX_SEGS
            and s.nbytes[m] + length <= FP_GSO_MAX_BYTES and s.niov + 2 <= 2 * DGRAMCAP):
        iov = &s.iovs[s.niov]
        iov[0].iov_base = h
        iov[0].iov_len = hl
        iov[1].iov_base = p
        iov[1].iov_len = pl
        s.niov += 2
        s.msgs[m].msg_hdr.msg_iovlen += 2
        s.nseg[m] += 1
        s.nbytes[m] += length
        if length < s.seglen[m]:
            s.closed[m] = 1  # only the last segment of a GSO message may be shorter
        return
    if s.nmsg == MSGCAP or s.niov + 2 > 2 * DGRAMCAP:
        sender_flush(s, counts)
    m = s.nmsg
    iov = &s.iovs[s.niov]
    iov[0].iov_base = h
    iov[0].iov_len = hl
    iov[1].iov_base = p
    iov[1].iov_len = pl
    s.addrs[m].sin_family = AF_INET
    s.addrs[m].sin_port = s.nport
    s.addrs[m].sin_addr.s_addr = addr
    s.msgs[m].msg_hdr.msg_name = &s.addrs[m]
    s.msgs[m].msg_hdr.msg_namelen = sizeof(sockaddr_in)
    s.msgs[m].msg_hdr.msg_iov = iov
    s.msgs[m].msg_hdr.msg_iovlen = 2
    s.msgs[m].msg_hdr.msg_flags = 0
    s.seglen[m] = length
    s.nseg[m] = 1
    s.nbytes[m] = length
    s.closed[m] = 0
    s.nmsg += 1
    s.niov += 2


cdef void sender_flush(Sender* s, uint64_t* counts) noexcept nogil:
    """Sends every queued message with sendmmsg; a GSO message the kernel refuses goes out datagram by
    datagram (and EIO/EINVAL, which stay, switch GSO off); a failed datagram is counted, not retried."""
    cdef int m, r, sent = 0, err
    cdef cmsghdr* c
    cdef unsigned short size
    for m in range(s.nmsg):
        if s.nseg[m] > 1:
            c = <cmsghdr*>(s.cmsgs + m * CMSG_SZ)
            c.cmsg_level = FP_SOL_UDP
            c.cmsg_type = FP_UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(sizeof(unsigned short))
            size = <unsigned short>s.seglen[m]
            memcpy(CMSG_DATA(c), &size, sizeof(unsigned short))
            s.msgs[m].msg_hdr.msg_control = c
            s.msgs[m].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(unsigned short))
        else:
            s.msgs[m].msg_hdr.msg_control = NULL
            s.msgs[m].msg_hdr.msg_controllen = 0
    while sent < s.nmsg:
        r = sendmmsg(s.sock, s.msgs + sent, s.nmsg - sent, 0)
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            if s.nseg[sent] > 1:
                if err == EIO or err == EINVAL:
                    s.gso = 0  # e.g. no checksum offload on the way out: it will not come back
                    s.gso_error = err
                sender_send_singly(s, counts, sent)
            else:
                # This datagram cannot go (no route to the peer, EMSGSIZE, ...): skip it.
                counts[C_ENCAP_DROP_SEND_ERROR] += 1
            sent += 1
        else:
            sent += r
    s.nmsg = 0
    s.niov = 0


cdef void sender_send_singly(Sender* s, uint64_t* counts, int m) noexcept nogil:
    cdef mmsghdr one[64]  # FP_GSO_MAX_SEGS
    cdef int j, r, sent = 0, k = s.nseg[m]
    memset(one, 0, sizeof(one))
    for j in range(k):
        one[j].msg_hdr.msg_name = &s.addrs[m]
        one[j].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        one[j].msg_hdr.msg_iov = s.msgs[m].msg_hdr.msg_iov + 2 * j
        one[j].msg_hdr.msg_iovlen = 2
    while sent < k:
        r = sendmmsg(s.sock, one + sent, k - sent, 0)
        if r < 0:
            if errno == EINTR:
                continue
            counts[C_ENCAP_DROP_SEND_ERROR] += 1
            sent += 1
        else:
            sent += r


cdef inline void tun_write(int tun, bint vnet, unsigned char* zero_vnet, unsigned char* p, size_t n,
                           uint64_t* counts, int counter, int packets) noexcept nogil:
    """One packet into the TUN, behind an empty virtio_net_hdr when the TUN has one."""
    cdef iovec iov[2]
    cdef ssize_t r
    if vnet:
        iov[0].iov_base = zero_vnet
        iov[0].iov_len = FP_VNET_LEN
        iov[1].iov_base = p
        iov[1].iov_len = n
        r = writev(tun, iov, 2)
    else:
        r = write(tun, p, n)
    if r < 0:
        counts[counter] += packets


cdef inline void gro_flush(fp_gro* run, int tun, uint64_t* counts) noexcept nogil:
    cdef int k
    if run.nseg == 0:
        return
    k = fp_gro_finish(run)
    if writev(tun, run.iov, k) < 0:
        counts[C_DECAP_DROP_WRITE_ERROR] += run.nseg
    run.nseg = 0


@cython.final
cdef class Datapath:
    """The compiled data path of one node: call run_encap() and run_decap() in two threads.

    tun_fd must be non-blocking; udp_fd is the bound UDP socket; port is the peers' UDP port.
    batch bounds the packets moved per wake-up (1 = one packet per system call).
    vnet_hdr: the TUN carries a virtio_net_hdr (IFF_VNET_HDR); gso: UDP_SEGMENT may be used on udp_fd;
    gro: UDP_GRO is enabled on udp_fd (and, with vnet_hdr, TCP segments are coalesced for the TUN).
    """

    cdef readonly PacketCore core
    cdef readonly int tun_fd
    cdef readonly int udp_fd
    cdef readonly int port
    cdef readonly int batch
    cdef readonly Py_ssize_t bufsize
    cdef readonly bint vnet_hdr
    cdef readonly bint gso
    cdef readonly bint gro
    cdef readonly int gso_error  # errno that switched UDP GSO off while running, 0 if none
    cdef int stop_fd

    def __cinit__(self, PacketCore core not None, int tun_fd, int udp_fd, int port,
                  int batch=DEFAULT_BATCH, *, bint vnet_hdr=False, bint gso=False, bint gro=False):
        self.stop_fd = -1
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch={batch} out of range 1..{MAX_BATCH}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port={port} out of range 1..65535")
        self.core = core
        self.tun_fd = tun_fd
        self.udp_fd = udp_fd
        self.port = port
        self.batch = batch
        self.vnet_hdr = vnet_hdr
        self.gso = gso
        self.gro = gro
        self.gso_error = 0
        # One spare byte beyond the MTU so that a too-long TUN read shows up as a length mismatch.
        self.bufsize = ((core.mtu + 1 + 63) // 64) * 64
        self.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.stop_fd < 0:
            raise OSError(errno, "eventfd failed")

    def __dealloc__(self):
        if self.stop_fd >= 0:
            close(self.stop_fd)

    def stop(self):
        """Ask both loops to return; safe to call more than once and from any thread."""
        cdef uint64_t one = 1
        if self.stop_fd >= 0:
            write(self.stop_fd, &one, 8)

    def run_encap(self):
        """TUN -> UDP until stop(). Raises OSError if the TUN or the socket fails for good."""
        if self.vnet_hdr or self.gso:
            return self.run_encap_offload()
        cdef Py_ssize_t bufsize = self.bufsize
        cdef int batch = self.batch
        cdef unsigned char* bufs = <unsigned char*>calloc(batch, bufsize)
        cdef unsigned char* reply = <unsigned char*>calloc(1, ICMP_REPLY_MAX_C)
        cdef mmsghdr* msgs = <mmsghdr*>calloc(batch, sizeof(mmsghdr))
        cdef iovec* iovs = <iovec*>calloc(batch, sizeof(iovec))
        cdef sockaddr_in* addrs = <sockaddr_in*>calloc(batch, sizeof(sockaddr_in))
        if bufs == NULL or reply == NULL or msgs == NULL or iovs == NULL or addrs == NULL:
            free(bufs); free(reply); free(msgs); free(iovs); free(addrs)
            raise MemoryError()
        cdef int fail = 0
        cdef int i, nmsg, sent, r, v
        cdef ssize_t n
        cdef uint32_t value
        cdef PacketCore core = self.core
        cdef int tun = self.tun_fd, sock = self.udp_fd, stop_fd = self.stop_fd
        cdef unsigned short nport = htons(<unsigned short>self.port)
        for i in range(batch):
            addrs[i].sin_family = AF_INET
            addrs[i].sin_port = nport
        with nogil:
            while True:
                r = wait_readable(tun, stop_fd)
                if r <= 0:
                    fail = 0 if r == 0 else (EBADF if r == -2 else errno)
                    break
                nmsg = 0
                for i in range(batch):
                    n = read(tun, bufs + i * bufsize, bufsize)
                    if n <= 0:
                        if n == 0:
                            fail = EPIPE  # end of file: the TUN (or a fake's peer) went away
                        elif errno != EAGAIN and errno != EINTR:
                            fail = errno
                        break
                    v = core.encap_c(bufs + i * bufsize, n, reply, &value)
                    if v == V_FORWARD:
                        addrs[nmsg].sin_addr.s_addr = htonl(value)
                        iovs[nmsg].iov_base = bufs + i * bufsize
                        iovs[nmsg].iov_len = n
                        msgs[nmsg].msg_hdr.msg_name = &addrs[nmsg]
                        msgs[nmsg].msg_hdr.msg_namelen = sizeof(sockaddr_in)
                        msgs[nmsg].msg_hdr.msg_iov = &iovs[nmsg]
                        msgs[nmsg].msg_hdr.msg_iovlen = 1
                        nmsg += 1
                    elif v == V_ICMP:
                        if write(tun, reply, value) < 0:
                            core.counts[C_ICMP_WRITE_ERROR] += 1
                sent = 0
                while sent < nmsg:
                    r = sendmmsg(sock, msgs + sent, nmsg - sent, 0)
                    if r < 0:
                        if errno == EINTR:
                            continue
                        # This datagram cannot go (no route to the peer, EMSGSIZE, ...): skip it.
                        core.counts[C_ENCAP_DROP_SEND_ERROR] += 1
                        sent += 1
                    else:
                        sent += r
                if fail:
                    break
        free(bufs); free(reply); free(msgs); free(iovs); free(addrs)
        if fail:
            raise OSError(fail, f"encap loop stopped: TUN/UDP error {fail}")

    def run_decap(self):
        """UDP -> TUN until stop(). Raises OSError if the socket or the TUN fails for good."""
        if self.vnet_hdr or self.gro:
            return self.run_decap_offload()
        cdef Py_ssize_t bufsize = self.bufsize
        cdef int batch = self.batch
        cdef unsigned char* bufs = <unsigned char*>calloc(batch, bufsize)
        cdef mmsghdr* msgs = <mmsghdr*>calloc(batch, sizeof(mmsghdr))
        cdef iovec* iovs = <iovec*>calloc(batch, sizeof(iovec))
        cdef sockaddr_in* addrs = <sockaddr_in*>calloc(batch, sizeof(sockaddr_in))
        if bufs == NULL or msgs == NULL or iovs == NULL or addrs == NULL:
            free(bufs); free(msgs); free(iovs); free(addrs)
            raise MemoryError()
        cdef int fail = 0
        cdef int i, r, v
        cdef Py_ssize_t n
        cdef uint32_t value
        cdef PacketCore core = self.core
        cdef int tun = self.tun_fd, sock = self.udp_fd, stop_fd = self.stop_fd
        for i in range(batch):
            iovs[i].iov_base = bufs + i * bufsize
            iovs[i].iov_len = bufsize
            msgs[i].msg_hdr.msg_iov = &iovs[i]
            msgs[i].msg_hdr.msg_iovlen = 1
            msgs[i].msg_hdr.msg_name = &addrs[i]
        with nogil:
            while True:
                r = wait_readable(sock, stop_fd)
                if r <= 0:
                    fail = 0 if r == 0 else (EBADF if r == -2 else errno)
                    break
                for i in range(batch):
                    msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
                    msgs[i].msg_hdr.msg_flags = 0
                # MSG_TRUNC: msg_len is the datagram's real length, so oversized ones are seen as such.
                r = recvmmsg(sock, msgs, batch, MSG_DONTWAIT | MSG_TRUNC, NULL)
                if r < 0:
                    if errno == EAGAIN or errno == EINTR:
                        continue
                    fail = errno
                    break
                for i in range(r):
                    n = msgs[i].msg_len
                    if msgs[i].msg_hdr.msg_flags & MSG_TRUNC and n <= bufsize:
                        n = bufsize + 1
                    v = core.decap_c(bufs + i * bufsize, n, ntohl(addrs[i].sin_addr.s_addr), &value)
                    if v == V_DELIVER:
                        if write(tun, bufs + i * bufsize, value) < 0:
                            core.counts[C_DECAP_DROP_WRITE_ERROR] += 1
        free(bufs); free(msgs); free(iovs); free(addrs)
        if fail:
            raise OSError(fail, f"decap loop stopped: UDP/TUN error {fail}")

    def run_encap_offload(self):
        """run_encap with a virtio_net_hdr on the TUN (TSO super-packets split here) and/or UDP GSO."""
        cdef PacketCore core = self.core
        cdef int tun = self.tun_fd, sock = self.udp_fd, stop_fd = self.stop_fd
        cdef int batch = self.batch, mtu = core.mtu
        cdef bint vnet = self.vnet_hdr
        cdef Py_ssize_t legacy = self.bufsize
        cdef Py_ssize_t slot = FP_VNET_LEN + 65536 if vnet else legacy
        cdef unsigned char* arena = <unsigned char*>malloc(ARENA)
        cdef unsigned char* hdrs = <unsigned char*>malloc(HDR_SCRATCH)
        cdef unsigned char* reply = <unsigned char*>calloc(1, ICMP_REPLY_MAX_C)
        cdef Sender s
        if sender_init(&s, sock, htons(<unsigned short>self.port), self.gso) < 0 or arena == NULL \
                or hdrs == NULL or reply == NULL:
            sender_free(&s); free(arena); free(hdrs); free(reply)
            raise MemoryError()
        cdef uint64_t* counts = &core.counts[0]
        cdef unsigned char zero_vnet[FP_VNET_LEN]
        memset(zero_vnet, 0, FP_VNET_LEN)
        cdef int fail = 0
        cdef int i, j, r, v, bad, plen, stride
        cdef ssize_t n
        cdef Py_ssize_t m, used, hused
        cdef unsigned char* buf
        cdef unsigned char* pkt
        cdef unsigned char* h
        cdef uint32_t value
        cdef fp_vnet vh
        cdef fp_tso t
        cdef int gso_logged = 0
        with nogil:
            while True:
                r = wait_readable(tun, stop_fd)
                if r <= 0:
                    fail = 0 if r == 0 else (EBADF if r == -2 else errno)
                    break
                used = 0
                hused = 0
                for i in range(batch):
                    if used + slot > ARENA:
                        break  # the rest waits for the next wake-up (poll returns at once)
                    buf = arena + used
                    n = read(tun, buf, slot)
                    if n <= 0:
                        if n == 0:
                            fail = EPIPE
                        elif errno != EAGAIN and errno != EINTR:
                            fail = errno
                        break
                    used += (n + 63) & ~63
                    pkt = buf
                    m = n
                    if vnet:
                        if n < FP_VNET_LEN:
                            counts[C_ENCAP_DROP] += 1
                            continue
                        fp_vnet_read(buf, &vh)
                        pkt = buf + FP_VNET_LEN
                        m = n - FP_VNET_LEN
                        if vh.gso_type != FP_GSO_NONE:
                            bad = fp_tso_parse(pkt, m, &vh, &t)
                            if bad < 0 and t.hdr_len + t.gso_size > mtu:
                                bad = 3  # its segments would not fit the MTU
                            if bad >= 0:
                                counts[C_ENCAP_DROP + bad] += 1
                                continue
                            stride = (t.hdr_len + 7) & ~7
                            for j in range(t.nseg):
                                if hused + stride > HDR_SCRATCH:
                                    sender_flush(&s, counts)  # the queued datagrams point into hdrs
                                    hused = 0
                                h = hdrs + hused
                                hused += stride
                                plen = fp_tso_segment(pkt, &t, j, h)
                                # encap_c reads the IP header and 8 bytes beyond: all in h.
                                v = core.encap_c(h, t.hdr_len + plen, reply, &value)
                                if v == V_FORWARD:
                                    sender_push(&s, counts, h, t.hdr_len,
                                                pkt + t.hdr_len + j * t.gso_size, plen, value)
                                elif v == V_ICMP:
                                    tun_write(tun, vnet, zero_vnet, reply, value, counts, C_ICMP_WRITE_ERROR, 1)
                            continue
                        if vh.flags & FP_F_NEEDS_CSUM:
                            if fp_csum_complete(pkt, m, vh.csum_start, vh.csum_offset) < 0:
                                counts[C_ENCAP_DROP + 2] += 1
                                continue
                        if m > legacy:
                            m = legacy  # read as the plain loop would: a too-long packet is a bad length
                    v = core.encap_c(pkt, m, reply, &value)
                    if v == V_FORWARD:
                        sender_push(&s, counts, pkt, m, NULL, 0, value)
                    elif v == V_ICMP:
                        tun_write(tun, vnet, zero_vnet, reply, value, counts, C_ICMP_WRITE_ERROR, 1)
                sender_flush(&s, counts)
                if s.gso_error and not gso_logged:
                    gso_logged = 1
                    with gil:
                        self.gso_error = s.gso_error
                        log.warning("udp GSO refused by the kernel, sending datagrams one by one",
                                    errno=s.gso_error, error=os.strerror(s.gso_error))
                if fail:
                    break
        sender_free(&s); free(arena); free(hdrs); free(reply)
        if fail:
            raise OSError(fail, f"encap loop stopped: TUN/UDP error {fail}")

    def run_decap_offload(self):
        """run_decap with UDP GRO (split by the cmsg's segment size) and/or a virtio_net_hdr on the TUN
        (consecutive TCP segments of one flow coalesced into a super-packet)."""
        cdef PacketCore core = self.core
        cdef int tun = self.tun_fd, sock = self.udp_fd, stop_fd = self.stop_fd
        cdef bint vnet = self.vnet_hdr, gro = self.gro
        cdef bint coalesce = gro and vnet
        cdef int nslot = self.batch if not gro or self.batch < GRO_SLOTS else GRO_SLOTS
        cdef Py_ssize_t slot = GRO_SLOT if gro else self.bufsize
        cdef unsigned char* bufs = <unsigned char*>malloc(nslot * slot)
        cdef mmsghdr* msgs = <mmsghdr*>calloc(nslot, sizeof(mmsghdr))
        cdef iovec* iovs = <iovec*>calloc(nslot, sizeof(iovec))
        cdef sockaddr_in* addrs = <sockaddr_in*>calloc(nslot, sizeof(sockaddr_in))
        cdef unsigned char* ctrl = <unsigned char*>calloc(nslot, CMSG_SZ)
        cdef fp_gro* run = <fp_gro*>calloc(1, sizeof(fp_gro))
        if bufs == NULL or msgs == NULL or iovs == NULL or addrs == NULL or ctrl == NULL or run == NULL:
            free(bufs); free(msgs); free(iovs); free(addrs); free(ctrl); free(run)
            raise MemoryError()
        cdef uint64_t* counts = &core.counts[0]
        cdef unsigned char zero_vnet[FP_VNET_LEN]
        memset(zero_vnet, 0, FP_VNET_LEN)
        cdef int fail = 0
        cdef int i, r, v, hl, g, seglen
        cdef Py_ssize_t n, off
        cdef uint32_t value, sender
        cdef unsigned char* buf
        cdef unsigned char* p
        cdef cmsghdr* c
        for i in range(nslot):
            iovs[i].iov_base = bufs + i * slot
            iovs[i].iov_len = slot
            msgs[i].msg_hdr.msg_iov = &iovs[i]
            msgs[i].msg_hdr.msg_iovlen = 1
            msgs[i].msg_hdr.msg_name = &addrs[i]
        with nogil:
            while True:
                r = wait_readable(sock, stop_fd)
                if r <= 0:
                    fail = 0 if r == 0 else (EBADF if r == -2 else errno)
                    break
                for i in range(nslot):
                    msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
                    msgs[i].msg_hdr.msg_flags = 0
                    if gro:
                        msgs[i].msg_hdr.msg_control = ctrl + i * CMSG_SZ
                        msgs[i].msg_hdr.msg_controllen = CMSG_SZ
                r = recvmmsg(sock, msgs, nslot, MSG_DONTWAIT | MSG_TRUNC, NULL)
                if r < 0:
                    if errno == EAGAIN or errno == EINTR:
                        continue
                    fail = errno
                    break
                for i in range(r):
                    buf = bufs + i * slot
                    n = msgs[i].msg_len
                    if msgs[i].msg_hdr.msg_flags & MSG_TRUNC and n <= slot:
                        n = slot + 1
                    g = 0
                    if gro and not msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                        c = CMSG_FIRSTHDR(&msgs[i].msg_hdr)
                        while c != NULL:
                            if (c.cmsg_level == FP_SOL_UDP and c.cmsg_type == FP_UDP_GRO
                                    and c.cmsg_len >= CMSG_LEN(sizeof(int))):
                                memcpy(&g, CMSG_DATA(c), sizeof(int))
                            c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)
                    # A truncated buffer stays one piece (an oversized drop): no segment past its end.
                    if g <= 0 or g >= n:
                        g = n if n > 0 else 1
                    sender = ntohl(addrs[i].sin_addr.s_addr)
                    off = 0
                    while True:
                        seglen = n - off if n - off < g else g
                        p = buf + off
                        v = core.decap_c(p, seglen, sender, &value)
                        if v == V_DELIVER:
                            if coalesce:
                                hl = fp_gro_candidate(p, value)
                                if hl == 0 or run.nseg == 0 or not fp_gro_append(run, p, value, hl):
                                    gro_flush(run, tun, counts)
                                    if hl:
                                        fp_gro_start(run, p, value, hl)
                                    else:
                                        tun_write(tun, 1, zero_vnet, p, value, counts, C_DECAP_DROP_WRITE_ERROR, 1)
                            else:
                                tun_write(tun, vnet, zero_vnet, p, value, counts, C_DECAP_DROP_WRITE_ERROR, 1)
                        off += g
                        if off >= n:
                            break
                gro_flush(run, tun, counts)
        free(bufs); free(msgs); free(iovs); free(addrs); free(ctrl); free(run)
        if fail:
            raise OSError(fail, f"decap loop stopped: UDP/TUN error {fail}")

