# The batched socket calls and their structures, declared once for the loops that use them:
# fastpath/io.pyx (the udp data path) and benchmarks/udpflood.pyx (the harness's generator and sink).

from posix.uio cimport iovec


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
        MSG_WAITFORONE
