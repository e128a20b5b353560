# p2c: the power of two random choices (Mitzenmacher; Envoy's default least-request balancer).
# Draw two distinct backends at random, weighted, and take the one with fewer active
# connections per unit of weight, counting every worker's connections. Nearly as even as
# leastconn, but two workers acting on the same stale counts rarely pick the same backend, and
# a pick reads two counters instead of all of them. Called without the GIL; touches no Python
# objects.

cdef int p2c_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.state was built by sampler_build.
    cdef const Sampler *s = <const Sampler *>table.state
    cdef uint64_t r
    cdef int a, b, first
    cdef const Backend *x
    cdef const Backend *y
    if s != NULL and s.equal and ntried == 0 and s.n >= 2:
        # the common case: a uniform pair of distinct backends from one draw, no rejections
        r = next_random(table)
        first = <int>((r & 0xFFFFFFFFULL) % <uint64_t>s.n)
        a = s.index[first]
        b = s.index[(first + 1 + <int>((r >> 32) % <uint64_t>(s.n - 1))) % s.n]
    else:
        a = sample_excluding(table, s, tried, ntried, -1)
        if a < 0:
            return -1
        b = sample_excluding(table, s, tried, ntried, a)
        if b < 0:
            return a
    x = &table.backends[a]
    y = &table.backends[b]
    # (active + 1) / weight, compared without division; ties go to the first draw
    if (backend_active(y) + 1) * x.weight < (backend_active(x) + 1) * y.weight:
        return b
    return a


cdef Algorithm P2C
P2C.name = b"p2c"
P2C.needs = NEEDS_GLOBAL_COUNTS
P2C.build = sampler_build
P2C.release = sampler_release
P2C.pick = p2c_pick
P2C.counts_changed = no_counts
P2C.adopted = no_adopted
register_algorithm(&P2C)
