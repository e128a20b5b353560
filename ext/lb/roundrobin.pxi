# roundrobin: nginx's smooth weighted round robin. Weights 3:1 give A A B A, not A A A B: each
# pick adds every backend's weight to its running score, takes the highest, and charges the
# winner the total. Called without the GIL; touches no Python objects.

cdef int roundrobin_build(Table *table) noexcept nogil:
    cdef int i
    for i in range(table.n):
        table.backends[i].rr_current = 0
    return 0


cdef int roundrobin_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    cdef int j, i, best = -1
    cdef int64_t total = 0
    cdef Backend *b
    for j in range(table.n_eligible):
        i = table.eligible[j]
        b = &table.backends[i]
        if b.weight <= 0 or is_tried(i, tried, ntried):
            continue
        b.rr_current += b.weight
        total += b.weight
        if best < 0 or b.rr_current > table.backends[best].rr_current:
            best = i
    if best >= 0:
        table.backends[best].rr_current -= total
    return best


cdef Algorithm ROUNDROBIN
ROUNDROBIN.name = b"roundrobin"
ROUNDROBIN.needs = 0
ROUNDROBIN.build = roundrobin_build
ROUNDROBIN.release = no_release
ROUNDROBIN.pick = roundrobin_pick
register_algorithm(&ROUNDROBIN)
