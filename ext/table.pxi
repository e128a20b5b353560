# The backend table: parsing rows from Python, the eligible set, swapping a table in whole.

cdef const Algorithm *find_algorithm(str name) except NULL:
    cdef int i
    cdef bytes wanted = name.encode()
    for i in range(N_ALGORITHMS):
        if ALGORITHMS[i].name == wanted:
            return ALGORITHMS[i]
    raise ValueError(f"unknown algorithm {name!r} (choose from {', '.join(algorithm_names())})")


cdef int fill_sockaddr(sockaddr_storage *addr, socklen_t *addrlen, str host, int port) except -1:
    cdef sockaddr_in *v4 = <sockaddr_in *>addr
    cdef sockaddr_in6 *v6 = <sockaddr_in6 *>addr
    cdef bytes raw = host.encode()
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    memset(addr, 0, sizeof(sockaddr_storage))
    if inet_pton(AF_INET, raw, &v4.sin_addr) == 1:
        v4.sin_family = AF_INET
        v4.sin_port = htons(port)
        addrlen[0] = sizeof(sockaddr_in)
    elif inet_pton(AF_INET6, raw, &v6.sin6_addr) == 1:
        v6.sin6_family = AF_INET6
        v6.sin6_port = htons(port)
        addrlen[0] = sizeof(sockaddr_in6)
    else:
        raise ValueError(f"not a numeric IP address: {host!r}")
    return 0


cdef inline uint64_t hash_sockaddr(const sockaddr_storage *addr, bint with_port) noexcept nogil:
    # The client key: its IP address, optionally with its port. IPv4 and IPv6 hash differently.
    cdef const sockaddr_in *v4
    cdef const sockaddr_in6 *v6
    cdef uint64_t h
    if addr.ss_family == AF_INET6:
        v6 = <const sockaddr_in6 *>addr
        h = hash_bytes(v6.sin6_addr.s6_addr, 16, 6)
        if with_port:
            h = mix64(h ^ v6.sin6_port)
    else:
        v4 = <const sockaddr_in *>addr
        h = hash_bytes(<const unsigned char *>&v4.sin_addr, 4, 4)
        if with_port:
            h = mix64(h ^ v4.sin_port)
    return h


cdef void table_init(Table *table, const Algorithm *algo, double balance_factor) noexcept:
    memset(table, 0, sizeof(Table))
    table.algo = algo
    table.balance_factor = balance_factor
    table.rng = 0x9E3779B97F4A7C15ULL


# Users give weights up to 1,000,000; the supervisor may scale them by 100 (slow start, agent
# percentages) for a finer ramp. Sums stay in int64.
DEF MAX_TABLE_WEIGHT = 100000000


cdef Table table_parse(list rows, bint with_ids) except *:
    """A table holding only the backends from rows of (host, port, weight, up, backup), each row
    led by the backend's id when with_ids (else its position is its id)."""
    cdef Table new
    cdef Backend *b
    cdef int i
    memset(&new, 0, sizeof(Table))
    new.n = len(rows)
    new.backends = <Backend *>calloc(new.n + 1, sizeof(Backend))
    if new.backends == NULL:
        raise MemoryError()
    try:
        for i, row in enumerate(rows):
            if with_ids:
                backend_id, host, port, weight, up, backup = row
            else:
                backend_id = i
                host, port, weight, up, backup = row
            if not 0 <= weight <= MAX_TABLE_WEIGHT:
                raise ValueError(f"weight out of range: {weight}")
            b = &new.backends[i]
            b.id = backend_id
            fill_sockaddr(&b.addr, &b.addrlen, host, port)
            b.weight = weight
            b.up = bool(up)
            b.backup = bool(backup)
            b.id_hash = hash_bytes(<const unsigned char *>&b.addr, b.addrlen, 0x5eed)
    except BaseException:
        free(new.backends)
        raise
    return new


cdef void backend_carry(Backend *new, const Backend *old) noexcept nogil:
    """A backend that stays across a table swap: its configuration from the new table, its
    algorithm state and its counters since the last report from the old one. local_active is
    counted anew from the live connections."""
    cdef Backend configured = new[0]
    new[0] = old[0]
    new.addr = configured.addr
    new.addrlen = configured.addrlen
    new.id = configured.id
    new.id_hash = configured.id_hash
    new.weight = configured.weight
    new.up = configured.up
    new.backup = configured.backup
    new.in_use = configured.in_use
    new.local_active = 0


cdef void table_swap(Table *table, Table *new) noexcept nogil:
    """Moves new's backends into table, keeping table's algorithm and settings."""
    table.algo.release(table)
    table.state = NULL
    free(table.backends)
    free(table.eligible)
    table.backends = new.backends
    table.n = new.n
    table.eligible = NULL
    table.n_eligible = 0


cdef void table_adopt(Table *table, Table *prepared) noexcept nogil:
    """Moves a prepared table's backends, eligible set and algorithm state into table, keeping
    table's algorithm and settings; prepared is left empty. Its counts are then set, and
    table_adopt_counts told."""
    table.algo.release(table)
    free(table.backends)
    free(table.eligible)
    table.backends = prepared.backends
    table.n = prepared.n
    table.eligible = prepared.eligible
    table.n_eligible = prepared.n_eligible
    table.eligible_weight = prepared.eligible_weight
    table.state = prepared.state
    prepared.backends = NULL
    prepared.eligible = NULL
    prepared.state = NULL
    prepared.n = prepared.n_eligible = 0


