# consistent: a ketama-style hash ring. Each backend owns RING_VNODES points per unit of weight
# (weights divided by their greatest common divisor first, so equal weights always mean 160
# points each), placed at hashes of its address: every process with the same backends builds
# the same ring, and a backend that leaves or returns takes or gives back only its own keys.
# A key belongs to the first point at or after it; retries and full backends (bounded loads)
# walk on clockwise. Called without the GIL; touches no Python objects.

cdef enum:
    RING_VNODES = 160               # points per unit of (gcd-reduced) weight
    RING_MAX_POINTS = 1 << 18       # above this, point counts shrink in proportion (3 MiB of ring)


cdef struct Ring:
    SharedState shared
    int64_t n
    uint64_t *pos       # sorted point positions
    int32_t *owner      # owner[k]: the backend index of point k
    int shift           # a key's bucket: key >> shift
    int32_t *first      # first[b]: the first point in bucket b or after it; first[buckets] = n


cdef inline uint64_t ring_point(uint64_t id_hash, int64_t k) noexcept nogil:
    return mix64(id_hash + <uint64_t>(k + 1) * 0x9E3779B97F4A7C15ULL)


cdef int64_t gcd64(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t t
    while b:
        t = a % b
        a = b
        b = t
    return a


cdef int64_t ring_vnodes(int64_t weight, int64_t unit, int64_t units) noexcept nogil:
    # Points for one backend: weight / unit units of RING_VNODES, scaled down when the whole ring
    # (units in all) would pass RING_MAX_POINTS; never fewer than one.
    cdef int64_t w = weight // unit
    if RING_VNODES * units <= RING_MAX_POINTS:
        return RING_VNODES * w
    return max(<int64_t>1, w * RING_MAX_POINTS // units)


cdef int consistent_build(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects; table_select has run.
    # Point positions are uniform hashes, so a counting sort by bucket (about two points each)
    # then an insertion sort within each bucket orders them in linear time: 1,000 backends'
    # 160,000 points in about 1 ms, where a comparison sort took 40 ms of the builder's CPU.
    cdef int i
    cdef int64_t unit = 0, units = 0, total = 0, k, vn, buckets, bucket, lo, hi, a
    cdef int bits = 1
    cdef uint64_t pos
    cdef int32_t owner
    cdef Backend *b
    cdef Ring *ring
    if table.eligible_weight <= 0:
        return 0  # no backend can take traffic: state stays NULL
    for i in range(table.n):
        if in_base(table, i):
            unit = gcd64(unit, table.backends[i].weight)
    for i in range(table.n):
        if in_base(table, i):
            units += table.backends[i].weight // unit
    for i in range(table.n):
        if in_base(table, i):
            total += ring_vnodes(table.backends[i].weight, unit, units)
    # About two points per bucket: a pick reads one bucket's points, not a binary search's
    # scattered ones.
    while (<int64_t>1 << bits) * 2 < total and bits < 24:
        bits += 1
    buckets = <int64_t>1 << bits
    ring = <Ring *>malloc(sizeof(Ring) + total * (sizeof(uint64_t) + sizeof(int32_t))
                          + (buckets + 1) * sizeof(int32_t))
    if ring == NULL:
        return -1
    ring.shared.refs = 1
    ring.shared.key = table.base_key
    ring.n = total
    ring.pos = <uint64_t *>(<char *>ring + sizeof(Ring))
    ring.owner = <int32_t *>(<char *>ring.pos + total * sizeof(uint64_t))
    ring.first = <int32_t *>(<char *>ring.owner + total * sizeof(int32_t))
    ring.shift = 64 - bits
    # first[bucket] counts the bucket's points, then sums them up to its end; placing each point
    # at its bucket's end, moving down, leaves first[bucket] at the bucket's start.
    memset(ring.first, 0, (buckets + 1) * sizeof(int32_t))
    for i in range(table.n):
        if in_base(table, i):
            b = &table.backends[i]
            vn = ring_vnodes(b.weight, unit, units)
            for k in range(vn):
                ring.first[ring_point(b.id_hash, k) >> ring.shift] += 1
    for bucket in range(1, buckets):
        ring.first[bucket] += ring.first[bucket - 1]
    ring.first[buckets] = <int32_t>total
    for i in range(table.n):
        if not in_base(table, i):
            continue
        b = &table.backends[i]
        vn = ring_vnodes(b.weight, unit, units)
        for k in range(vn):
            pos = ring_point(b.id_hash, k)
            bucket = <int64_t>(pos >> ring.shift)
            ring.first[bucket] -= 1
            ring.pos[ring.first[bucket]] = pos
            ring.owner[ring.first[bucket]] = i
    for bucket in range(buckets):
        lo = ring.first[bucket]
        hi = ring.first[bucket + 1]
        for a in range(lo + 1, hi):
            pos = ring.pos[a]
            owner = ring.owner[a]
            k = a
            while k > lo and (ring.pos[k - 1] > pos or (
                    ring.pos[k - 1] == pos
                    and table.backends[ring.owner[k - 1]].id_hash > table.backends[owner].id_hash)):
                ring.pos[k] = ring.pos[k - 1]
                ring.owner[k] = ring.owner[k - 1]
                k -= 1
            ring.pos[k] = pos
            ring.owner[k] = owner
    table.state = ring
    return 0


cdef void consistent_release(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    state_release(table.state)


cdef inline int64_t ring_find(const Ring *ring, uint64_t key) noexcept nogil:
    # The first point at or after key, wrapping to 0 past the last one: the points of key's
    # bucket are the only ones that can be it before the next bucket's first.
    cdef uint64_t bucket = key >> ring.shift
    cdef int64_t k = ring.first[bucket], end = ring.first[bucket + 1]
    while k < end and ring.pos[k] < key:
        k += 1
    return 0 if k == ring.n else k


cdef int consistent_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.state was built by
    # consistent_build from the current eligible set.
    cdef const Ring *ring = <const Ring *>table.state
    if ring == NULL:
        return -1
    return walk_candidates(table, ring.owner, ring.n, ring_find(ring, key), tried, ntried)


cdef Algorithm CONSISTENT
CONSISTENT.name = b"consistent"
CONSISTENT.needs = NEEDS_CLIENT_KEY
CONSISTENT.build = consistent_build
CONSISTENT.release = consistent_release
CONSISTENT.pick = consistent_pick
CONSISTENT.counts_changed = no_counts
CONSISTENT.adopted = no_adopted
CONSISTENT.slow_build = True
register_algorithm(&CONSISTENT)
