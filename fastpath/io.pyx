# cython: language_level=3
"""The udp backend's I/O loops: TUN -> UDP (encap) and UDP -> TUN (decap), in batches.

The backend runs both directions in one thread (run()) or each in its own (run_encap(), run_decap());
a loop holds the GIL only to start and to report how it ended. Per wake-up a loop moves at most `batch`
packets (non-blocking TUN reads, one recvmmsg), then polls again together with the stop eventfd, so a
stop request is never starved. After writing into the TUN, the decap side also forwards what that write
made the kernel answer at once (an echo reply, an ACK, new data after an ACK) if the encap loop is not
busy: one thread wake-up less per round trip. A mutex keeps the TUN to one reader at a time, so packets
leave in the order read.
Buffers are sized from the TUN MTU. The verdicts come from fastpath.core (PacketCore.encap_c /
decap_c); send and write failures are counted there too.

Offloads (each one optional, chosen by the backend from what the kernel accepted; see offload.h):
vnet_hdr: the TUN was opened with IFF_VNET_HDR (and TUNSETOFFLOAD TSO4): every read and write carries a
virtio_net_hdr, reads may be TCP super-packets, which are split into MTU-size segments here; gso: the
datagrams of one peer go out in one sendmsg with UDP_SEGMENT; gro: the socket has UDP_GRO, received
buffers are split by the cmsg's segment size, and (with vnet_hdr) consecutive TCP segments of one flow,
or equal-size UDP datagrams of one flow, are coalesced into one super-packet for the TUN. Every segment goes through the packet core on its
own, so routes, TTL, ICMP, ingress checks and counters are per packet as without offloads, and each
datagram on the wire still carries exactly one IPv4 packet of at most the MTU.

Auto real-time (auto_rtprio > 0, FLANNELPY_UDP_RTPRIO=auto): every 100 ms each loop counts what it moved
(segments of TCP super-packets, other packets read alone from the TUN) and reads its own run-queue wait, and
rt_step decides whether it runs under SCHED_RR for the next window; with two loops either one's vote takes both.
"""

cimport cython
from libc.errno cimport EAGAIN, EBADF, EINTR, EINVAL, EIO, EPIPE, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
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

from posix.uio cimport iovec, writev

from fastpath.offload cimport (
    FP_F_NEEDS_CSUM,
    FP_GSO_MAX_BYTES,
    FP_GSO_MAX_SEGS,
    FP_GSO_NONE,
    FP_SOL_UDP,
    FP_UDP_GRO,
    FP_UDP_SEGMENT,
    FP_VNET_LEN,
    fp_csum_complete,
    fp_gro,
    fp_gro_append,
    fp_gro_candidate,
    fp_gro_finish,
    fp_gro_start,
    fp_rd32,
    fp_tso,
    fp_tso_parse,
    fp_tso_segment,
    fp_vnet,
    fp_vnet_read,
)

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
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_trylock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)

cdef extern from "<sched.h>" nogil:
    struct sched_param:
        int sched_priority
    int sched_setscheduler(int pid, int policy, const sched_param* param)
    enum:
        SCHED_OTHER
        SCHED_RR

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char* path, int flags)
    enum:
        O_RDONLY
        O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void* buf, size_t count, long offset)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)

cdef extern from *:
    """
    #define FP_ATOMIC_ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_RELAXED)
    #define FP_ATOMIC_OR(p, v) __atomic_or_fetch((p), (v), __ATOMIC_RELAXED)
    #define FP_ATOMIC_AND(p, v) __atomic_and_fetch((p), (v), __ATOMIC_RELAXED)
    """
    long FP_ATOMIC_ADD(long* p, long v) nogil
    int FP_ATOMIC_OR(int* p, int v) nogil
    int FP_ATOMIC_AND(int* p, int v) nogil
    int __builtin_popcount(unsigned int x) nogil
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

from fastpath.sockets cimport (
    AF_INET,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    MSG_DONTWAIT,
    MSG_TRUNC,
    cmsghdr,
    mmsghdr,
    msghdr,
    recvmmsg,
    sendmmsg,
)

DEFAULT_BATCH = 64
MAX_BATCH = 1024


