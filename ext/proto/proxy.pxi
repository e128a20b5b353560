# PROXY protocol v1 (text) and v2 (binary) headers, as HAProxy's doc/proxy-protocol.txt defines
# them: parsing what a client sends first, building what we send a backend first.
#
# The parser is incremental: each call gets every byte received so far, and a prefix of a valid
# header answers PEEK_MORE. Anything that no longer can become a valid header is refused at once.

from libc.string cimport strlen

cdef const char *PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

cdef enum:
    PROXY_V2_HEADER = 16        # signature, version and command, family, 16-bit length
    PROXY_V2_ADDRS_INET = 12    # two IPv4 addresses and two ports
    PROXY_V2_ADDRS_INET6 = 36
    PROXY_V2_ADDRS_UNIX = 216   # two 108-byte paths
    V1_ADDR4_MAX = 15           # "255.255.255.255"
    V1_ADDR6_MAX = 45           # "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
    V1_PORT_MAX = 5
    BUILD_SCRATCH = 128         # room for a v1 line with the longest text inet_ntop may write


cdef inline size_t peek_min(size_t a, size_t b) noexcept nogil:
    return a if a < b else b


cdef inline bint v1_is_hex(uint8_t c) noexcept nogil:
    return (c >= b'0' and c <= b'9') or (c >= b'a' and c <= b'f') or (c >= b'A' and c <= b'F')


cdef bint v1_dotted_quad_prefix(const uint8_t *tok, size_t n) noexcept nogil:
    # tok can begin a dotted quad: octets 0-255 without leading zeros, at most three dots.
    # Called without the GIL; touches no Python objects.
    cdef size_t i
    cdef int dots = 0, digits = 0, octet = 0
    for i in range(n):
        if tok[i] == b'.':
            if digits == 0 or dots == 3:
                return False
            dots += 1
            digits = 0
            octet = 0
        elif tok[i] >= b'0' and tok[i] <= b'9':
            if digits == 1 and octet == 0:
                return False
            octet = octet * 10 + (tok[i] - c'0')
            digits += 1
            if octet > 255:
                return False
        else:
            return False
    return True


cdef int v1_address(const uint8_t *tok, size_t n, bint whole, int family,
                    void *addr) noexcept nogil:
    # One address of a TCP4/TCP6 line: PEEK_MORE while it may still grow, 1 once parsed into addr.
    # Called without the GIL; touches no Python objects.
    cdef char text[V1_ADDR6_MAX + 1]
    cdef size_t i
    if whole and n == 0:
        return PEEK_ERROR
    if family == AF_INET:
        if n > V1_ADDR4_MAX or not v1_dotted_quad_prefix(tok, n):
            return PEEK_ERROR
    else:
        if n > V1_ADDR6_MAX:
            return PEEK_ERROR
        for i in range(n):
            if not (tok[i] == b':' or tok[i] == b'.' or v1_is_hex(tok[i])):
                return PEEK_ERROR
    if not whole:
        return PEEK_MORE
    memcpy(text, tok, n)
    text[n] = 0
    return 1 if inet_pton(family, text, addr) == 1 else PEEK_ERROR


cdef int v1_port(const uint8_t *tok, size_t n, bint whole, uint16_t *port) noexcept nogil:
    # A decimal port, 0-65535, without sign, padding or leading zeros.
    # Called without the GIL; touches no Python objects.
    cdef size_t i
    cdef uint32_t value = 0
    if n > V1_PORT_MAX or (whole and n == 0) or (n > 1 and tok[0] == b'0'):
        return PEEK_ERROR
    for i in range(n):
        if tok[i] < b'0' or tok[i] > b'9':
            return PEEK_ERROR
        value = value * 10 + (tok[i] - c'0')
    if value > 65535:
        return PEEK_ERROR
    if not whole:
        return PEEK_MORE
    port[0] = htons(<uint16_t>value)
    return 1


cdef int v1_protocol(const uint8_t *tok, size_t n, bint whole, int *family) noexcept nogil:
    # The protocol field: family AF_INET for TCP4, AF_INET6 for TCP6, 0 for UNKNOWN; PEEK_MORE
    # while it is a prefix of one of them.
    # Called without the GIL; touches no Python objects.
    if not whole:
        if n <= 7 and memcmp(tok, b"UNKNOWN", n) == 0:
            return PEEK_MORE
        if n <= 4 and memcmp(tok, b"TCP", peek_min(n, 3)) == 0 and (
                n < 4 or tok[3] == b'4' or tok[3] == b'6'):
            return PEEK_MORE
        return PEEK_ERROR
    if n == 7 and memcmp(tok, b"UNKNOWN", 7) == 0:
        family[0] = 0
    elif n == 4 and memcmp(tok, b"TCP4", 4) == 0:
        family[0] = AF_INET
    elif n == 4 and memcmp(tok, b"TCP6", 4) == 0:
        family[0] = AF_INET6
    else:
        return PEEK_ERROR
    return 1


