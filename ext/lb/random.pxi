# random: weighted random choice among the eligible backends, each with probability weight /
# total weight. Needs no counts and no coordination between workers. Called without the GIL;
# touches no Python objects.

cdef int random_pick(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil:
    # Called without the GIL; touches no Python objects; table.state was built by sampler_build.
    return sample_excluding(table, <const Sampler *>table.state, tried, ntried, -1)


cdef Algorithm RANDOM
RANDOM.name = b"random"
RANDOM.needs = 0
RANDOM.build = sampler_build
RANDOM.release = sampler_release
RANDOM.pick = random_pick
RANDOM.counts_changed = no_counts
RANDOM.adopted = no_adopted
register_algorithm(&RANDOM)
