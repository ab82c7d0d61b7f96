# cython: language_level=3, boundscheck=False, wraparound=False
"""A batched UDP generator and sink: sendmmsg/recvmmsg loops without the GIL.

iperf3 sends and receives one datagram per system call, which caps it at a few tens of thousands of
packets per second on this kind of machine, below what the fast data paths forward. These loops move up
to `batch` datagrams per call. Compiled at run time (pyximport) by benchmarks/flood.py; the sockets are
made and configured in Python, only the hot loops are here.
"""

from libc.errno cimport EAGAIN, ECONNREFUSED, EINTR, ENOBUFS, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec


from fastpath.sockets cimport MSG_WAITFORONE, mmsghdr, recvmmsg, sendmmsg


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct Batch:
    unsigned char* data
    iovec* iov
    mmsghdr* msgs


cdef int _batch_alloc(Batch* b, int n, int size) noexcept nogil:
    cdef int i
    b.data = <unsigned char*>calloc(n, size)
    b.iov = <iovec*>calloc(n, sizeof(iovec))
    b.msgs = <mmsghdr*>calloc(n, sizeof(mmsghdr))
    if b.data == NULL or b.iov == NULL or b.msgs == NULL:
        return -1
    for i in range(n):
        b.iov[i].iov_base = b.data + <size_t>i * size
        b.iov[i].iov_len = size
        b.msgs[i].msg_hdr.msg_iov = &b.iov[i]
        b.msgs[i].msg_hdr.msg_iovlen = 1
    return 0


cdef void _batch_free(Batch* b) noexcept nogil:
    free(b.data)
    free(b.iov)
    free(b.msgs)


def send_loop(int fd, int size, double seconds, int batch):
    """sendmmsg `batch` datagrams of `size` bytes on the connected socket `fd` until `seconds` have passed.

    Returns (datagrams the kernel accepted, seconds sent, {errno: count} of failed calls, fatal errno or 0).
    ENOBUFS, EAGAIN and ECONNREFUSED (an ICMP error from a previous datagram) are counted and the loop goes
    on; any other error stops it.
    """
    cdef Batch b
    cdef uint64_t sent = 0
    cdef int n, err, fatal = 0, i
    cdef double start, deadline, end
    cdef int counts[256]
    for i in range(256):
        counts[i] = 0
    if batch < 1 or size < 1:
        raise ValueError("batch and size must be at least 1")
    if _batch_alloc(&b, batch, size) != 0:
        _batch_free(&b)
        raise MemoryError()
    for i in range(batch * size):
        b.data[i] = <unsigned char>(i & 0xFF)
    with nogil:
        start = _now()
        deadline = start + seconds
        end = start
        while end < deadline:
            n = sendmmsg(fd, b.msgs, batch, 0)
            if n > 0:
                sent += n
            elif n < 0:
                err = errno
                if err != EINTR:
                    counts[err & 0xFF] += 1
                    if err != EAGAIN and err != ENOBUFS and err != ECONNREFUSED:
                        fatal = err
                        end = _now()
                        break
            end = _now()
    _batch_free(&b)
    return sent, end - start, {e: counts[e] for e in range(256) if counts[e]}, fatal


def sink_loop(int fd, int size, double window, double idle, double wait_first, int batch):
    """recvmmsg on the bound socket `fd` (with a receive timeout set) and count what arrives.

    Waits up to `wait_first` seconds for the first datagram; from it on, counts for `window` seconds and then
    until nothing has arrived for `idle` seconds (queued datagrams drain), at most `window + 4 * idle` in all.
    Returns (datagrams, bytes, seconds from the first to the last datagram, seconds from the first datagram
    to the end of the window, fatal errno or 0).
    """
    cdef Batch b
    cdef uint64_t packets = 0, nbytes = 0
    cdef int n, i, err, fatal = 0
    cdef double start, first = -1.0, last = -1.0, now
    if batch < 1 or size < 1:
        raise ValueError("batch and size must be at least 1")
    if _batch_alloc(&b, batch, size) != 0:
        _batch_free(&b)
        raise MemoryError()
    with nogil:
        start = _now()
        while True:
            n = recvmmsg(fd, b.msgs, batch, MSG_WAITFORONE, NULL)
            now = _now()
            if n > 0:
                if first < 0:
                    first = now
                last = now
                packets += n
                for i in range(n):
                    nbytes += b.msgs[i].msg_len
            elif n < 0:
                err = errno
                if err != EAGAIN and err != EINTR:
                    fatal = err
                    break
            if first < 0:
                if now - start > wait_first:
                    break
            elif now - first > window + 4 * idle:
                break
            elif now - first > window and now - last > idle:
                break
    _batch_free(&b)
    if first < 0:
        return 0, 0, 0.0, 0.0, fatal
    return packets, nbytes, last - first, min(window, last - first), fatal
