# iphash: weighted rendezvous (highest random weight) hashing of the client address. Each backend
# scores weight / -ln(u), u a uniform hash of (client, backend address); the top score wins.
# Deterministic from the addresses alone, so every worker and every fastlb instance agrees, and
# when a backend leaves or returns only its own clients move. Called without the GIL; touches no
# Python objects.
from libc.math cimport log


cdef inline double rendezvous_score(uint64_t key, const Backend *b) noexcept nogil:
    cdef uint64_t h = mix64(key ^ b.id_hash)
    cdef double u = (<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0)  # (0, 1)
    return b.weight / -log(u)


cdef int iphash_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    cdef int j, i, best = -1
    cdef double score, best_score = -1.0
    cdef Backend *b
    for j in range(table.n_eligible):
        i = table.eligible[j]
        b = &table.backends[i]
        if b.weight <= 0 or is_tried(i, tried, ntried):
            continue
        score = rendezvous_score(key, b)
        if score > best_score:
            best = i
            best_score = score
    return best


cdef Algorithm IPHASH
IPHASH.name = b"iphash"
IPHASH.needs = NEEDS_CLIENT_KEY
IPHASH.build = no_build
IPHASH.release = no_release
IPHASH.pick = iphash_pick
register_algorithm(&IPHASH)