cdef enum:
    ARENA = 512 * 1024          # TUN reads of one wake-up (a read takes 64 KiB + header at most)
    HDR_SCRATCH = 256 * 1024    # segment headers of one wake-up
    MSGCAP = 1024               # messages per sendmmsg
    DGRAMCAP = 4096             # datagrams pending (two iovecs each: headers, payload)
    CMSG_SZ = 32                # room for one UDP_SEGMENT / UDP_GRO control message
    GRO_SLOTS = 64              # receive buffers per recvmmsg with UDP_GRO
    GRO_SLOT = 65536 + 64       # a coalesced buffer holds one UDP datagram's worth at most
    RT_WINDOW_MS = 100          # auto real-time: how often a loop looks at its traffic and its waiting
    RT_MIN_SEGS = 2000          # packets per window below which a loop is not carrying a bulk transfer
    RT_HISTORY = 10             # windows (1 s) over which a loop looks for sparse packets
    RT_FLOWS = 8                # bulk flows remembered (see rt_sparse)
    RT_SPARSE_WINDOWS = 4       # of the last RT_HISTORY windows of a transfer, with sparse packets
    SEND_WAIT_MS = 20           # per flush, at most this long waiting for room in a full socket buffer


cdef struct Sender:
    int sock
    int stop_fd                 # a stop request ends a wait for room in the send buffer
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


cdef int sender_init(Sender* s, int sock, unsigned short nport, int gso, int stop_fd) noexcept:
    memset(s, 0, sizeof(Sender))
    s.sock = sock
    s.stop_fd = stop_fd
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


