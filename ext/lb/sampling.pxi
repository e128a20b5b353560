# Weighted random sampling of the eligible backends, shared by random and p2c. build() keeps the
# eligible backends with positive weights and their cumulative weights; a sample is a binary
# search for a random point in [0, total weight). Every function here is called without the GIL
# and touches no Python objects.

cdef enum:
    SAMPLE_ATTEMPTS = 4     # rejections (tried, or the first of a pair) before an exact scan


cdef struct Sampler:
    int n
    bint equal              # every weight the same: sample an index directly
    int64_t total
    int32_t *index          # eligible backends with weight > 0
    int64_t *cumulative     # cumulative[k]: total weight of index[0:k+1]


cdef int sampler_build(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.eligible is current.
    cdef int j, i, n = 0
    cdef int64_t total = 0
    cdef Sampler *s = <Sampler *>malloc(
        sizeof(Sampler) + (table.n_eligible + 1) * (sizeof(int64_t) + sizeof(int32_t)))
    if s == NULL:
        return -1
    s.cumulative = <int64_t *>(<char *>s + sizeof(Sampler))
    s.index = <int32_t *>(<char *>s.cumulative + (table.n_eligible + 1) * sizeof(int64_t))
    s.equal = True
    for j in range(table.n_eligible):
        i = table.eligible[j]
        if table.backends[i].weight <= 0:
            continue
        if n and table.backends[i].weight != table.backends[s.index[0]].weight:
            s.equal = False
        total += table.backends[i].weight
        s.index[n] = i
        s.cumulative[n] = total
        n += 1
    s.n = n
    s.total = total
    table.state = s
    return 0


cdef void sampler_release(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    free(table.state)


cdef inline int sample_any(Table *table, const Sampler *s) noexcept nogil:
    # Called without the GIL; s.n > 0. One backend, with probability weight / total.
    cdef int lo = 0, hi = s.n - 1, mid
    cdef int64_t r
    if s.equal:
        return s.index[next_random(table) % <uint64_t>s.n]
    r = <int64_t>(next_random(table) % <uint64_t>s.total)
    while lo < hi:
        mid = (lo + hi) >> 1
        if s.cumulative[mid] <= r:
            lo = mid + 1
        else:
            hi = mid
    return s.index[lo]


cdef int sample_excluding(Table *table, const Sampler *s, const int *tried, int ntried,
                          int exclude) noexcept nogil:
    # Called without the GIL; touches no Python objects. One backend that is neither in
    # tried[0:ntried] nor exclude, with probability proportional to its weight among those;
    # -1 when none is left. Rejection first (usually one draw), then an exact scan: both draw
    # from the same conditional distribution.
    cdef int attempt, k, i
    cdef int64_t total = 0, r
    if s == NULL or s.n == 0:
        return -1
    for attempt in range(SAMPLE_ATTEMPTS):
        i = sample_any(table, s)
        if i != exclude and not is_tried(i, tried, ntried):
            return i
    for k in range(s.n):
        i = s.index[k]
        if i != exclude and not is_tried(i, tried, ntried):
            total += table.backends[i].weight
    if total == 0:
        return -1
    r = <int64_t>(next_random(table) % <uint64_t>total)
    for k in range(s.n):
        i = s.index[k]
        if i != exclude and not is_tried(i, tried, ntried):
            r -= table.backends[i].weight
            if r < 0:
                return i
    return -1
