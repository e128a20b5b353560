# consistent: a ketama-style hash ring. Each backend owns RING_VNODES points per unit of weight
# (weights divided by their greatest common divisor first, so equal weights always mean 160
# points each), placed at hashes of its address: every process with the same backends builds
# the same ring, and a backend that leaves or returns takes or gives back only its own keys.
# A key belongs to the first point at or after it; retries and full backends (bounded loads)
# walk on clockwise. Called without the GIL; touches no Python objects.
from libc.stdlib cimport qsort

cdef enum:
    RING_VNODES = 160               # points per unit of (gcd-reduced) weight
    RING_MAX_POINTS = 1 << 18       # above this, point counts shrink in proportion (3 MiB of ring)


cdef struct RingPoint:
    uint64_t pos
    uint64_t id_hash    # breaks ties between equal positions the same way in every process
    int32_t owner


cdef struct Ring:
    int64_t n
    uint64_t *pos       # sorted point positions
    int32_t *owner      # owner[k]: the backend index of point k
    int shift           # a key's bucket: key >> shift
    int32_t *first      # first[b]: the first point in bucket b or after it; first[buckets] = n


cdef inline uint64_t ring_point(uint64_t id_hash, int64_t k) noexcept nogil:
    return mix64(id_hash + <uint64_t>(k + 1) * 0x9E3779B97F4A7C15ULL)


cdef int compare_points(const void *a, const void *b) noexcept nogil:
    cdef const RingPoint *x = <const RingPoint *>a
    cdef const RingPoint *y = <const RingPoint *>b
    if x.pos != y.pos:
        return -1 if x.pos < y.pos else 1
    if x.id_hash != y.id_hash:
        return -1 if x.id_hash < y.id_hash else 1
    return 0


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
    # Called without the GIL; touches no Python objects; table.eligible is current.
    cdef int j, i
    cdef int64_t unit = 0, units = 0, total = 0, k, vn, m = 0, buckets, bucket
    cdef int bits = 1
    cdef Backend *b
    cdef Ring *ring
    cdef RingPoint *points
    for j in range(table.n_eligible):
        b = &table.backends[table.eligible[j]]
        if b.weight > 0:
            unit = gcd64(unit, b.weight)
    if unit == 0:
        return 0  # no backend can take traffic: state stays NULL
    for j in range(table.n_eligible):
        b = &table.backends[table.eligible[j]]
        if b.weight > 0:
            units += b.weight // unit
    for j in range(table.n_eligible):
        b = &table.backends[table.eligible[j]]
        if b.weight > 0:
            total += ring_vnodes(b.weight, unit, units)
    # About two points per bucket: a pick reads one bucket's points, not a binary search's
    # scattered ones.
    while (<int64_t>1 << bits) * 2 < total and bits < 24:
        bits += 1
    buckets = <int64_t>1 << bits
    points = <RingPoint *>malloc(total * sizeof(RingPoint))
    ring = <Ring *>malloc(sizeof(Ring) + total * (sizeof(uint64_t) + sizeof(int32_t))
                          + (buckets + 1) * sizeof(int32_t))
    if points == NULL or ring == NULL:
        free(points)
        free(ring)
        return -1
    for j in range(table.n_eligible):
        i = table.eligible[j]
        b = &table.backends[i]
        if b.weight <= 0:
            continue
        vn = ring_vnodes(b.weight, unit, units)
        for k in range(vn):
            points[m].pos = ring_point(b.id_hash, k)
            points[m].id_hash = b.id_hash
            points[m].owner = i
            m += 1
    qsort(points, total, sizeof(RingPoint), compare_points)
    ring.n = total
    ring.pos = <uint64_t *>(<char *>ring + sizeof(Ring))
    ring.owner = <int32_t *>(<char *>ring.pos + total * sizeof(uint64_t))
    ring.first = <int32_t *>(<char *>ring.owner + total * sizeof(int32_t))
    ring.shift = 64 - bits
    bucket = 0
    for k in range(total):
        ring.pos[k] = points[k].pos
        ring.owner[k] = points[k].owner
        while bucket <= <int64_t>(points[k].pos >> ring.shift):
            ring.first[bucket] = <int32_t>k
            bucket += 1
    while bucket <= buckets:
        ring.first[bucket] = <int32_t>total
        bucket += 1
    free(points)
    table.state = ring
    return 0


cdef void consistent_release(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    free(table.state)


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
register_algorithm(&CONSISTENT)