cdef int send_room(Sender* s, int* budget_ms) noexcept nogil:
    """The socket's send buffer is full (a congested way to some peer): wait for room, at most what is left
    of the flush's budget and never past a stop request. 1: try again; 0: give up, drop."""
    cdef pollfd fds[2]
    cdef uint64_t t0
    cdef int r, spent
    if budget_ms[0] <= 0:
        return 0
    fds[0].fd = s.sock
    fds[0].events = POLLOUT
    fds[0].revents = 0
    fds[1].fd = s.stop_fd
    fds[1].events = POLLIN
    fds[1].revents = 0
    t0 = mono_ns()
    r = poll(fds, 2 if s.stop_fd >= 0 else 1, budget_ms[0])
    spent = <int>((mono_ns() - t0) // 1000000)
    budget_ms[0] -= spent if spent > 0 else 1
    if r <= 0 or fds[1].revents:
        budget_ms[0] = 0  # out of time, or asked to stop: drop the rest at once
        return 0
    return 1 if fds[0].revents & POLLOUT else 0


cdef void sender_flush(Sender* s, uint64_t* counts) noexcept nogil:
    """Sends every queued message with sendmmsg; a GSO message the kernel refuses goes out datagram by
    datagram (and EIO/EINVAL, which stay, switch GSO off); a failed datagram is counted, not retried.
    The sends never block: with the send buffer full the flush waits at most SEND_WAIT_MS for room (and
    not past a stop request), then drops; a blocked send would hold up the other direction and every
    other peer, and stop() too."""
    cdef int m, r, sent = 0, err, budget = SEND_WAIT_MS
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
        r = sendmmsg(s.sock, s.msgs + sent, s.nmsg - sent, MSG_DONTWAIT)
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN:
                if send_room(s, &budget):
                    continue
                counts[C_ENCAP_DROP_SEND_ERROR] += s.nseg[sent]  # every datagram of the message
                sent += 1
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
        r = sendmmsg(s.sock, one + sent, k - sent, MSG_DONTWAIT)
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


cdef inline int gro_flush(fp_gro* run, int tun, uint64_t* counts) noexcept nogil:
    """Writes the run into the TUN; how many TCP segments went as one super-packet (0: none, or one alone)."""
    cdef int k, tcp_segs
    if run.nseg == 0:
        return 0
    tcp_segs = run.nseg if run.nseg > 1 and run.proto == 6 else 0
    k = fp_gro_finish(run)
    if writev(tun, run.iov, k) < 0:
        counts[C_DECAP_DROP_WRITE_ERROR] += run.nseg
    run.nseg = 0
    return tcp_segs


@cython.final
cdef class Datapath:
    """The compiled data path of one node: call run() in one thread, or run_encap() and run_decap() in two.

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
    cdef readonly int auto_rtprio  # SCHED_RR priority a loop takes while it carries a bulk transfer; 0: never
    cdef readonly long rt_threads  # loops under SCHED_RR right now (auto mode)
    cdef readonly long rt_promotions  # times a loop went to SCHED_RR (auto mode)
    cdef readonly int rt_error  # errno that switched auto mode off (the kernel refused SCHED_RR), 0 if none
    cdef uint64_t sparse  # packets read from the TUN that are not bulk (rt_sparse), under encap_lock
    cdef int rt_votes  # loops whose own rule wants SCHED_RR (bit 1 the encap or only loop, bit 2 decap)
    cdef int stop_fd
    cdef pthread_mutex_t encap_lock  # one TUN reader at a time, so packets leave in the order they were read
    cdef Encap* live_encap  # the encap loop's state while it runs, for the decap loop's hand-off

    def __cinit__(self, PacketCore core not None, int tun_fd, int udp_fd, int port,
                  int batch=DEFAULT_BATCH, *, bint vnet_hdr=False, bint gso=False, bint gro=False,
                  int auto_rtprio=0):
        self.stop_fd = -1
        pthread_mutex_init(&self.encap_lock, NULL)
        self.live_encap = NULL
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch={batch} out of range 1..{MAX_BATCH}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port={port} out of range 1..65535")
        if not 0 <= auto_rtprio <= 99:
            raise ValueError(f"auto_rtprio={auto_rtprio} out of range 0..99")
        self.auto_rtprio = auto_rtprio
        self.rt_threads = 0
        self.rt_promotions = 0
        self.rt_error = 0
        self.sparse = 0
        self.rt_votes = 0
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
        pthread_mutex_destroy(&self.encap_lock)

    def stop(self):
        """Ask both loops to return; safe to call more than once and from any thread."""
        cdef uint64_t one = 1
        if self.stop_fd >= 0:
            write(self.stop_fd, &one, 8)

    def run(self):
        """Both directions in the calling thread until stop(). Raises OSError if the TUN or the socket
        fails for good."""
        self.run_loop(1, 1)

    def run_encap(self):
        """TUN -> UDP until stop(). Raises OSError if the TUN or the socket fails for good."""
        self.run_loop(1, 0)

    def run_decap(self):
        """UDP -> TUN until stop(). Raises OSError if the socket or the TUN fails for good."""
        self.run_loop(0, 1)

    cdef run_loop(self, bint do_encap, bint do_decap):
        cdef Encap e
        cdef Decap d
        memset(&e, 0, sizeof(Encap))
        memset(&d, 0, sizeof(Decap))
        try:
            if do_encap:
                encap_init(&e, self)
            if do_decap:
                decap_init(&d, self)
            if do_encap:
                with nogil:
                    pthread_mutex_lock(&self.encap_lock)
                    self.live_encap = &e
                    pthread_mutex_unlock(&self.encap_lock)
            self.loop(&e if do_encap else NULL, &d if do_decap else NULL)
        finally:
            if do_encap:
                with nogil:
                    pthread_mutex_lock(&self.encap_lock)
                    self.live_encap = NULL
                    pthread_mutex_unlock(&self.encap_lock)
            encap_free(&e)
            decap_free(&d)

    cdef loop(self, Encap* e, Decap* d):
        cdef PacketCore core = self.core
        cdef int fail = 0, r, tun_ready, sock_ready, change
        cdef int stop_fd = self.stop_fd
        cdef int gso_logged = 0
        cdef RtAuto rt
        cdef uint64_t now
        rt_init(&rt, self.auto_rtprio, self.sparse, 1 if e != NULL else 2)
        try:  # a log call below takes the GIL and could raise: the thread must not stay real-time
            with nogil:
                while True:
                    r = wait_any(e.tun if e != NULL else -1, d.sock if d != NULL else -1, stop_fd,
                                 &tun_ready, &sock_ready, rt_timeout(&rt, e, d))
                    if r <= 0:
                        fail = 0 if r == 0 else (EBADF if r == -2 else errno)
                        break
                    if rt.prio:
                        now = mono_ns()
                        if now - rt.t0 >= RT_WINDOW_MS * 1000000:
                            change = rt_tick(&rt, e, d, self.sparse, now, &self.rt_votes)
                            if change:
                                FP_ATOMIC_ADD(&self.rt_threads, change)
                                if change > 0:
                                    FP_ATOMIC_ADD(&self.rt_promotions, 1)
                            if rt.err:
                                with gil:  # the start-up probe passed; said once, whichever loop saw it
                                    if self.rt_error == 0:
                                        self.rt_error = rt.err
                                        log.warning("auto real-time priority refused by the kernel: the data "
                                                    "path stays under normal scheduling", errno=rt.err,
                                                    error=os.strerror(rt.err),
                                                    hint="FLANNELPY_UDP_RTPRIO=0 silences this")
                                rt.err = 0
                    if tun_ready:
                        pthread_mutex_lock(&self.encap_lock)
                        fail = encap_batch(e, core)
                        pthread_mutex_unlock(&self.encap_lock)
                    if sock_ready and not fail:
                        fail = decap_batch(d, core)
                        # A TUN write runs the receiver's stack at once: an echo reply, a TCP ACK or new
                        # data after an ACK may already wait in the TUN. Forward it from this thread rather
                        # than wake the encap loop (one thread wake-up less per round trip); skip if that
                        # loop is busy.
                        if not fail and d.wrote and pthread_mutex_trylock(&self.encap_lock) == 0:
                            if self.live_encap != NULL:
                                fail = encap_batch(self.live_encap, core)
                            pthread_mutex_unlock(&self.encap_lock)
                    if e != NULL and e.s.gso_error and not gso_logged:
                        gso_logged = 1
                        with gil:
                            self.gso_error = e.s.gso_error
                            log.warning("udp GSO refused by the kernel, sending datagrams one by one",
                                        errno=e.s.gso_error, error=os.strerror(e.s.gso_error))
                    if fail:
                        break
        finally:
            if rt.on:
                FP_ATOMIC_ADD(&self.rt_threads, -1)
            rt_close(&rt, &self.rt_votes)
        if fail:
            raise OSError(fail, f"data path loop stopped: TUN/UDP error {fail}")


cdef struct RtAuto:
    int prio            # SCHED_RR priority while promoted; 0: auto mode off for this loop
    int on              # the loop runs under SCHED_RR now
    int vote            # its own rule wants it (with two loops, either one's vote promotes both)
    int bit             # its bit in the datapath's votes
    int stat_fd         # the loop thread's /proc/thread-self/schedstat
    int err             # errno of a refused switch (auto mode then ends for this loop)
    uint64_t t0         # the window's start and the counters then
    uint64_t wait0
    uint64_t segs0
    uint64_t bulk0
    uint64_t sparse0
    unsigned int hist   # bit i: the window i ago, of the current transfer, saw sparse packets


cdef inline uint64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef uint64_t thread_wait_ns(int fd) noexcept nogil:
    """The calling thread's time spent runnable but waiting for a CPU (schedstat's second field), in ns."""
    cdef char buf[96]
    cdef ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0)
    cdef ssize_t i = 0
    cdef uint64_t v = 0
    if n <= 0:
        return 0
    while i < n and buf[i] != 32:
        i += 1
    i += 1
    while i < n and 48 <= buf[i] <= 57:
        v = v * 10 + <uint64_t>(buf[i] - 48)
        i += 1
    return v


cdef inline uint32_t rt_flow(const unsigned char* p) noexcept nogil:
    """A TCP packet's flow (addresses and ports) as a nonzero hash; p holds at least the IP header + 4."""
    cdef int ihl = (p[0] & 15) * 4
    cdef uint32_t h = (fp_rd32(p + 12) ^ (fp_rd32(p + 16) * <uint32_t>2654435761U)
                       ^ (fp_rd32(p + ihl) * <uint32_t>40503U))
    return h if h else 1


