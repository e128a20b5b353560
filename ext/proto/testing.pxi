# Python entry points to the read-before-pick parsers, for tests. Each parser reads its input from
# read-only memory that ends exactly at an inaccessible guard page, so a read past the end (or any
# write) crashes the test instead of passing unnoticed.

cdef uint8_t *guarded(const uint8_t *data, size_t n, int prot, void **base,
                      size_t *span) except NULL:
    # Maps n bytes (a copy of data, or zeros when data is NULL) that end at a PROT_NONE page.
    cdef size_t page = getpagesize()
    cdef size_t size = (n + page - 1) // page * page + page
    cdef uint8_t *mem = <uint8_t *>mmap(NULL, size, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if <void *>mem == MAP_FAILED:
        raise MemoryError()
    cdef uint8_t *start = mem + size - page - n
    if data != NULL:
        memcpy(start, data, n)
    if mprotect(mem + size - page, page, PROT_NONE) or mprotect(mem, size - page, prot):
        munmap(mem, size)
        raise OSError(errno, "mprotect failed")
    base[0] = mem
    span[0] = size
    return start


cdef object sockaddr_tuple(const SockAddr *addr):
    cdef char text[64]
    if addr.sa.sa_family == AF_INET:
        inet_ntop(AF_INET, &addr.v4.sin_addr, text, sizeof(text))
        return (text.decode(), ntohs(addr.v4.sin_port))
    inet_ntop(AF_INET6, &addr.v6.sin6_addr, text, sizeof(text))
    return (text.decode(), ntohs(addr.v6.sin6_port))


cdef int sockaddr_from_tuple(object host_port, SockAddr *addr) except -1:
    host, port = host_port
    cdef bytes raw = host.encode()
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    memset(addr, 0, sizeof(SockAddr))
    if inet_pton(AF_INET, raw, &addr.v4.sin_addr) == 1:
        addr.v4.sin_family = AF_INET
        addr.v4.sin_port = htons(port)
    elif inet_pton(AF_INET6, raw, &addr.v6.sin6_addr) == 1:
        addr.v6.sin6_family = AF_INET6
        addr.v6.sin6_port = htons(port)
    else:
        raise ValueError(f"not a numeric IP address: {host!r}")
    return 0


def parse_proxy(bytes data):
    """proxy_parse on data: None while more is needed, else (length, "PROXY" or "LOCAL", src,
    dst) with src and dst (host, port) or None. Raises ValueError when data is no PROXY header."""
    cdef ProxyHeader header
    cdef void *base
    cdef size_t span
    cdef size_t n = len(data)
    cdef const uint8_t *p = guarded(data, n, PROT_READ, &base, &span)
    cdef int r
    with nogil:
        r = proxy_parse(p, n, &header)
    munmap(base, span)
    if r == PEEK_MORE:
        return None
    if r == PEEK_ERROR:
        raise ValueError("not a PROXY protocol header")
    if header.family == 0:
        return (r, "PROXY" if header.command == PROXY_PROXY else "LOCAL", None, None)
    return (r, "PROXY", sockaddr_tuple(&header.src), sockaddr_tuple(&header.dst))


def build_proxy(int version, src, dst, size_t cap=PROXY_MAX_HEADER):
    """proxy_build: a v1 or v2 header for (host, port) src -> dst, or LOCAL when src is None,
    written into cap bytes. Raises ValueError where proxy_build fails."""
    cdef SockAddr src_addr
    cdef SockAddr dst_addr
    cdef void *base
    cdef size_t span
    cdef uint8_t *out
    cdef int r
    if src is not None:
        sockaddr_from_tuple(src, &src_addr)
    if dst is not None:
        sockaddr_from_tuple(dst, &dst_addr)
    out = guarded(NULL, cap, PROT_READ | PROT_WRITE, &base, &span)
    with nogil:
        r = proxy_build(version, NULL if src is None else &src_addr,
                        NULL if dst is None else &dst_addr, out, cap)
    header = out[:r] if r >= 0 else None
    munmap(base, span)
    if header is None:
        raise ValueError("cannot build this PROXY header")
    return header


def parse_sni(bytes data):
    """sni_parse on data: None while more is needed, else the lower-case server name ("" when
    the hello has none). Raises ValueError when data is no TLS ClientHello."""
    cdef SniResult result
    cdef void *base
    cdef size_t span
    cdef size_t n = len(data)
    cdef const uint8_t *p = guarded(data, n, PROT_READ, &base, &span)
    cdef int r
    with nogil:
        r = sni_parse(p, n, &result)
    munmap(base, span)
    if r == PEEK_MORE:
        return None
    if r == PEEK_ERROR:
        raise ValueError("not a TLS ClientHello")
    return result.name[:result.len].decode("ascii") if result.found else ""


def match_sni(list patterns, str name):
    """sni_match: the index in patterns (host names or "*.suffix") of the route for name, or -1."""
    cdef list keep = []
    cdef SniRoute *routes = <SniRoute *>calloc(len(patterns) or 1, sizeof(SniRoute))
    cdef bytes raw_name = name.encode()
    cdef bytes raw
    cdef int i
    if routes == NULL:
        raise MemoryError()
    try:
        for i, pattern in enumerate(patterns):
            routes[i].wildcard = pattern.startswith("*.")
            raw = pattern[1:].encode() if routes[i].wildcard else pattern.encode()
            keep.append(raw)
            routes[i].pattern = raw
            routes[i].len = len(raw)
            routes[i].pool = i
        return sni_match(routes, len(patterns), raw_name, len(raw_name))
    finally:
        free(routes)
