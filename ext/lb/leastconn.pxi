# leastconn: the backend with the fewest active connections per unit of weight, counting every
# worker's connections: the supervisor's last snapshot of the others plus this worker's live
# count. Ties rotate so that workers sharing one stale snapshot do not all pile onto one backend.
# Called without the GIL; touches no Python objects.

cdef int leastconn_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    cdef int j, i, best = -1, n = table.n_eligible
    cdef int64_t load, best_load = 0, best_weight = 1
    cdef Backend *b
    if n == 0:
        return -1
    cdef int start = <int>(next_random(table) % <uint64_t>n)
    for j in range(n):
        i = table.eligible[(start + j) % n]
        b = &table.backends[i]
        if b.weight <= 0 or is_tried(i, tried, ntried):
            continue
        load = <int64_t>b.local_active + b.others_active + 1
        # load / weight < best_load / best_weight, without division
        if best < 0 or load * best_weight < best_load * b.weight:
            best = i
            best_load = load
            best_weight = b.weight
    return best


cdef Algorithm LEASTCONN
LEASTCONN.name = b"leastconn"
LEASTCONN.needs = NEEDS_GLOBAL_COUNTS
LEASTCONN.build = no_build
LEASTCONN.release = no_release
LEASTCONN.pick = leastconn_pick
register_algorithm(&LEASTCONN)
