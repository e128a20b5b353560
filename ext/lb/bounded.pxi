# The candidate walk shared by the table-driven hashing algorithms (consistent, maglev), with
# bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads").
#
# A hashing algorithm maps a key to a start position in an array of backend indices (the ring's
# points in order, or Maglev's lookup table). The walk goes forward from there, wrapping around,
# to the first backend in use that this connection has not tried yet (the array may hold
# backends marked down since it was built: their keys go to the next ones, as if they had been
# left out of the build, and come back when they do). With a balance factor F > 0 it
# also skips backends that are full: a backend of weight w is full when its active connections
# (this worker's plus the others') reach ceil(F * (total active + 1) * w / total weight), the
# total taken over the eligible backends. With equal weights that is ceil(F * average) with
# average = (total active + 1) / n, the count the new connection would make. Factors below 1
# act as 1: a smaller cap could leave every backend full. Every function here is called without
# the GIL and touches no Python objects.
from libc.math cimport ceil


cdef inline int64_t backend_active(const Backend *b) noexcept nogil:
    return <int64_t>b.local_active + b.others_active


cdef bint any_untried(const Table *table, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects. True when some eligible backend with a
    # positive weight is not in tried[0:ntried].
    cdef int j, i
    for j in range(table.n_eligible):
        i = table.eligible[j]
        if table.backends[i].weight > 0 and not is_tried(i, tried, ntried):
            return True
    return False


cdef double bounded_load(const Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects. F * (total active + 1): the load that
    # the eligible backends share in proportion to their weights, from the running total.
    cdef double factor = table.balance_factor if table.balance_factor > 1.0 else 1.0
    return factor * <double>(table.eligible_active + 1)


cdef inline bint below_cap(const Table *table, const Backend *b, double load) noexcept nogil:
    # Multiply before dividing: when the cap is a whole number it comes out exact.
    return <double>backend_active(b) < ceil(load * b.weight / <double>table.eligible_weight)


cdef int walk_candidates(Table *table, const int32_t *owner, int64_t size, int64_t start,
                         const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects; owner[0:size] are indices into
    # table.backends of backends with positive weights (the build's base, a superset of those
    # in use: the walk passes over the others), 0 <= start < size.
    # Returns the first acceptable backend from start on, or -1 when every one was tried.
    cdef bint bounded = table.balance_factor > 0
    cdef int64_t pos = start, step
    cdef int i, fallback = -1
    cdef double load = 0.0
    if size <= 0:
        return -1
    i = owner[start]
    if not bounded and ntried == 0 and table.backends[i].in_use:
        return i
    if ntried and not any_untried(table, tried, ntried):
        return -1
    if bounded:
        load = bounded_load(table)
    for step in range(size):
        i = owner[pos]
        pos += 1
        if pos == size:
            pos = 0
        if not table.backends[i].in_use or (ntried and is_tried(i, tried, ntried)):
            continue
        if not bounded or below_cap(table, &table.backends[i], load):
            return i
        if fallback < 0:
            fallback = i  # every untried backend full (only when some were tried): the nearest
    return fallback
