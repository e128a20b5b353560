# PROXY protocol v1 and v2: parse and build. Placeholder until the parsers land.

cdef int proxy_parse(const uint8_t *data, size_t len, ProxyHeader *out) noexcept nogil:
    return PEEK_ERROR


cdef int proxy_build(int version, const SockAddr *src, const SockAddr *dst, uint8_t *out,
                     size_t cap) noexcept nogil:
    return -1