cdef int proxy_parse_v1(const uint8_t *data, size_t len, ProxyHeader *out) noexcept nogil:
    # data starts with "PROXY ". The line is "PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n", single
    # spaces, or "PROXY UNKNOWN" and anything up to the CRLF.
    # Called without the GIL; touches no Python objects.
    cdef size_t end = 0         # the CR ending the line, or the bytes seen so far
    cdef size_t pos = 6
    cdef size_t stop
    cdef bint complete = False  # the whole line, CRLF included, has arrived
    cdef bint whole             # the current field is followed by its separator
    cdef int field, family = 0, r = 0
    cdef uint16_t sport = 0, dport = 0
    cdef void *src_addr
    cdef void *dst_addr
    # The CR of a line of at most PROXY_V1_MAX bytes is at most two bytes before that.
    while end < peek_min(len, PROXY_V1_MAX - 1) and data[end] != b'\r':
        end += 1
    if end < peek_min(len, PROXY_V1_MAX - 1):      # data[end] is the CR
        if end + 1 < len:
            if data[end + 1] != b'\n':
                return PEEK_ERROR
            complete = True
    elif len >= PROXY_V1_MAX - 1:
        return PEEK_ERROR
    memset(out, 0, sizeof(ProxyHeader))
    for field in range(5):
        stop = pos
        while stop < end and data[stop] != b' ':
            stop += 1
        # A field is whole once its space is seen, or the CR ends the line after it.
        whole = stop < end or (stop < len and data[stop] == b'\r')
        if field == 0:
            r = v1_protocol(data + pos, stop - pos, whole, &family)
            if r != 1:
                return r
            if family == 0:     # UNKNOWN: the rest of the line is ignored
                if not complete:
                    return PEEK_MORE
                out.command = PROXY_LOCAL
                return <int>(end + 2)
            if family == AF_INET:
                src_addr = &out.src.v4.sin_addr
                dst_addr = &out.dst.v4.sin_addr
            else:
                src_addr = &out.src.v6.sin6_addr
                dst_addr = &out.dst.v6.sin6_addr
        elif field == 1:
            r = v1_address(data + pos, stop - pos, whole, family, src_addr)
        elif field == 2:
            r = v1_address(data + pos, stop - pos, whole, family, dst_addr)
        elif field == 3:
            r = v1_port(data + pos, stop - pos, whole, &sport)
        else:
            r = v1_port(data + pos, stop - pos, whole, &dport)
        if r != 1:
            return r
        # r == 1: the field is whole. Only the destination port may end the line.
        if (stop == end) != (field == 4):
            return PEEK_ERROR
        pos = stop + 1
    if not complete:
        return PEEK_MORE
    out.command = PROXY_PROXY
    out.family = family
    if family == AF_INET:
        out.src.v4.sin_family = AF_INET
        out.src.v4.sin_port = sport
        out.dst.v4.sin_family = AF_INET
        out.dst.v4.sin_port = dport
    else:
        out.src.v6.sin6_family = AF_INET6
        out.src.v6.sin6_port = sport
        out.dst.v6.sin6_family = AF_INET6
        out.dst.v6.sin6_port = dport
    return <int>(end + 2)


cdef int proxy_parse_v2(const uint8_t *data, size_t len, ProxyHeader *out) noexcept nogil:
    # data starts with the full 12-byte signature.
    # Called without the GIL; touches no Python objects.
    cdef int command, family
    cdef size_t body, addrs
    if len < 13:
        return PEEK_MORE
    if data[12] >> 4 != 2 or (data[12] & 0xF) > PROXY_PROXY:
        return PEEK_ERROR
    command = data[12] & 0xF
    if len < 14:
        return PEEK_MORE
    # With LOCAL the family is ignored, as the specification asks.
    if command == PROXY_LOCAL or data[13] == 0x00 or data[13] == 0x31 or data[13] == 0x32:
        family = 0
        addrs = PROXY_V2_ADDRS_UNIX if command == PROXY_PROXY and data[13] != 0x00 else 0
    elif data[13] == 0x11 or data[13] == 0x12:
        family = AF_INET
        addrs = PROXY_V2_ADDRS_INET
    elif data[13] == 0x21 or data[13] == 0x22:
        family = AF_INET6
        addrs = PROXY_V2_ADDRS_INET6
    else:
        return PEEK_ERROR
    if len < PROXY_V2_HEADER:
        return PEEK_MORE
    body = (<size_t>data[14] << 8) | data[15]
    if body < addrs:
        return PEEK_ERROR
    if len < PROXY_V2_HEADER + body:
        return PEEK_MORE
    memset(out, 0, sizeof(ProxyHeader))
    out.command = command
    out.family = family
    data += PROXY_V2_HEADER
    if family == AF_INET:
        out.src.v4.sin_family = AF_INET
        out.dst.v4.sin_family = AF_INET
        memcpy(&out.src.v4.sin_addr, data, 4)
        memcpy(&out.dst.v4.sin_addr, data + 4, 4)
        memcpy(&out.src.v4.sin_port, data + 8, 2)
        memcpy(&out.dst.v4.sin_port, data + 10, 2)
    elif family == AF_INET6:
        out.src.v6.sin6_family = AF_INET6
        out.dst.v6.sin6_family = AF_INET6
        memcpy(&out.src.v6.sin6_addr, data, 16)
        memcpy(&out.dst.v6.sin6_addr, data + 16, 16)
        memcpy(&out.src.v6.sin6_port, data + 32, 2)
        memcpy(&out.dst.v6.sin6_port, data + 34, 2)
    # TLVs, if any, follow the addresses: consumed with the header, not interpreted.
    return <int>(PROXY_V2_HEADER + body)


