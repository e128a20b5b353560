# maglev: Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
# Balancer", NSDI 2016). A lookup table of prime size M is filled by letting the backends take
# turns claiming their next preferred free entry; each backend's preference list is the
# permutation (offset + j * skip) mod M, with offset and skip two hashes of its address. A key
# belongs to entry key mod M: one memory read per pick, near-equal shares, and few keys move when
# the set changes. Weights set how often a backend takes a turn (one of weight w takes w turns
# for every w_max turns of the heaviest, as in Envoy). The turn order is by address hash, not by
# list position, so the table depends on the set of backends alone: two fastlb processes with
# the same backends, in any order, send each client to the same one. Retries and full backends
# (bounded loads) walk forward through the table. Called without the GIL; touches no Python
# objects.

cdef enum:
    MAGLEV_SIZE = 65537             # prime; the paper's 100 entries per backend up to 655
    MAGLEV_SIZE_LARGE = 655373      # prime, for more backends than that


cdef struct MaglevTurn:
    uint64_t id_hash
    int32_t index
    int32_t weight
    int64_t pos         # the next entry of this backend's permutation to try
    int64_t skip
    int64_t target      # takes its next turn in the round where round * weight reaches this


cdef struct Maglev:
    SharedState shared
    int64_t size
    int32_t *entry      # entry[k]: the backend index that owns keys with key mod size == k


cdef int compare_turns(const void *a, const void *b) noexcept nogil:
    cdef const MaglevTurn *x = <const MaglevTurn *>a
    cdef const MaglevTurn *y = <const MaglevTurn *>b
    if x.id_hash != y.id_hash:
        return -1 if x.id_hash < y.id_hash else 1
    return x.index - y.index


cdef inline uint64_t maglev_offset_hash(uint64_t id_hash) noexcept nogil:
    return mix64(id_hash ^ 0x6f66667365746f66ULL)


cdef inline uint64_t maglev_skip_hash(uint64_t id_hash) noexcept nogil:
    return mix64(id_hash ^ 0x736b69707370696bULL)


cdef int maglev_build(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects; table_select has run.
    cdef int i, j, n = 0
    cdef int64_t size, k, filled = 0, rounds = 0, wmax = 0
    cdef Backend *b
    cdef MaglevTurn *turns
    cdef MaglevTurn *t
    cdef Maglev *mg
    cdef uint64_t *taken
    if table.eligible_weight <= 0:
        return 0  # no backend can take traffic: state stays NULL
    for i in range(table.n):
        n += in_base(table, i)
    size = MAGLEV_SIZE if n * 100 <= MAGLEV_SIZE else MAGLEV_SIZE_LARGE
    turns = <MaglevTurn *>malloc(n * sizeof(MaglevTurn))
    mg = <Maglev *>malloc(sizeof(Maglev) + size * sizeof(int32_t))
    # Which entries are taken, a bit each: the probes read 80 KiB that stay in cache, not the
    # 2.5 MiB table (a third of the build's time at 1,000 backends).
    taken = <uint64_t *>calloc((size + 63) // 64, sizeof(uint64_t))
    if turns == NULL or mg == NULL or taken == NULL:
        free(turns)
        free(mg)
        free(taken)
        return -1
    n = 0
    for i in range(table.n):
        if not in_base(table, i):
            continue
        b = &table.backends[i]
        t = &turns[n]
        t.id_hash = b.id_hash
        t.index = i
        t.weight = b.weight
        t.pos = <int64_t>(maglev_offset_hash(b.id_hash) % <uint64_t>size)
        t.skip = <int64_t>(maglev_skip_hash(b.id_hash) % <uint64_t>(size - 1)) + 1
        t.target = 0
        wmax = max(wmax, <int64_t>b.weight)
        n += 1
    qsort(turns, n, sizeof(MaglevTurn), compare_turns)
    mg.shared.refs = 1
    mg.shared.key = table.base_key
    mg.size = size
    mg.entry = <int32_t *>(<char *>mg + sizeof(Maglev))
    while filled < size:
        for j in range(n):
            t = &turns[j]
            if rounds * t.weight < t.target:
                continue
            t.target += wmax
            while taken[t.pos >> 6] & (<uint64_t>1 << (t.pos & 63)):
                t.pos += t.skip
                if t.pos >= size:
                    t.pos -= size
            taken[t.pos >> 6] |= <uint64_t>1 << (t.pos & 63)
            mg.entry[t.pos] = t.index
            filled += 1
            if filled == size:
                break
        rounds += 1
    free(turns)
    free(taken)
    table.state = mg
    return 0


cdef void maglev_release(Table *table) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    state_release(table.state)


cdef int maglev_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.state was built by maglev_build
    # from the current eligible set.
    cdef const Maglev *mg = <const Maglev *>table.state
    if mg == NULL:
        return -1
    return walk_candidates(table, mg.entry, mg.size, <int64_t>(key % <uint64_t>mg.size),
                           tried, ntried)


cdef Algorithm MAGLEV
MAGLEV.name = b"maglev"
MAGLEV.needs = NEEDS_CLIENT_KEY
MAGLEV.build = maglev_build
MAGLEV.release = maglev_release
MAGLEV.pick = maglev_pick
MAGLEV.counts_changed = no_counts
MAGLEV.adopted = no_adopted
MAGLEV.slow_build = True
register_algorithm(&MAGLEV)