cdef inline void rt_note_bulk(uint32_t* flows, const unsigned char* p) noexcept nogil:
    """Remembers the flow of a TCP super-packet (the last RT_FLOWS of them)."""
    cdef uint32_t h = rt_flow(p)
    cdef int i
    for i in range(RT_FLOWS):
        if flows[i] == h:
            return
    for i in range(RT_FLOWS - 1, 0, -1):
        flows[i] = flows[i - 1]
    flows[0] = h


cdef inline int rt_sparse(const uint32_t* flows, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Whether a packet read alone from the TUN is traffic that would wait behind a bulk transfer: not TCP
    (ping, DNS, other UDP), or TCP data of a flow that sent no super-packet lately (a request, a reply).
    Pure ACKs are not, nor the lone segments of a bulk flow (the tail of each write, a retransmission)."""
    cdef int ihl, i
    cdef uint32_t h
    if n < 20 or p[9] != 6:
        return 1
    ihl = (p[0] & 15) * 4
    if n < ihl + 20:
        return 1
    if ((p[2] << 8) | p[3]) <= ihl + ((p[ihl + 12] >> 4) * 4):
        return 0  # no payload: an ACK, a SYN, a FIN
    h = rt_flow(p)
    for i in range(RT_FLOWS):
        if flows[i] == h:
            return 0
    return 1


def rt_sparse_packets(packets: list) -> list:
    """For tests: rt_sparse of each (bulk, packet) in order, bulk packets noted as super-packets first."""
    cdef uint32_t flows[8]  # RT_FLOWS
    cdef const unsigned char[::1] b
    memset(flows, 0, sizeof(flows))
    out = []
    for bulk, packet in packets:
        b = packet
        if bulk:
            if b.shape[0] < 20 or b.shape[0] < (b[0] & 15) * 4 + 4:  # what rt_flow reads (a parsed TSO packet)
                raise ValueError("a bulk packet shorter than its IPv4 header and 4 bytes of TCP")
            rt_note_bulk(flows, &b[0])
        else:
            out.append(bool(rt_sparse(flows, &b[0], b.shape[0])))
    return out


cdef inline int rt_step(int on, unsigned int* hist, uint64_t segs, uint64_t bulk, uint64_t wait_ns,
                        uint64_t window_ns, int sparse) noexcept nogil:
    """Ends a window (segs packets, bulk of them parts of TCP super-packets, wait_ns runnable but not running,
    sparse: other packets came): whether the loop runs under SCHED_RR in the next one."""
    # SCHED_RR costs a bulk transfer ~10% and a quarter more CPU per GB (the loop preempts the sender at
    # every super-packet), so a loop takes it only where it pays (docs/benchmarks.md, "Real-time priority
    # while it pays"): it carries a bulk TCP transfer (most packets parts of super-packets) that makes it wait
    # for a CPU a tenth of the time or more, while other traffic keeps coming beside it: in 4 of the last 10
    # windows of this transfer (a ping, requests). Transfers in a row open and close with a few messages
    # (iperf3's: up to 3 windows with them where one run ends and the next starts); a window without a
    # transfer starts over. It stays while both last; under SCHED_RR the waiting is gone, so that signal
    # cannot hold it.
    # Rates, not counts: a loop that slept ends its window late (at its next wake-up).
    cdef uint64_t per_window = RT_MIN_SEGS * window_ns // (RT_WINDOW_MS * 1000000)
    cdef int transfer = 2 * segs >= per_window and 4 * bulk >= segs
    if transfer:
        hist[0] = ((hist[0] << 1) | <unsigned int>(sparse != 0)) & ((1 << RT_HISTORY) - 1)
    else:
        hist[0] = 0
    if not on:
        return (segs >= per_window and 2 * bulk >= segs and 10 * wait_ns >= window_ns
                and __builtin_popcount(hist[0]) >= RT_SPARSE_WINDOWS)
    return transfer and hist[0] != 0


def rt_decisions(windows: list) -> list:
    """For tests: a loop's SCHED_RR decisions over (segs, bulk, wait_ns, sparse[, window_ms]) windows (100 ms
    unless given), starting under normal scheduling (every switch granted)."""
    cdef int on = 0
    cdef unsigned int hist = 0
    out = []
    for w in windows:
        segs, bulk, wait_ns, sparse = w[:4]
        on = rt_step(on, &hist, segs, bulk, wait_ns, (w[4] if len(w) > 4 else RT_WINDOW_MS) * 1000000, sparse)
        out.append(bool(on))
    return out


cdef inline uint64_t rt_segs(Encap* e, Decap* d) noexcept nogil:
    return (e.segs if e != NULL else 0) + (d.segs if d != NULL else 0)


cdef inline int rt_timeout(RtAuto* rt, Encap* e, Decap* d) noexcept nogil:
    """How long the loop may sleep (ms, -1 for ever): until its window ends if that window saw packets or
    the loop is real-time, so that a window closes on time even when the traffic stops (and a real-time
    loop that falls idle steps down); for ever if it is idle under normal scheduling."""
    cdef int64_t left
    if rt.prio == 0 or (not rt.on and rt_segs(e, d) == rt.segs0):
        return -1
    left = <int64_t>(rt.t0 + RT_WINDOW_MS * 1000000) - <int64_t>mono_ns()
    return <int>(left // 1000000) + 1 if left > 0 else 0


cdef void rt_init(RtAuto* rt, int prio, uint64_t sparse, int bit) noexcept:
    memset(rt, 0, sizeof(RtAuto))
    rt.stat_fd = -1
    rt.sparse0 = sparse
    rt.bit = bit
    if prio:
        rt.stat_fd = c_open(b"/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC)
        if rt.stat_fd >= 0:  # without it the waiting cannot be seen: never promote
            rt.prio = prio
            rt.t0 = mono_ns()
            rt.wait0 = thread_wait_ns(rt.stat_fd)


cdef void rt_close(RtAuto* rt, int* votes) noexcept nogil:
    cdef sched_param param
    FP_ATOMIC_AND(votes, ~rt.bit)
    if rt.on:
        param.sched_priority = 0
        sched_setscheduler(0, SCHED_OTHER, &param)
        rt.on = 0
    if rt.stat_fd >= 0:
        close(rt.stat_fd)
        rt.stat_fd = -1


cdef int rt_tick(RtAuto* rt, Encap* e, Decap* d, uint64_t sparse, uint64_t now, int* votes) noexcept nogil:
    """Ends a window: +1 promoted, -1 demoted, 0 unchanged (rt.err set if the kernel refused). With a loop
    per direction, the one carrying the transfer decides for both: the other one carries its ACKs and the
    other traffic's answers, which would wait there as before."""
    cdef uint64_t segs = rt_segs(e, d), bulk = 0, wait
    cdef int want, change = 0
    cdef sched_param param
    if e != NULL:
        bulk += e.bulk
    if d != NULL:
        bulk += d.bulk
    wait = thread_wait_ns(rt.stat_fd)
    rt.vote = rt_step(rt.vote, &rt.hist, segs - rt.segs0, bulk - rt.bulk0, wait - rt.wait0, now - rt.t0,
                      sparse != rt.sparse0)
    if rt.vote:
        want = FP_ATOMIC_OR(votes, rt.bit) != 0
    else:
        want = FP_ATOMIC_AND(votes, ~rt.bit) != 0
    if want != rt.on:
        param.sched_priority = rt.prio if want else 0
        if sched_setscheduler(0, SCHED_RR if want else SCHED_OTHER, &param) == 0:
            rt.on = want
            change = 1 if want else -1
        else:
            rt.err = errno
            rt.prio = 0
            rt.vote = 0
            FP_ATOMIC_AND(votes, ~rt.bit)
    rt.t0 = now
    rt.wait0 = wait
    rt.segs0 = segs
    rt.bulk0 = bulk
    rt.sparse0 = sparse
    return change


