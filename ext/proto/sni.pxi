# TLS ClientHello: reassembling it from its records and reading the server_name it asks for
# (RFC 8446 section 4.1.2, RFC 6066 section 3), and matching that name against SNI routes.

cdef enum:
    TLS_RECORD_HEADER = 5
    TLS_RECORD_MAX = 16384          # the largest record body a peer may send
    TLS_HANDSHAKE = 22
    TLS_CLIENT_HELLO = 1
    TLS_EXT_SERVER_NAME = 0
    SNI_HOST_NAME = 0
    SNI_NAME_MAX = 255
    # The hello message (4-byte header and body) fits in PEEK_MAX bytes of records, so in this.
    HELLO_MAX = PEEK_MAX - TLS_RECORD_HEADER


cdef inline uint32_t tls_u16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef int hello_server_name(const uint8_t *p, size_t n, SniResult *out) noexcept nogil:
    # The body of a ClientHello (after its 4-byte header): 1 with out filled, or PEEK_ERROR.
    # Called without the GIL; touches no Python objects.
    cdef size_t pos = 34            # legacy_version (2) and random (32)
    cdef size_t length, ext_end, ext_type, ext_len, list_end, name_len, i
    cdef bint seen_server_name = False
    cdef uint8_t c
    if n < pos + 1:
        return PEEK_ERROR
    length = p[pos]                 # legacy_session_id
    if length > 32:
        return PEEK_ERROR
    pos += 1 + length
    if pos + 2 > n:
        return PEEK_ERROR
    length = tls_u16(p + pos)          # cipher_suites: two bytes each, at least one
    if length < 2 or length % 2:
        return PEEK_ERROR
    pos += 2 + length
    if pos + 1 > n:
        return PEEK_ERROR
    length = p[pos]                 # legacy_compression_methods: at least one
    if length < 1:
        return PEEK_ERROR
    pos += 1 + length
    if pos > n:
        return PEEK_ERROR
    if pos == n:                    # no extensions at all (a pre-TLS 1.2 client)
        return 1
    if pos + 2 > n:
        return PEEK_ERROR
    ext_end = pos + 2 + tls_u16(p + pos)
    if ext_end != n:
        return PEEK_ERROR
    pos += 2
    while pos < ext_end:
        if pos + 4 > ext_end:
            return PEEK_ERROR
        ext_type = tls_u16(p + pos)
        ext_len = tls_u16(p + pos + 2)
        pos += 4
        if pos + ext_len > ext_end:
            return PEEK_ERROR
        if ext_type == TLS_EXT_SERVER_NAME:
            if seen_server_name:        # an extension appears at most once
                return PEEK_ERROR
            seen_server_name = True
            if ext_len < 2 or tls_u16(p + pos) != ext_len - 2:
                return PEEK_ERROR
            list_end = pos + ext_len
            pos += 2
            while pos < list_end:
                if pos + 3 > list_end:
                    return PEEK_ERROR
                name_len = tls_u16(p + pos + 1)
                if pos + 3 + name_len > list_end:
                    return PEEK_ERROR
                if p[pos] == SNI_HOST_NAME:
                    if out.found or name_len == 0 or name_len > SNI_NAME_MAX:
                        return PEEK_ERROR
                    # An ASCII host name; a trailing dot (absolute form) is dropped.
                    for i in range(name_len):
                        c = p[pos + 3 + i]
                        if c <= 0x20 or c >= 0x7F:
                            return PEEK_ERROR
                        out.name[i] = <char>(c + 32 if c'A' <= c <= c'Z' else c)
                    out.len = <int>name_len
                    if out.name[out.len - 1] == b'.':
                        out.len -= 1
                        if out.len == 0:
                            return PEEK_ERROR
                    out.name[out.len] = 0
                    out.found = 1
                pos += 3 + name_len
            continue
        pos += ext_len
    return 1


cdef int sni_parse(const uint8_t *data, size_t len, SniResult *out) noexcept nogil:
    # 1: a complete ClientHello, out filled; PEEK_MORE; PEEK_ERROR: not a TLS handshake record,
    # not a ClientHello (an SSLv2 hello included), malformed, or longer than PEEK_MAX bytes of
    # records. The hello may be split over several records: they are reassembled in scratch.
    # Called without the GIL; touches no Python objects.
    cdef uint8_t scratch[HELLO_MAX]
    cdef size_t off = 0             # start of the current record
    cdef size_t have = 0            # bytes of the hello message gathered in scratch
    cdef size_t need = 4            # its length once its header is in, the header until then
    cdef size_t body, avail, take
    cdef size_t pos
    out.found = 0
    out.len = 0
    out.name[0] = 0
    while have < need:
        if off >= len:
            return PEEK_MORE
        if data[off] != TLS_HANDSHAKE:
            return PEEK_ERROR
        if off + 1 >= len:
            return PEEK_MORE
        if data[off + 1] != 3:
            return PEEK_ERROR
        if off + TLS_RECORD_HEADER > len:
            return PEEK_MORE
        body = tls_u16(data + off + 3)
        if body == 0 or body > TLS_RECORD_MAX:
            return PEEK_ERROR
        off += TLS_RECORD_HEADER
        if off + (need - have) > PEEK_MAX:
            return PEEK_ERROR
        avail = peek_min(body, len - off)
        pos = 0
        while pos < avail and have < need:
            take = peek_min(avail - pos, need - have)
            memcpy(scratch + have, data + off + pos, take)
            have += take
            pos += take
            if scratch[0] != TLS_CLIENT_HELLO:
                return PEEK_ERROR
            if need == 4 and have >= 4:
                need = 4 + ((<size_t>scratch[1] << 16) | (<size_t>scratch[2] << 8) | scratch[3])
                if need > HELLO_MAX or off + pos + (need - have) > PEEK_MAX:
                    return PEEK_ERROR
        if have < need and avail < body:
            return PEEK_MORE
        off += body
    return hello_server_name(scratch + 4, need - 4, out)


cdef int sni_match(const SniRoute *routes, int n, const char *name, int len) noexcept nogil:
    # The index of the route for a lower-case name, or -1. An exact name wins over wildcards;
    # among wildcards the longest suffix wins, the first of equals. A wildcard ".example.test"
    # matches "a.example.test" but not "example.test".
    # Called without the GIL; touches no Python objects.
    cdef int i
    cdef int best = -1
    cdef int best_len = 0
    for i in range(n):
        if routes[i].wildcard:
            if (routes[i].len < len and routes[i].len > best_len
                    and memcmp(name + len - routes[i].len, routes[i].pattern, routes[i].len) == 0):
                best = i
                best_len = routes[i].len
        elif routes[i].len == len and memcmp(name, routes[i].pattern, len) == 0:
            return i
    return best
