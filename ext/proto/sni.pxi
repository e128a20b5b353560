# TLS ClientHello SNI. Placeholder until the parsers land.

cdef int sni_parse(const uint8_t *data, size_t len, SniResult *out) noexcept nogil:
    return PEEK_ERROR


cdef int sni_match(const SniRoute *routes, int n, const char *name, int len) noexcept nogil:
    return -1