cdef inline int wait_any(int tun, int sock, int stop_fd, int* tun_ready, int* sock_ready,
                         int timeout_ms) noexcept nogil:
    """Waits until the TUN or the socket (-1: not watched) is readable or timeout_ms (-1: none) passed: 1
    with the ready flags set (both 0 on a timeout); 0 stop requested; -1 poll failed (errno); -2 an fd
    was closed under us (EBADF)."""
    cdef pollfd fds[3]
    cdef int r, n = 1, i
    fds[0].fd = stop_fd
    fds[0].events = POLLIN
    if tun >= 0:
        fds[n].fd = tun
        fds[n].events = POLLIN
        n += 1
    if sock >= 0:
        fds[n].fd = sock
        fds[n].events = POLLIN
        n += 1
    while True:
        for i in range(n):
            fds[i].revents = 0
        r = poll(fds, n, timeout_ms)
        if r < 0:
            if errno == EINTR:
                continue
            return -1
        tun_ready[0] = 0
        sock_ready[0] = 0
        if r == 0:
            return 1  # timed out: the caller looks at its window
        if fds[0].revents:
            return 0
        for i in range(1, n):
            if fds[i].revents & POLLNVAL:
                return -2  # an fd was closed under us
            if fds[i].revents:
                if fds[i].fd == tun:
                    tun_ready[0] = 1
                else:
                    sock_ready[0] = 1
        if tun_ready[0] or sock_ready[0]:
            return 1


