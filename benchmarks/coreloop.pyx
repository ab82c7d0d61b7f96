# cython: language_level=3, boundscheck=False, wraparound=False
"""C loops over fastpath.core's encap_c/decap_c, the calls fastpath/io.pyx makes per packet.

Compiled at run time by benchmarks/packetcore.py (pyximport) so the harness can time the packet core
without the Python call in between; the TTL is put back before each call, as in the Python loops.
"""

from libc.stdint cimport uint32_t

from fastpath.core cimport PacketCore


def encap_loop(PacketCore core, unsigned char[::1] packet not None, unsigned char[::1] reply not None,
               Py_ssize_t iterations):
    cdef uint32_t value = 0
    cdef Py_ssize_t i, n = packet.shape[0]
    cdef unsigned char* p = &packet[0]
    cdef unsigned char* r = &reply[0]
    cdef int verdict = 0
    with nogil:
        for i in range(iterations):
            p[8] = 64
            verdict = core.encap_c(p, n, r, &value)
    return verdict, value


def decap_loop(PacketCore core, unsigned char[::1] packet not None, uint32_t sender, Py_ssize_t iterations):
    cdef uint32_t value = 0
    cdef Py_ssize_t i, n = packet.shape[0]
    cdef unsigned char* p = &packet[0]
    cdef int verdict = 0
    with nogil:
        for i in range(iterations):
            p[8] = 64
            verdict = core.decap_c(p, n, sender, &value)
    return verdict, value
