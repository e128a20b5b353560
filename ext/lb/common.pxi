# Shared by the algorithms: the registry, hashing and the tried-backend check.
# Every function here is called without the GIL and touches no Python objects.

cdef const Algorithm *ALGORITHMS[32]
cdef int N_ALGORITHMS = 0


cdef void register_algorithm(const Algorithm *algo) noexcept:
    global N_ALGORITHMS
    ALGORITHMS[N_ALGORITHMS] = algo
    N_ALGORITHMS += 1


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef inline uint64_t hash_bytes(const unsigned char *data, size_t n, uint64_t seed) noexcept nogil:
    # FNV-1a over the bytes, then mixed. Fixed seeds: every process and machine agrees.
    cdef uint64_t h = 0xcbf29ce484222325ULL ^ seed
    cdef size_t i
    for i in range(n):
        h ^= data[i]
        h *= 0x100000001b3ULL
    return mix64(h)


cdef inline bint is_tried(int index, const int *tried, int ntried) noexcept nogil:
    cdef int i
    for i in range(ntried):
        if tried[i] == index:
            return True
    return False


cdef inline uint64_t next_random(Table *table) noexcept nogil:
    # xorshift64*: cheap, good enough to break ties and sample candidates.
    cdef uint64_t x = table.rng
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    table.rng = x
    return x * 0x2545F4914F6CDD1DULL


cdef int no_build(Table *table) noexcept nogil:
    return 0


cdef void no_release(Table *table) noexcept nogil:
    pass


cdef void no_counts(Table *table, int index) noexcept nogil:
    pass


cdef void no_adopted(Table *table) noexcept nogil:
    pass


cdef extern from *:
    """
    static inline int64_t fastlb_atomic_add(int64_t *p, int64_t d) {
        return __atomic_add_fetch(p, d, __ATOMIC_ACQ_REL);
    }
    """
    int64_t atomic_add "fastlb_atomic_add" (int64_t *p, int64_t d) nogil


cdef inline void state_retain(void *state) noexcept nogil:
    atomic_add(&(<SharedState *>state).refs, 1)


cdef inline void state_release(void *state) noexcept nogil:
    # The loop releases a table it swapped out while the builder may hold the same state.
    if state != NULL and atomic_add(&(<SharedState *>state).refs, -1) == 0:
        free(state)


cdef inline bint in_base(const Table *table, int index) noexcept nogil:
    # Whether a hashing algorithm builds backend index in (see Table.base_primaries).
    cdef const Backend *b = &table.backends[index]
    if b.weight <= 0:
        return False
    return not b.backup if table.base_primaries else b.in_use