cdef struct Encap:
    int tun
    int batch
    int mtu
    int vnet
    Py_ssize_t legacy       # the read size without vnet_hdr: a longer packet is cut and so a bad length
    Py_ssize_t slot
    unsigned char* arena
    unsigned char* hdrs
    unsigned char* reply
    uint64_t* counts
    uint64_t segs           # packets read, segments of super-packets counted one by one
    uint64_t bulk           # of those, segments of TCP super-packets (a bulk transfer)
    uint64_t* sparse        # the datapath's count of packets that are neither (see rt_sparse)
    uint32_t flows[8]       # RT_FLOWS recent bulk flows
    Sender s
    unsigned char zero_vnet[16]


cdef int encap_init(Encap* e, Datapath dp) except -1:
    e.tun = dp.tun_fd
    e.batch = dp.batch
    e.mtu = dp.core.mtu
    e.vnet = dp.vnet_hdr
    e.legacy = dp.bufsize
    e.slot = FP_VNET_LEN + 65536 if dp.vnet_hdr else dp.bufsize
    e.counts = &dp.core.counts[0]
    e.sparse = &dp.sparse
    e.arena = <unsigned char*>malloc(ARENA)
    e.hdrs = <unsigned char*>malloc(HDR_SCRATCH)
    e.reply = <unsigned char*>calloc(1, ICMP_REPLY_MAX_C)
    if (sender_init(&e.s, dp.udp_fd, htons(<unsigned short>dp.port), dp.gso, dp.stop_fd) < 0
            or e.arena == NULL or e.hdrs == NULL or e.reply == NULL):
        raise MemoryError()
    return 0


cdef void encap_free(Encap* e) noexcept:
    sender_free(&e.s)
    free(e.arena)
    free(e.hdrs)
    free(e.reply)
    e.arena = NULL
    e.hdrs = NULL
    e.reply = NULL