cdef int proxy_parse(const uint8_t *data, size_t len, ProxyHeader *out) noexcept nogil:
    # > 0: a complete header of that many bytes, out filled; PEEK_MORE; PEEK_ERROR.
    # A v2 header may be up to 16 + 65535 bytes: the caller bounds what it is willing to read.
    # Called without the GIL; touches no Python objects.
    if len == 0:
        return PEEK_MORE
    if data[0] == b'P':
        if memcmp(data, b"PROXY ", peek_min(len, 6)) != 0:
            return PEEK_ERROR
        return PEEK_MORE if len < 6 else proxy_parse_v1(data, len, out)
    if data[0] == b'\r':
        if memcmp(data, PROXY_V2_SIGNATURE, peek_min(len, 12)) != 0:
            return PEEK_ERROR
        return PEEK_MORE if len < 12 else proxy_parse_v2(data, len, out)
    return PEEK_ERROR


cdef size_t v1_put(char *out, const char *text) noexcept nogil:
    cdef size_t n = strlen(text)
    memcpy(out, text, n)
    return n


cdef size_t v1_put_port(char *out, uint16_t port) noexcept nogil:
    # A port (host byte order) in decimal, without leading zeros.
    cdef char digits[V1_PORT_MAX]
    cdef size_t n = 0, i
    while True:
        digits[n] = <char>(c'0' + port % 10)
        n += 1
        port //= 10
        if port == 0:
            break
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


cdef int proxy_build(int version, const SockAddr *src, const SockAddr *dst, uint8_t *out,
                     size_t cap) noexcept nogil:
    # A header announcing src -> dst, or LOCAL when src is NULL. Returns its length, or -1 when
    # cap is too small, the version unknown, or the families unsupported or mismatched.
    # Called without the GIL; touches no Python objects.
    cdef char header[BUILD_SCRATCH]
    cdef char text[V1_ADDR6_MAX + 1]
    cdef size_t n = 0
    cdef int family = 0
    if src != NULL:
        if dst == NULL or src.sa.sa_family != dst.sa.sa_family:
            return -1
        family = src.sa.sa_family
        if family != AF_INET and family != AF_INET6:
            return -1
    if version == 1:
        if family == 0:
            n = v1_put(header, "PROXY UNKNOWN\r\n")
        else:
            n = v1_put(header, "PROXY TCP4 " if family == AF_INET else "PROXY TCP6 ")
            if family == AF_INET:
                inet_ntop(AF_INET, &src.v4.sin_addr, text, sizeof(text))
            else:
                inet_ntop(AF_INET6, &src.v6.sin6_addr, text, sizeof(text))
            n += v1_put(header + n, text)
            header[n] = b' '
            n += 1
            if family == AF_INET:
                inet_ntop(AF_INET, &dst.v4.sin_addr, text, sizeof(text))
            else:
                inet_ntop(AF_INET6, &dst.v6.sin6_addr, text, sizeof(text))
            n += v1_put(header + n, text)
            header[n] = b' '
            n += 1
            n += v1_put_port(header + n, ntohs(src.v4.sin_port if family == AF_INET
                                               else src.v6.sin6_port))
            header[n] = b' '
            n += 1
            n += v1_put_port(header + n, ntohs(dst.v4.sin_port if family == AF_INET
                                               else dst.v6.sin6_port))
            n += v1_put(header + n, "\r\n")
    elif version == 2:
        memcpy(header, PROXY_V2_SIGNATURE, 12)
        header[12] = 0x21 if family != 0 else 0x20     # version 2, PROXY or LOCAL
        n = PROXY_V2_HEADER
        if family == AF_INET:
            header[13] = 0x11
            memcpy(header + n, &src.v4.sin_addr, 4)
            memcpy(header + n + 4, &dst.v4.sin_addr, 4)
            memcpy(header + n + 8, &src.v4.sin_port, 2)
            memcpy(header + n + 10, &dst.v4.sin_port, 2)
            n += PROXY_V2_ADDRS_INET
        elif family == AF_INET6:
            header[13] = 0x21
            memcpy(header + n, &src.v6.sin6_addr, 16)
            memcpy(header + n + 16, &dst.v6.sin6_addr, 16)
            memcpy(header + n + 32, &src.v6.sin6_port, 2)
            memcpy(header + n + 34, &dst.v6.sin6_port, 2)
            n += PROXY_V2_ADDRS_INET6
        else:
            header[13] = 0x00
        header[14] = <char>((n - PROXY_V2_HEADER) >> 8)
        header[15] = <char>((n - PROXY_V2_HEADER) & 0xFF)
    else:
        return -1
    if n > cap or n > PROXY_MAX_HEADER:
        return -1
    memcpy(out, header, n)
    return <int>n
