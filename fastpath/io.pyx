# cython: language_level=3
"""The udp backend's I/O loops: TUN -> UDP (encap) and UDP -> TUN (decap), in batches.

Each loop runs in its own thread started by the backend and holds the GIL only to start and to
report how it ended. Per wake-up a loop moves at most `batch` packets (non-blocking TUN reads, one
recvmmsg), then polls again together with the stop eventfd, so a stop request is never starved.
Buffers are sized from the TUN MTU. The verdicts come from fastpath.core (PacketCore.encap_c /
decap_c); send and write failures are counted there too.
"""

cimport cython
from libc.errno cimport EAGAIN, EBADF, EINTR, EPIPE, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

from fastpath.core cimport (
    C_DECAP_DROP_WRITE_ERROR,
    C_ENCAP_DROP_SEND_ERROR,
    C_ICMP_WRITE_ERROR,
    ICMP_REPLY_MAX_C,
    V_DELIVER,
    V_FORWARD,
    V_ICMP,
    PacketCore,
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

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

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


@cython.final
cdef class Datapath:
    """The compiled data path of one node: call run_encap() and run_decap() in two threads.

    tun_fd must be non-blocking; udp_fd is the bound UDP socket; port is the peers' UDP port.
    batch bounds the packets moved per wake-up (1 = one packet per system call).
    """

    cdef readonly PacketCore core
    cdef readonly int tun_fd
    cdef readonly int udp_fd
    cdef readonly int port
    cdef readonly int batch
    cdef readonly Py_ssize_t bufsize
    cdef int stop_fd

    def __cinit__(self, PacketCore core not None, int tun_fd, int udp_fd, int port,
                  int batch=DEFAULT_BATCH):
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
