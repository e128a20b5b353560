# roundrobin: nginx's smooth weighted round robin. Weights 3:1 give A A B A, not A A A B: each
# pick adds every backend's weight to its running score, takes the highest (the first in table
# order among equals), and charges the winner the total.
#
# The same order without visiting every backend: backends of equal weight are always picked in
# turn, in table order (they gain the same score each pick, so the one picked longest ago leads
# them), so build() groups them by weight and a pick keeps one score per group, that of the
# group's next member. A pick costs O(distinct weights), O(1) when all weights are equal; the
# order is exactly nginx's. A table swapped in for the one in use (a health flap, a weight)
# resumes the turn, each group at its share of the first picks made so far, instead of starting
# over at the first backend of each group: frequent changes would otherwise favour the first
# backends. A retry (some backends tried) takes the untried backend with the
# highest score without charging anyone, so retries leave the order of first picks alone.
# Called without the GIL; touches no Python objects.
from libc.stdlib cimport qsort


cdef struct RrGroup:
    int64_t current         # nginx's score of the next member (those before it were charged once more)
    int64_t weight
    int32_t size
    int32_t next            # the member that the group picks next
    int32_t *members        # backend indices, in table order


cdef struct RrState:
    int ngroups
    int64_t total           # weight of all members
    RrGroup *groups


cdef int compare_weight_then_index(const void *a, const void *b) noexcept nogil:
    # Sorts (weight, index) pairs of int64 by weight, then index.
    cdef const int64_t *x = <const int64_t *>a
    cdef const int64_t *y = <const int64_t *>b
    if x[0] != y[0]:
        return -1 if x[0] < y[0] else 1
    return -1 if x[1] < y[1] else (1 if x[1] > y[1] else 0)


cdef int roundrobin_build(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.eligible is current.
    cdef int j, n = 0, g = -1
    cdef int64_t *pairs
    cdef RrState *rr
    cdef int32_t *members
    pairs = <int64_t *>malloc((table.n_eligible + 1) * 2 * sizeof(int64_t))
    rr = <RrState *>malloc(sizeof(RrState) + (table.n_eligible + 1) * sizeof(RrGroup)
                           + (table.n_eligible + 1) * sizeof(int32_t))
    if pairs == NULL or rr == NULL:
        free(pairs)
        free(rr)
        return -1
    for j in range(table.n_eligible):
        if table.backends[table.eligible[j]].weight > 0:
            pairs[2 * n] = table.backends[table.eligible[j]].weight
            pairs[2 * n + 1] = table.eligible[j]
            n += 1
    qsort(pairs, n, 2 * sizeof(int64_t), compare_weight_then_index)
    rr.groups = <RrGroup *>(<char *>rr + sizeof(RrState))
    members = <int32_t *>(<char *>rr.groups + (table.n_eligible + 1) * sizeof(RrGroup))
    rr.total = 0
    for j in range(n):
        if g < 0 or pairs[2 * j] != rr.groups[g].weight:
            g += 1
            rr.groups[g].current = 0
            rr.groups[g].weight = pairs[2 * j]
            rr.groups[g].size = 0
            rr.groups[g].next = 0
            rr.groups[g].members = &members[j]
        members[j] = <int32_t>pairs[2 * j + 1]
        rr.groups[g].size += 1
        rr.total += pairs[2 * j]
    rr.ngroups = g + 1
    free(pairs)
    table.state = rr
    return 0


cdef void roundrobin_release(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    free(table.state)


cdef void roundrobin_adopted(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects. With equal weights (one group) this is
    # exactly where the turn was; groups of other weights resume at the same place in their
    # own rotation.
    cdef RrState *rr = <RrState *>table.state
    cdef int g
    if rr == NULL:
        return
    for g in range(rr.ngroups):
        rr.groups[g].next = <int32_t>(table.turn % <uint64_t>rr.groups[g].size)


cdef int roundrobin_retry(const RrState *rr, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects. The untried backend that a pick would
    # score highest: in each group its members from next on score current + weight, those
    # before next the total less; equal scores go to the first in table order.
    cdef int g, k, pos, i, best = -1
    cdef int64_t score, best_score = 0
    cdef const RrGroup *group
    for g in range(rr.ngroups):
        group = &rr.groups[g]
        for k in range(group.size):
            pos = group.next + k
            if pos >= group.size:
                pos -= group.size
            i = group.members[pos]
            if is_tried(i, tried, ntried):
                continue
            score = group.current + group.weight - (rr.total if pos < group.next else 0)
            if best < 0 or score > best_score or (score == best_score and i < best):
                best = i
                best_score = score
            break
    return best


cdef int roundrobin_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.state was built by
    # roundrobin_build from the current eligible set.
    cdef RrState *rr = <RrState *>table.state
    cdef RrGroup *group
    cdef RrGroup *best = NULL
    cdef int g
    if rr == NULL or rr.ngroups == 0:
        return -1
    if ntried:
        return roundrobin_retry(rr, tried, ntried)
    for g in range(rr.ngroups):
        group = &rr.groups[g]
        group.current += group.weight
        if (best == NULL or group.current > best.current
                or (group.current == best.current
                    and group.members[group.next] < best.members[best.next])):
            best = group
    table.turn += 1
    g = best.members[best.next]
    best.next += 1
    if best.next == best.size:  # every member charged once more: the group's score drops
        best.next = 0
        best.current -= rr.total
    return g


cdef Algorithm ROUNDROBIN
ROUNDROBIN.name = b"roundrobin"
ROUNDROBIN.needs = 0
ROUNDROBIN.build = roundrobin_build
ROUNDROBIN.release = roundrobin_release
ROUNDROBIN.pick = roundrobin_pick
ROUNDROBIN.counts_changed = no_counts
ROUNDROBIN.adopted = roundrobin_adopted
register_algorithm(&ROUNDROBIN)