cdef void table_adopt_counts(Table *table) noexcept nogil:
    """After the counts of an adopted table are set: recounts the eligible total and tells the
    algorithm (its state was built without them)."""
    cdef int j
    cdef Backend *b
    table.eligible_active = 0
    for j in range(table.n_eligible):
        b = &table.backends[table.eligible[j]]
        table.eligible_active += <int64_t>b.local_active + b.others_active
    table.algo.adopted(table)


cdef int table_select(Table *table) noexcept nogil:
    """Recomputes the eligible set, the hashing algorithms' base and its key, and releases the
    algorithm's state (build() makes the next). Returns -1 on ENOMEM.

    In use: the primaries that are up; if none, the backups that are up (active-passive); if
    none of those either, every primary, so that a stale health mark cannot cause an outage.
    Panic: when some primaries are up but fewer than panic_threshold of them, every primary
    (as if none were up and no backup either), so that the few left are not crushed; a
    connection that meets a down one is retried on the next."""
    cdef int i, n = 0, pass_, first = 0, primaries = 0, up_primaries = 0
    cdef int64_t primary_weight = 0
    cdef uint64_t key
    cdef Backend *b
    free(table.eligible)
    table.eligible = <int *>malloc((table.n + 1) * sizeof(int))
    if table.eligible == NULL:
        return -1
    for i in range(table.n):
        if not table.backends[i].backup:
            primaries += 1
            up_primaries += table.backends[i].up
            primary_weight += max(table.backends[i].weight, 0)
    if up_primaries and up_primaries < table.panic_threshold * primaries:
        first = 2
    for pass_ in range(first, 3):
        for i in range(table.n):
            b = &table.backends[i]
            if ((pass_ == 0 and b.up and not b.backup) or (pass_ == 1 and b.up and b.backup)
                    or (pass_ == 2 and not b.backup)):
                table.eligible[n] = i
                n += 1
        if n:
            break
    table.n_eligible = n
    table.eligible_weight = 0
    table.eligible_active = 0
    for i in range(table.n):
        table.backends[i].in_use = False
    for i in range(n):
        b = &table.backends[table.eligible[i]]
        b.in_use = True
        table.eligible_weight += b.weight
        table.eligible_active += <int64_t>b.local_active + b.others_active
    # Half the weight in use at least: a pick's walk past the others stays short.
    table.base_primaries = (n > 0 and not table.backends[table.eligible[0]].backup
                            and table.eligible_weight * 2 >= primary_weight)
    key = mix64(<uint64_t>table.n ^ (<uint64_t>table.base_primaries << 32))
    for i in range(table.n):
        if in_base(table, i):
            b = &table.backends[i]
            key = mix64(key ^ b.id_hash ^ (<uint64_t>i << 40) ^ (<uint64_t>b.weight << 8))
    table.base_key = key
    table.algo.release(table)
    table.state = NULL
    return 0


cdef int table_refresh(Table *table) noexcept nogil:
    """table_select, then the algorithm's build. Returns -1 on ENOMEM."""
    if table_select(table) < 0:
        return -1
    return table.algo.build(table)


cdef inline void backend_add_local(Table *table, int index, int delta) noexcept nogil:
    # This worker's connections to a backend went up or down by delta. Called without the GIL;
    # touches no Python objects.
    cdef Backend *b = &table.backends[index]
    b.local_active += delta
    if b.in_use:
        table.eligible_active += delta
        table.algo.counts_changed(table, index)


cdef inline void backend_set_others(Table *table, int index, int32_t count) noexcept nogil:
    # The other workers' connections to a backend, as the supervisor last counted them. Called
    # without the GIL; touches no Python objects.
    cdef Backend *b = &table.backends[index]
    if count == b.others_active:
        return
    if b.in_use:
        table.eligible_active += <int64_t>count - b.others_active
    b.others_active = count
    if b.in_use:
        table.algo.counts_changed(table, index)


cdef int table_fallback(Table *table, const int *tried, int ntried) noexcept nogil:
    """A backend outside the eligible set for a connection that tried every one in it: an up
    backup, else a primary marked down (a last resort), else -1. Starts at a random place so
    that such connections spread. Called without the GIL; touches no Python objects."""
    cdef int k, i, pass_, start
    cdef Backend *b
    if table.n == 0:
        return -1
    start = <int>(next_random(table) % <uint64_t>table.n)
    for pass_ in range(2):
        for k in range(table.n):
            i = (start + k) % table.n
            b = &table.backends[i]
            if b.weight <= 0 or is_tried(i, tried, ntried):
                continue
            if (pass_ == 0 and b.up and b.backup) or (pass_ == 1 and not b.up and not b.backup):
                return i
    return -1


cdef void table_free(Table *table) noexcept nogil:
    if table.algo != NULL:
        table.algo.release(table)
    table.state = NULL
    free(table.backends)
    free(table.eligible)
    table.backends = NULL
    table.eligible = NULL
    table.n = table.n_eligible = 0