cdef int encap_batch(Encap* e, PacketCore core) noexcept nogil:
    """Up to `batch` TUN reads (super-packets split into segments), every packet through the core,
    the datagrams sent. 0, or the errno that ends the loop."""
    cdef int i, j, v, bad, plen, stride, fail = 0
    cdef ssize_t n
    cdef Py_ssize_t m, used = 0, hused = 0
    cdef unsigned char* buf
    cdef unsigned char* pkt
    cdef unsigned char* h
    cdef uint32_t value
    cdef fp_vnet vh
    cdef fp_tso t
    cdef uint64_t* counts = e.counts
    for i in range(e.batch):
        if used + e.slot > ARENA:
            break  # the rest waits for the next wake-up (poll returns at once)
        buf = e.arena + used
        n = read(e.tun, buf, e.slot)
        if n <= 0:
            if n == 0:
                fail = EPIPE  # end of file: the TUN (or a fake's peer) went away
            elif errno != EAGAIN and errno != EINTR:
                fail = errno
            break
        used += (n + 63) & ~63
        pkt = buf
        m = n
        if e.vnet:
            if n < FP_VNET_LEN:
                counts[C_ENCAP_DROP] += 1
                continue
            fp_vnet_read(buf, &vh)
            pkt = buf + FP_VNET_LEN
            m = n - FP_VNET_LEN
            if vh.gso_type != FP_GSO_NONE:
                bad = fp_tso_parse(pkt, m, &vh, &t)
                if bad < 0 and t.hdr_len + t.gso_size > e.mtu:
                    bad = 3  # its segments would not fit the MTU
                if bad >= 0:
                    counts[C_ENCAP_DROP + bad] += 1
                    continue
                e.segs += t.nseg
                if t.nseg > 1:
                    e.bulk += t.nseg
                    rt_note_bulk(e.flows, pkt)
                stride = (t.hdr_len + 7) & ~7
                for j in range(t.nseg):
                    if hused + stride > HDR_SCRATCH:
                        sender_flush(&e.s, counts)  # the queued datagrams point into hdrs
                        hused = 0
                    h = e.hdrs + hused
                    hused += stride
                    plen = fp_tso_segment(pkt, &t, j, h)
                    # encap_c reads the IP header and 8 bytes beyond: all in h.
                    v = core.encap_c(h, t.hdr_len + plen, e.reply, &value)
                    if v == V_FORWARD:
                        sender_push(&e.s, counts, h, t.hdr_len, pkt + t.hdr_len + j * t.gso_size, plen, value)
                    elif v == V_ICMP:
                        tun_write(e.tun, 1, e.zero_vnet, e.reply, value, counts, C_ICMP_WRITE_ERROR, 1)
                continue
            if vh.flags & FP_F_NEEDS_CSUM:
                if fp_csum_complete(pkt, m, vh.csum_start, vh.csum_offset) < 0:
                    counts[C_ENCAP_DROP + 2] += 1
                    continue
            if m > e.legacy:
                m = e.legacy  # as a read without vnet_hdr would: a too-long packet is a bad length
        e.segs += 1
        if rt_sparse(e.flows, pkt, m):
            e.sparse[0] += 1
        v = core.encap_c(pkt, m, e.reply, &value)
        if v == V_FORWARD:
            sender_push(&e.s, counts, pkt, m, NULL, 0, value)
        elif v == V_ICMP:
            tun_write(e.tun, e.vnet, e.zero_vnet, e.reply, value, counts, C_ICMP_WRITE_ERROR, 1)
    sender_flush(&e.s, counts)
    return fail


cdef struct Decap:
    int tun
    int sock
    int vnet
    int gro
    int coalesce
    int nslot
    Py_ssize_t slot
    unsigned char* bufs
    mmsghdr* msgs
    iovec* iovs
    sockaddr_in* addrs
    unsigned char* ctrl
    fp_gro* run
    uint64_t* counts
    uint64_t segs           # datagrams received
    uint64_t bulk           # of those, written into the TUN as part of a TCP super-packet
    int wrote               # the last batch wrote something into the TUN
    unsigned char zero_vnet[16]


