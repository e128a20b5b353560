# leastconn: the backend with the fewest active connections per unit of weight, counting every
# worker's connections: the supervisor's last snapshot of the others plus this worker's live
# count. The eligible backends sit in a binary heap ordered by (active + 1) / weight, kept in
# order as counts change (a connect, a close, the others' counts), so a pick reads its top: the
# exact minimum of the counts this worker has, in O(1), and each count change costs O(log n).
# Ties go to the backend whose count changed longest ago (as in HAProxy's lb_fwlc, which
# queues a server behind its equals when its count changes; the first order is random), so that
# they rotate and workers sharing one stale snapshot do not all pile onto one backend. A retry
# scans the untried backends. Called without the GIL; touches no Python objects.


cdef struct LcEntry:
    int64_t load            # active + 1, as of the last count change
    int64_t weight
    uint64_t stamp          # when its count last changed
    int32_t index           # into table.backends


cdef struct LcState:
    int n
    uint64_t clock          # stamps count changes: the lower stamp wins a tie
    LcEntry *heap           # heap[0] the least loaded
    int32_t *where          # where[backend index]: its place in heap, -1 when not in it


cdef inline bint lc_before(const LcEntry *a, const LcEntry *b) noexcept nogil:
    # a.load / a.weight < b.load / b.weight, without division; ties by stamp.
    cdef int64_t left = a.load * b.weight, right = b.load * a.weight
    if left != right:
        return left < right
    return a.stamp < b.stamp


cdef void lc_sift_down(LcState *lc, int k) noexcept nogil:
    # Called without the GIL; touches no Python objects. Moves heap[k] down to its place.
    cdef LcEntry moving = lc.heap[k]
    cdef int child
    while True:
        child = 2 * k + 1
        if child >= lc.n:
            break
        if child + 1 < lc.n and lc_before(&lc.heap[child + 1], &lc.heap[child]):
            child += 1
        if not lc_before(&lc.heap[child], &moving):
            break
        lc.heap[k] = lc.heap[child]
        lc.where[lc.heap[k].index] = k
        k = child
    lc.heap[k] = moving
    lc.where[moving.index] = k


cdef void lc_sift(LcState *lc, int k) noexcept nogil:
    # Called without the GIL; touches no Python objects. Moves heap[k], whose key changed, up
    # or down to its place.
    cdef LcEntry moving = lc.heap[k]
    cdef int parent
    while k > 0:
        parent = (k - 1) >> 1
        if not lc_before(&moving, &lc.heap[parent]):
            break
        lc.heap[k] = lc.heap[parent]
        lc.where[lc.heap[k].index] = k
        k = parent
    lc.heap[k] = moving
    lc.where[moving.index] = k
    lc_sift_down(lc, k)


cdef inline int64_t lc_load(const Table *table, int index) noexcept nogil:
    cdef const Backend *b = &table.backends[index]
    return <int64_t>b.local_active + b.others_active + 1


cdef void lc_heapify(const Table *table, LcState *lc) noexcept nogil:
    # Called without the GIL; touches no Python objects. Reloads every count, then orders.
    cdef int k
    for k in range(lc.n):
        lc.heap[k].load = lc_load(table, lc.heap[k].index)
    for k in range(lc.n // 2 - 1, -1, -1):
        lc_sift_down(lc, k)


cdef int leastconn_build(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.eligible is current.
    cdef int j, i
    cdef LcEntry *e
    cdef LcState *lc = <LcState *>malloc(
        sizeof(LcState) + (table.n_eligible + 1) * sizeof(LcEntry) + (table.n + 1) * sizeof(int32_t))
    if lc == NULL:
        return -1
    lc.heap = <LcEntry *>(<char *>lc + sizeof(LcState))
    lc.where = <int32_t *>(<char *>lc.heap + (table.n_eligible + 1) * sizeof(LcEntry))
    lc.n = 0
    lc.clock = 1 << 32  # above every first stamp
    for i in range(table.n):
        lc.where[i] = -1
    for j in range(table.n_eligible):
        i = table.eligible[j]
        if table.backends[i].weight > 0:
            e = &lc.heap[lc.n]
            e.index = i
            e.weight = table.backends[i].weight
            e.stamp = next_random(table) >> 32
            lc.where[i] = lc.n
            lc.n += 1
    lc_heapify(table, lc)
    table.state = lc
    return 0


cdef void leastconn_release(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    free(table.state)


cdef void leastconn_counts_changed(Table *table, int index) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    cdef LcState *lc = <LcState *>table.state
    cdef int k
    if lc == NULL:
        return
    if index < 0:
        lc_heapify(table, lc)
        return
    k = lc.where[index]
    if k >= 0:
        lc.heap[k].load = lc_load(table, index)
        lc.clock += 1
        lc.heap[k].stamp = lc.clock
        lc_sift(lc, k)


cdef void leastconn_adopted(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    leastconn_counts_changed(table, -1)


cdef int leastconn_scan(const LcState *lc, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects. The least loaded untried backend's
    # place in the heap, or -1.
    cdef int k, best = -1
    for k in range(lc.n):
        if (not is_tried(lc.heap[k].index, tried, ntried)
                and (best < 0 or lc_before(&lc.heap[k], &lc.heap[best]))):
            best = k
    return best


cdef int leastconn_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.state was built by
    # leastconn_build from the current eligible set.
    cdef const LcState *lc = <const LcState *>table.state
    cdef int k
    if lc == NULL or lc.n == 0:
        return -1
    k = 0 if ntried == 0 else leastconn_scan(lc, tried, ntried)
    return lc.heap[k].index if k >= 0 else -1


cdef Algorithm LEASTCONN
LEASTCONN.name = b"leastconn"
LEASTCONN.needs = NEEDS_GLOBAL_COUNTS
LEASTCONN.build = leastconn_build
LEASTCONN.release = leastconn_release
LEASTCONN.pick = leastconn_pick
LEASTCONN.counts_changed = leastconn_counts_changed
LEASTCONN.adopted = leastconn_adopted
register_algorithm(&LEASTCONN)
