# accept-proxy: whether a client address lies in one of a frontend's trusted networks.

cdef bint is_trusted(const Frontend *fe, const SockAddr *addr) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    cdef const uint8_t *raw
    cdef const TrustedNet *net
    cdef int i, whole, rest
    if addr.sa.sa_family == AF_INET:
        raw = <const uint8_t *>&addr.v4.sin_addr
    elif addr.sa.sa_family == AF_INET6:
        raw = <const uint8_t *>addr.v6.sin6_addr.s6_addr
    else:
        return False
    for i in range(fe.ntrusted):
        net = &fe.trusted[i]
        if net.family != addr.sa.sa_family:
            continue
        whole = net.prefix >> 3
        rest = net.prefix & 7
        if whole and memcmp(raw, net.addr, whole) != 0:
            continue
        if rest and ((raw[whole] ^ net.addr[whole]) & (0xff << (8 - rest)) & 0xff):
            continue
        return True
    return False