cdef int decap_init(Decap* d, Datapath dp) except -1:
    cdef int i
    d.tun = dp.tun_fd
    d.sock = dp.udp_fd
    d.vnet = dp.vnet_hdr
    d.gro = dp.gro
    d.coalesce = dp.gro and dp.vnet_hdr
    d.nslot = dp.batch if not dp.gro or dp.batch < GRO_SLOTS else GRO_SLOTS
    d.slot = GRO_SLOT if dp.gro else dp.bufsize
    d.counts = &dp.core.counts[0]
    d.bufs = <unsigned char*>malloc(d.nslot * d.slot)
    d.msgs = <mmsghdr*>calloc(d.nslot, sizeof(mmsghdr))
    d.iovs = <iovec*>calloc(d.nslot, sizeof(iovec))
    d.addrs = <sockaddr_in*>calloc(d.nslot, sizeof(sockaddr_in))
    d.ctrl = <unsigned char*>calloc(d.nslot, CMSG_SZ)
    d.run = <fp_gro*>calloc(1, sizeof(fp_gro))
    if d.bufs == NULL or d.msgs == NULL or d.iovs == NULL or d.addrs == NULL or d.ctrl == NULL or d.run == NULL:
        raise MemoryError()
    for i in range(d.nslot):
        d.iovs[i].iov_base = d.bufs + i * d.slot
        d.iovs[i].iov_len = d.slot
        d.msgs[i].msg_hdr.msg_iov = &d.iovs[i]
        d.msgs[i].msg_hdr.msg_iovlen = 1
        d.msgs[i].msg_hdr.msg_name = &d.addrs[i]
    return 0


cdef void decap_free(Decap* d) noexcept:
    free(d.bufs); free(d.msgs); free(d.iovs); free(d.addrs); free(d.ctrl); free(d.run)
    d.bufs = NULL
    d.msgs = NULL
    d.iovs = NULL
    d.addrs = NULL
    d.ctrl = NULL
    d.run = NULL


cdef int decap_batch(Decap* d, PacketCore core) noexcept nogil:
    """One recvmmsg: coalesced buffers split by the UDP_GRO size, every datagram through the core,
    in-order TCP segments of one flow written as one super-packet. 0, or the errno that ends the loop."""
    cdef int i, r, v, hl, g, seglen
    cdef Py_ssize_t n, off
    cdef uint32_t value, sender
    cdef unsigned char* buf
    cdef unsigned char* p
    cdef cmsghdr* c
    cdef uint64_t* counts = d.counts
    for i in range(d.nslot):
        d.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        d.msgs[i].msg_hdr.msg_flags = 0
        if d.gro:
            d.msgs[i].msg_hdr.msg_control = d.ctrl + i * CMSG_SZ
            d.msgs[i].msg_hdr.msg_controllen = CMSG_SZ
    # MSG_TRUNC: msg_len is the datagram's real length, so oversized ones are seen as such.
    d.wrote = 0
    r = recvmmsg(d.sock, d.msgs, d.nslot, MSG_DONTWAIT | MSG_TRUNC, NULL)
    if r < 0:
        if errno == EAGAIN or errno == EINTR:
            return 0
        return errno
    for i in range(r):
        buf = d.bufs + i * d.slot
        n = d.msgs[i].msg_len
        if d.msgs[i].msg_hdr.msg_flags & MSG_TRUNC and n <= d.slot:
            n = d.slot + 1
        g = 0
        if d.gro and not d.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
            c = CMSG_FIRSTHDR(&d.msgs[i].msg_hdr)
            while c != NULL:
                if (c.cmsg_level == FP_SOL_UDP and c.cmsg_type == FP_UDP_GRO
                        and c.cmsg_len >= CMSG_LEN(sizeof(int))):
                    memcpy(&g, CMSG_DATA(c), sizeof(int))
                c = CMSG_NXTHDR(&d.msgs[i].msg_hdr, c)
        # A truncated buffer stays one piece (an oversized drop): no segment past its end.
        if g <= 0 or g >= n:
            g = n if n > 0 else 1
        sender = ntohl(d.addrs[i].sin_addr.s_addr)
        off = 0
        while True:
            d.segs += 1
            seglen = n - off if n - off < g else g
            p = buf + off
            v = core.decap_c(p, seglen, sender, &value)
            if v == V_DELIVER:
                d.wrote = 1
                if d.coalesce:
                    hl = fp_gro_candidate(p, value)
                    if hl == 0 or d.run.nseg == 0 or not fp_gro_append(d.run, p, value, hl):
                        d.bulk += gro_flush(d.run, d.tun, counts)
                        if hl:
                            fp_gro_start(d.run, p, value, hl)
                        else:
                            tun_write(d.tun, 1, d.zero_vnet, p, value, counts, C_DECAP_DROP_WRITE_ERROR, 1)
                else:
                    tun_write(d.tun, d.vnet, d.zero_vnet, p, value, counts, C_DECAP_DROP_WRITE_ERROR, 1)
            off += g
            if off >= n:
                break
    d.bulk += gro_flush(d.run, d.tun, counts)  # the run points into bufs, which the next recvmmsg overwrites
    return 0
