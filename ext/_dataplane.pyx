# The data plane: one epoll loop per worker process forwarding TCP bytes between clients and
# backends. Python drives it in slices (Worker.poll); inside a slice every event -- accept4,
# backend pick, non-blocking connect, recv/send or splice, close -- runs without the GIL and
# creates no Python objects.
#
# epoll is edge-triggered for connections. Readiness is remembered in per-socket flags
# (CAN_READ / CAN_WRITE) that are cleared on EAGAIN: a full destination simply stops us reading
# the source until its EPOLLOUT edge arrives. A backend socket is registered once for
# IN|OUT|RDHUP (OUT says the connect finished). A client socket starts writable and watched for
# IN|RDHUP alone, and gets OUT added the first time its send buffer fills: watched from the
# start, it would wake the loop for nothing on its first ACK and again when our FIN is ACKed,
# nearly two events in six of a short connection. So backpressure costs one epoll_ctl per
# connection, at most.
from libc.errno cimport (EAGAIN, ECONNABORTED, ECONNREFUSED, EINPROGRESS, EINTR, EMFILE, ENFILE, ENOBUFS,
                         ENOMEM, errno)
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_SetItem
from cpython.long cimport PyLong_AsLong
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from includes.linux cimport *

include "lb/common.pxi"
include "lb/roundrobin.pxi"
include "lb/leastconn.pxi"
include "lb/iphash.pxi"
include "lb/bounded.pxi"
include "lb/consistent.pxi"
include "lb/maglev.pxi"
include "lb/sampling.pxi"
include "lb/p2c.pxi"
include "lb/random.pxi"
include "table.pxi"
include "proto/proxy.pxi"
include "proto/sni.pxi"
include "proto/testing.pxi"
include "core/trusted.pxi"
include "core/builder.pxi"
include "core/peers.pxi"

# The low bits of epoll data say what the rest points to (Conn and Listener are 8-aligned).
DEF TAG_CLIENT = 0            # a Conn, its client socket
DEF TAG_BACKEND = 1           # a Conn, its backend socket
DEF TAG_LISTENER = 2          # a Listener
DEF TAG_WAKE = 3              # no pointer: a watched descriptor (control socket, signal pipe)
DEF TAG_MASK = 3
DEF SCAN_INTERVAL_MS = 100    # how often connect and idle timeouts are checked
DEF EMFILE_PAUSE_MS = 100     # accept pauses this long when out of file descriptors
DEF NO_PIPE = -3              # _pump_splice could not get a pipe
DEF NO_ID = 0xFFFFFFFF        # a log record's pool or backend when there was none
DEF LOG_RING_SIZE = 16384     # ended connections the access log holds between two slices
DEF LOAD_WINDOW_US = 10000   # how long a window of the loop's busy time is (coalescing)

include "udp/flows.pxi"

# Upper bounds of the histogram buckets, in ms (the last bucket is +Inf): connect time, and how
# long connections last.
cdef int64_t CONNECT_BOUNDS_MS[12]
CONNECT_BOUNDS_MS[:] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
cdef int64_t DURATION_BOUNDS_MS[12]
DURATION_BOUNDS_MS[:] = [10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 1800000,
                         3600000]


cdef inline int bucket(const int64_t *bounds, int64_t value) noexcept nogil:
    # The histogram bucket of value: the first bound it does not exceed, else the last (+Inf).
    cdef int i
    for i in range(HIST_BUCKETS - 1):
        if value <= bounds[i]:
            return i
    return HIST_BUCKETS - 1

cdef uint32_t CONN_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
cdef uint32_t CLIENT_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLET  # until it fills up

SPLICE_MODES = {"never": SPLICE_NEVER, "always": SPLICE_ALWAYS, "auto": SPLICE_AUTO}


cdef inline int64_t monotonic_ms() noexcept nogil:
    # CLOCK_MONOTONIC_COARSE is read from the vDSO: no system call.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline int64_t monotonic_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


cdef inline uint32_t flags_from_events(uint32_t ev) noexcept nogil:
    cdef uint32_t f = 0
    if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        f |= CAN_READ
    if ev & (EPOLLRDHUP | EPOLLHUP):
        f |= PEER_RDHUP
    if ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
        f |= CAN_WRITE
    return f


cdef inline void propagate_eof(int dst, uint32_t *dflags, uint32_t sflags) noexcept nogil:
    # The source sent FIN and everything before it went out: pass the FIN on. When dst has
    # already sent its own FIN and we passed that on, the connection closes right after this,
    # and close() sends the FIN: no shutdown() call needed.
    if not (dflags[0] & READ_EOF and sflags & WRITE_SHUT):
        shutdown(dst, SHUT_WR)
    dflags[0] |= WRITE_SHUT


cdef inline void set_linger_reset(int fd) noexcept nogil:
    # Closing with a zero linger time sends RST: how a reset on one side reaches the other.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef class Worker:
    """The epoll loop of one worker process.

    ``Worker(pools, frontends, listeners, ...)`` takes the pools (dicts: id, algorithm,
    connect_timeout, retries, hash_key, balance_factor, send_proxy, panic_threshold, on_down,
    first_byte_timeout (0: off)), the frontends (dicts: id,
    pool (index into pools), max_conn, idle_timeout, inspect_timeout, trusted (a list of
    (family, packed address, prefix length)), sni (a list of (pattern, pool index)),
    sni_required) and the listening, non-blocking sockets as (fd, frontend index) pairs.
    ``set_table`` must be called before the first ``poll``. ``poll(timeout_ms)`` forwards
    traffic without the GIL and returns True when a watched file descriptor (the control socket,
    the signal wake-up pipe) is readable, else False after ``timeout_ms`` or, when
    ``report_interval_ms`` is set and connection counts changed, as soon as that long has passed
    since the last ``report``. ``coalesce_us`` (0: off) is how long the loop sleeps on a timer
    before blocking while it churns through new connections near saturation: accepts in the
    last 10 ms, and at least ``coalesce_load`` percent of them spent handling events.
    """

    def __cinit__(self):
        builder_init(&self.builder)
        self.epfd = -1
        self.conns = NULL
        self.events = NULL
        self.free_pipes = NULL
        self.pools = NULL
        self.frontends = NULL
        self.listeners = NULL
        self.log_ring = NULL
        self.flows = NULL
        self.flow_buckets = NULL
        self.udp_in = NULL
        self.udp_out = NULL
        self.changed = NULL
        self.count_changed = NULL

    def __init__(self, list pools, list frontends, list listeners, *, int buffer_size=65536,
                 str splice="auto", int report_interval_ms=0, int max_events=512,
                 bint access_log=False, int coalesce_us=0, int coalesce_load=70):
        cdef int i
        if not pools or not frontends or not listeners:
            raise ValueError("a worker needs at least one pool, frontend and listener")
        if buffer_size < 4096:
            raise ValueError("buffer_size must be at least 4096")
        if splice not in SPLICE_MODES:
            raise ValueError(f"splice must be one of {', '.join(SPLICE_MODES)}")
        self.buffer_size = buffer_size
        self.splice_mode = SPLICE_MODES[splice]
        self.report_interval_ms = report_interval_ms
        self.report_counts = report_interval_ms > 0
        if not 0 <= coalesce_us < 1000000 or not 0 <= coalesce_load <= 100:
            raise ValueError("coalesce_us must be 0 to 999999 and coalesce_load 0 to 100")
        self.coalesce_us = coalesce_us
        self.coalesce_load = coalesce_load
        if coalesce_us:
            # The default slack of 50 µs would stretch every timed wait by that much.
            prctl(PR_SET_TIMERSLACK, 1000)
        self.max_free_bufs = 64
        self.max_free_pipes = 64
        self.max_events = max_events
        self.backend_index = {}
        self.sni_patterns = []

        self.pools = <Pool *>calloc(len(pools), sizeof(Pool))
        self.frontends = <Frontend *>calloc(len(frontends), sizeof(Frontend))
        self.listeners = <Listener *>calloc(len(listeners), sizeof(Listener))
        if self.pools == NULL or self.frontends == NULL or self.listeners == NULL:
            raise MemoryError()
        for spec in pools:
            self._add_pool(spec)
        for spec in frontends:
            self._add_frontend(spec)
        for fd, frontend in listeners:
            if not 0 <= frontend < self.nfrontends:
                raise ValueError(f"listener of an unknown frontend: {frontend}")
            self.listeners[self.nlisteners].fd = fd
            self.listeners[self.nlisteners].frontend = &self.frontends[frontend]
            self.nlisteners += 1
        udp_flows = [self.frontends[i].max_flows for i in range(self.nfrontends)
                     if self.frontends[i].udp]
        if udp_flows:
            udp_init(self, udp_flows)

        if access_log:
            self.log_size = LOG_RING_SIZE
            self.log_ring = <LogRecord *>calloc(self.log_size, sizeof(LogRecord))
            if self.log_ring == NULL:
                raise MemoryError()
        self.conns = <Conn *>calloc(self.max_conn or 1, sizeof(Conn))  # 0 with UDP alone
        self.events = <epoll_event *>calloc(max_events, sizeof(epoll_event))
        self.free_pipes = <int *>calloc(2 * self.max_free_pipes, sizeof(int))
        if self.conns == NULL or self.events == NULL or self.free_pipes == NULL:
            raise MemoryError()
        for i in range(self.max_conn - 1, -1, -1):
            self.conns[i].next = self.free_conns
            self.free_conns = &self.conns[i]

        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.now_ms = monotonic_ms()
        self.next_scan_ms = self.now_ms + SCAN_INTERVAL_MS
        for i in range(self.nlisteners):
            self.npaused += 1
            self._resume_listener(&self.listeners[i])
            if not self.listeners[i].listening:
                raise OSError(errno, "cannot watch a listening socket")

    cdef _add_pool(self, dict spec):
        cdef Pool *pool = &self.pools[self.npools]
        retries = spec.get("retries", 2)
        if not 0 <= retries < MAX_TRIES:
            raise ValueError(f"retries must be between 0 and {MAX_TRIES - 1}")
        hash_key = spec.get("hash_key", "src-ip")
        if hash_key not in ("src-ip", "src-ip-port"):
            raise ValueError("hash_key must be src-ip or src-ip-port")
        send_proxy = spec.get("send_proxy") or 0
        if send_proxy not in (0, 1, 2):
            raise ValueError("send_proxy must be 0, 1 or 2")
        on_down = spec.get("on_down")
        if on_down not in (None, "close"):
            raise ValueError("on_down must be None or 'close'")
        table_init(&pool.table, find_algorithm(spec["algorithm"]),
                   spec.get("balance_factor", 0.0))
        pool.table.panic_threshold = spec.get("panic_threshold", 0.0)
        pool.close_on_down = on_down == "close"
        pool.first_byte_timeout_ms = <int64_t>(spec.get("first_byte_timeout", 0.0) * 1000)
        pool.id = spec["id"]
        pool.connect_timeout_ms = <int64_t>(spec.get("connect_timeout", 5.0) * 1000)
        pool.max_tries = retries + 1
        pool.hash_port = hash_key == "src-ip-port"
        pool.send_proxy = send_proxy
        pool.udp_idle_timeout_ms = <int64_t>(spec.get("udp_idle_timeout", 30.0) * 1000)
        pool.udp_responses = spec.get("udp_responses", 0)
        self.npools += 1

    cdef _add_frontend(self, dict spec):
        cdef Frontend *fe = &self.frontends[self.nfrontends]
        pool = spec.get("pool", 0)
        if not 0 <= pool < self.npools:
            raise ValueError(f"frontend of an unknown pool: {pool}")
        max_conn = spec.get("max_conn", 10000)
        if max_conn < 1:
            raise ValueError("max_conn must be at least 1")
        fe.id = spec["id"]
        fe.pool = &self.pools[pool]
        fe.max_conn = max_conn
        fe.idle_timeout_ms = <int64_t>(spec.get("idle_timeout", 0.0) * 1000)
        fe.inspect_timeout_ms = <int64_t>(spec.get("inspect_timeout", 5.0) * 1000)
        fe.sni_required = bool(spec.get("sni_required", False))
        self.nfrontends += 1  # counted before the allocations: __dealloc__ frees them
        trusted = spec.get("trusted", [])
        sni = spec.get("sni", [])
        fe.trusted = <TrustedNet *>calloc(len(trusted) + 1, sizeof(TrustedNet))
        fe.sni = <SniRoute *>calloc(len(sni) + 1, sizeof(SniRoute))
        if fe.trusted == NULL or fe.sni == NULL:
            raise MemoryError()
        for family, packed, prefix in trusted:
            if len(packed) != (4 if family == AF_INET else 16) or not 0 <= prefix <= 8 * len(packed):
                raise ValueError(f"bad trusted network: {family}, {packed!r}/{prefix}")
            fe.trusted[fe.ntrusted].family = family
            fe.trusted[fe.ntrusted].prefix = prefix
            memcpy(fe.trusted[fe.ntrusted].addr, <const char *>packed, len(packed))
            fe.ntrusted += 1
        for pattern, route_pool in sni:
            if not 0 <= route_pool < self.npools:
                raise ValueError(f"SNI route to an unknown pool: {route_pool}")
            wildcard = pattern.startswith("*.")
            raw = pattern[1:].lower().encode() if wildcard else pattern.lower().encode()
            self.sni_patterns.append(raw)  # keeps the bytes alive for the pointer below
            fe.sni[fe.nsni].pattern = raw
            fe.sni[fe.nsni].len = len(raw)
            fe.sni[fe.nsni].wildcard = wildcard
            fe.sni[fe.nsni].pool = route_pool
            fe.nsni += 1
        fe.udp = bool(spec.get("udp", False))
        fe.max_flows = spec.get("max_flows", 10000)
        if fe.max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        if not fe.udp:
            self.max_conn += max_conn  # a UDP frontend holds flows, not connection slots

    def __dealloc__(self):
        cdef Conn *c
        cdef Buf *b
        cdef Channel *ch
        cdef int i
        with nogil:
            builder_stop(&self.builder)
        if self.conns != NULL:
            c = self.live
            while c != NULL:
                close(c.cfd)
                if c.bfd >= 0:
                    close(c.bfd)
                for i in range(2):
                    ch = &c.up if i == 0 else &c.down
                    if ch.buf != NULL:
                        free(ch.buf)
                    if ch.pipe_r >= 0:
                        close(ch.pipe_r)
                        close(ch.pipe_w)
                c = c.next
            free(self.conns)
        while self.free_bufs != NULL:
            b = self.free_bufs
            self.free_bufs = b.next
            free(b)
        if self.free_pipes != NULL:
            for i in range(2 * self.nfree_pipes):
                close(self.free_pipes[i])
            free(self.free_pipes)
        free(self.events)
        if self.pools != NULL:
            for i in range(self.npools):
                table_free(&self.pools[i].table)
                state_release(self.pools[i].built)
            free(self.pools)
        if self.frontends != NULL:
            for i in range(self.nfrontends):
                free(self.frontends[i].trusted)
                free(self.frontends[i].sni)
            free(self.frontends)
        udp_free(self)
        free(self.listeners)
        free(self.log_ring)
        free(self.changed)
        free(self.count_changed)
        if self.epfd >= 0:
            close(self.epfd)

    # ---- called from Python ------------------------------------------------------------------

    def watch(self, int fd):
        """Make ``poll`` return True whenever ``fd`` is readable (level-triggered)."""
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = TAG_WAKE
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "cannot watch file descriptor")

    def prepare_table(self, uint32_t pool_id, list rows):
        """A pool's next table, parsed and with its algorithm's state built (the costly part:
        a hash ring or a Maglev table), for set_table to swap in. rows as in set_table. Reads
        only the pool's fixed settings, so another thread may call it while poll runs; the
        build itself runs without the GIL, a slow one on the low-priority builder thread."""
        cdef Pool *pool = self._pool_by_id(pool_id)
        cdef PreparedTable prepared = PreparedTable()
        cdef Table parsed
        cdef int j, r
        table_init(&prepared.table, pool.table.algo, pool.table.balance_factor)
        prepared.table.panic_threshold = pool.table.panic_threshold
        prepared.pool_id = pool_id
        parsed = table_parse(rows, True)
        prepared.table.backends = parsed.backends
        prepared.table.n = parsed.n
        with nogil:
            r = builder_refresh(&self.builder, &prepared.table, &pool.built)
        if r < 0:
            raise MemoryError()
        prepared.index = {prepared.table.backends[j].id: j for j in range(prepared.table.n)}
        return prepared

    def set_table(self, uint32_t version, list pools):
        """Swap in whole backend tables: pools is a list of (pool id, rows), rows of (backend id,
        host, port, weight, up, backup), or of (pool id, a table from prepare_table). A pool
        left out keeps its table."""
        cdef int i
        cdef bint same_places = True
        cdef PreparedTable prepared
        for pool_id, rows in pools:
            if isinstance(rows, PreparedTable):
                prepared = rows
                if prepared.pool_id != pool_id or prepared.table.backends == NULL:
                    raise ValueError(f"a prepared table for pool {pool_id} used twice or elsewhere")
            else:
                prepared = self.prepare_table(pool_id, rows)
            same_places &= self._set_pool_table(self._pool_by_id(pool_id), prepared)
        if not same_places or not self.backend_index:
            self.backend_index = {
                self.pools[i].table.backends[j].id: (i, j)
                for i in range(self.npools) for j in range(self.pools[i].table.n)
            }
        self.table_version = version
        self.counts_changed = True
        self._requeue_changed()

    def set_others(self, dict others):
        """Active connections held by all other workers, by backend id; ids left out keep their
        last count. Returns how many ids were unknown (backends no longer in the tables)."""
        cdef int unknown = 0
        for backend_id, count in others.items():
            unknown += not self._set_others(backend_id, count)
        return unknown

    cdef bint _set_others(self, object backend_id, long count) except -1:
        # False where the tables have no such backend.
        cdef PyObject *where = PyDict_GetItem(self.backend_index, backend_id)
        if where == NULL:
            return False
        place = <tuple>where
        backend_set_others(&self.pools[<int>place[0]].table, <int>place[1], <int32_t>count)
        return True

    def close_backend(self, backend_id):
        """Resets every connection to a backend now, as on-down close does for one marked down
        (fastlb ctl kill-sessions); returns how many. An unknown id closes nothing."""
        cdef Conn *c = self.live
        cdef Conn *nxt
        cdef Pool *pool
        cdef int index, closed = 0
        where = self.backend_index.get(backend_id)
        if where is None:
            return 0
        pool = &self.pools[<int>where[0]]
        index = where[1]
        while c != NULL:
            nxt = c.next
            if c.pool == pool and c.backend == index:
                self._close(c, True, END_BACKEND_DOWN)
                closed += 1
            c = nxt
        return closed

    def poll(self, int timeout_ms):
        cdef int woke
        with nogil:
            woke = self._poll(timeout_ms)
        return bool(woke)

    def report(self, bint stats=True):
        """What changed since the last call, or None when nothing did: (table_version,
        backends, frontends, counts). With stats, backends are (id, active, new, up_bytes, down_bytes,
        failed, succeeded, streak, connect_hist, connect_ms_sum, duration_hist,
        duration_ms_sum) for each backend whose counters moved; active is absolute, the others
        are deltas (the histograms are lists of HIST_BUCKETS counts); frontends: (id, active,
        accepted, ended by END_* reason) likewise, and counts is empty. Without stats, only
        what must not wait: a whole row for each backend where a connect failed, no frontends,
        and counts {id: active} for the others whose count changed. Either walks only the
        backends that changed."""
        cdef int i, k
        cdef Backend *b
        cdef Frontend *fe
        cdef Conn *c
        backends = []
        counts = {}
        self.last_report_us = monotonic_us()
        self.counts_changed = False
        self.reported_since_us = self.counts_since_us
        self.counts_since_us = 0
        if not stats:
            for i in range(self.ncount_changed):
                b = self.count_changed[i]
                b.queued &= ~QUEUED_COUNT
                if b.failed:
                    backends.append(self._backend_row(b))
                elif b.local_active != b.reported_active:
                    counts[b.id] = b.local_active
                    b.reported_active = b.local_active
            self.ncount_changed = 0
            return (self.table_version, backends, [], counts) if backends or counts else None
        c = self.live
        while c != NULL:
            if c.pool != NULL:
                self._count_bytes(c)
            c = c.next
        for i in range(self.nchanged):
            b = self.changed[i]
            b.queued = 0
            if (b.local_active != b.reported_active or b.new_conns or b.up_bytes
                    or b.down_bytes or b.failed or b.succeeded):
                backends.append(self._backend_row(b))
        self.nchanged = self.ncount_changed = 0
        frontends = []
        for i in range(self.nfrontends):
            fe = &self.frontends[i]
            if fe.nconns == fe.reported_active and not fe.accepted:
                continue  # a connection that ended changed nconns: its reason rides along
            frontends.append((fe.id, fe.nconns, fe.accepted,
                              [fe.ended[k] for k in range(END_KINDS)]))
            fe.reported_active = fe.nconns
            fe.accepted = 0
            memset(fe.ended, 0, sizeof(fe.ended))
        if not backends and not frontends:
            return None
        return (self.table_version, backends, frontends, counts)

    cdef tuple _backend_row(self, Backend *b):
        """b's report row; its deltas start again from zero. The histograms leave out their
        trailing empty buckets (most connections fall in the first)."""
        cdef int k, nconnect = HIST_BUCKETS, nduration = HIST_BUCKETS
        while nconnect and not b.connect_hist[nconnect - 1]:
            nconnect -= 1
        while nduration and not b.duration_hist[nduration - 1]:
            nduration -= 1
        row = (b.id, b.local_active, b.new_conns, b.up_bytes, b.down_bytes, b.failed,
               b.succeeded, b.streak, [b.connect_hist[k] for k in range(nconnect)],
               b.connect_ms_sum, [b.duration_hist[k] for k in range(nduration)],
               b.duration_ms_sum)
        b.reported_active = b.local_active
        b.new_conns = b.up_bytes = b.down_bytes = 0
        b.failed = b.succeeded = 0
        memset(b.connect_hist, 0, sizeof(b.connect_hist))
        memset(b.duration_hist, 0, sizeof(b.duration_hist))
        b.connect_ms_sum = b.duration_ms_sum = 0
        return row

    cdef int _requeue_changed(self) except -1:
        """After a table swap the lists point into freed tables: sized anew and refilled with
        the backends that still have something to report."""
        cdef int i, j, total = 0
        cdef Backend *b
        cdef Backend **changed
        cdef Backend **count_changed
        for i in range(self.npools):
            total += self.pools[i].table.n
        changed = <Backend **>realloc(self.changed, (total + 1) * sizeof(Backend *))
        if changed == NULL:
            raise MemoryError()
        self.changed = changed
        count_changed = <Backend **>realloc(self.count_changed, (total + 1) * sizeof(Backend *))
        if count_changed == NULL:
            raise MemoryError()
        self.count_changed = count_changed
        self.changed_capacity = total
        self.nchanged = self.ncount_changed = 0
        for i in range(self.npools):
            for j in range(self.pools[i].table.n):
                b = &self.pools[i].table.backends[j]
                b.queued = 0
                if (b.local_active != b.reported_active or b.new_conns or b.up_bytes
                        or b.down_bytes or b.failed or b.succeeded):
                    self._count_changed(b)
        return 0

    cdef void _changed(self, Backend *b) noexcept nogil:
        # Puts b on the list of the next full report, once. Called without the GIL; touches no
        # Python objects.
        if b.queued & QUEUED_STATS or b == &self.detached:
            return
        if self.nchanged >= self.changed_capacity:
            return
        b.queued |= QUEUED_STATS
        self.changed[self.nchanged] = b
        self.nchanged += 1

    cdef void _count_changed(self, Backend *b) noexcept nogil:
        # b's active count changed or a connect to it failed: on both lists, and poll returns
        # soon when counts are reported on their own. Called without the GIL; touches no
        # Python objects.
        self._changed(b)
        if b.queued & QUEUED_COUNT or b == &self.detached:
            return
        if self.ncount_changed >= self.changed_capacity:
            return
        b.queued |= QUEUED_COUNT
        if self.counts_since_us == 0:
            self.counts_since_us = monotonic_us()
        self.count_changed[self.ncount_changed] = b
        self.ncount_changed += 1
        self.counts_changed = True

    def take_log(self):
        """The connections that ended since the last call, oldest first, as tuples: (client
        host, client port, start_ms, connected_ms (0: never), end_ms, up_bytes, down_bytes,
        frontend id, pool id, backend id (None when none), retries, end reason (END_*)), and
        the count of records dropped since the last call. Times are CLOCK_MONOTONIC ms."""
        cdef LogRecord *r
        cdef char host[64]
        cdef const void *raw
        cdef int family, port
        records = []
        while self.log_tail < self.log_head:
            r = &self.log_ring[self.log_tail % self.log_size]
            self.log_tail += 1
            family = r.client.sa.sa_family
            if family == AF_INET6:
                raw = &r.client.v6.sin6_addr
                port = ntohs(r.client.v6.sin6_port)
            else:
                raw = &r.client.v4.sin_addr
                port = ntohs(r.client.v4.sin_port)
            if inet_ntop(family, raw, host, sizeof(host)) == NULL:
                host[0] = 0
            records.append((host.decode(), port, r.start_ms, r.connected_ms, r.end_ms,
                            r.up_bytes, r.down_bytes, r.frontend,
                            None if r.pool == NO_ID else r.pool,
                            None if r.backend == NO_ID else r.backend, r.retries, r.reason))
        dropped = self.log_dropped
        self.log_dropped = 0
        return records, dropped

    def drain(self):
        """Stop accepting: close this worker's copies of the listening sockets."""
        cdef Listener *listener
        cdef int i
        self.draining = True
        for i in range(self.nlisteners):
            listener = &self.listeners[i]
            if listener.listening:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, listener.fd, NULL)
                listener.listening = False
            if listener.fd >= 0 and not listener.frontend.udp:
                # A UDP listener stays open: the replies of its flows leave through it.
                close(listener.fd)
                listener.fd = -1
        self.npaused = 0

    @property
    def counts_since_us(self):
        """When the oldest count change in the last report happened (CLOCK_MONOTONIC µs, as
        time.monotonic_ns() // 1000 reads it); 0 when it carried none."""
        return self.reported_since_us

    @property
    def active(self):
        """Connections and UDP flows this worker holds."""
        return self.nconns + self.nflows

    @property
    def coalesced(self):
        """How many times the loop slept coalesce_us on a timer instead of blocking."""
        return self.coalesced

    def report_udp(self):
        """The UDP frontends whose counters moved since the last call: (id, active flows,
        created, evicted, datagrams_in, bytes_in, datagrams_out, bytes_out, dropped by
        UDP_DROP_* reason); the counts but the first are deltas."""
        cdef Frontend *fe
        cdef UdpCounters *u
        cdef int i, k
        changes = []
        for i in range(self.nfrontends):
            fe = &self.frontends[i]
            u = &fe.udp_counts
            if not fe.udp or (fe.nflows == fe.reported_flows and not u.datagrams_in
                              and not u.datagrams_out and not u.created
                              and not any(u.dropped[k] for k in range(UDP_DROP_KINDS))):
                continue
            changes.append((fe.id, fe.nflows, u.created, u.evicted, u.datagrams_in, u.bytes_in,
                            u.datagrams_out, u.bytes_out,
                            [u.dropped[k] for k in range(UDP_DROP_KINDS)]))
            fe.reported_flows = fe.nflows
            memset(u, 0, sizeof(UdpCounters))
        return changes

    @property
    def held(self):
        """(buffers, pipes) held by connections: both 0 when none is open, or one leaked."""
        return (self.bufs_held, self.pipes_held)

    @property
    def pooled(self):
        """(buffers, pipes) kept in the pools, for tests of the bounds."""
        return (self.nfree_bufs, self.nfree_pipes)

    # ---- the loop (no GIL from here on) -------------------------------------------------------

    cdef int _poll(self, int timeout_ms) noexcept nogil:
        # Called without the GIL; touches no Python objects.
        cdef int64_t deadline = self.now_ms + timeout_ms, wait, remaining_us
        cdef int n, i
        cdef uint64_t data, tag
        cdef Conn *c
        cdef Conn *dead
        while True:
            if self.held_events:
                # The batch kept back by the previous call: its wake-up has been handled.
                n = self.held_events
                self.held_events = 0
            else:
                wait = deadline - self.now_ms
                if self.next_scan_ms - self.now_ms < wait:
                    wait = self.next_scan_ms - self.now_ms
                if self.npaused and wait > EMFILE_PAUSE_MS:
                    wait = EMFILE_PAUSE_MS
                if self.counts_changed and self.report_counts:
                    # Other workers pick by these counts: wake to report them.
                    remaining_us = (self.last_report_us + self.report_interval_ms * 1000
                                    - monotonic_us())
                    if (remaining_us + 999) // 1000 < wait:
                        wait = (remaining_us + 999) // 1000
                if wait < 0:
                    wait = 0
                n = self._wait(<int>wait)
                self.now_ms = monotonic_ms()
                # A control message can change the table or the counts that this batch's picks
                # use: let Python apply it first, and keep the batch for the next call.
                for i in range(n):
                    if self.events[i].data.u64 == TAG_WAKE:
                        self.held_events = n
                        return 1
            for i in range(n):
                data = self.events[i].data.u64
                tag = data & TAG_MASK
                if tag == TAG_LISTENER:
                    if (<Listener *>(data & ~TAG_MASK)).frontend.udp:
                        udp_read(self, <Listener *>(data & ~TAG_MASK))
                    else:
                        self._accept_burst(<Listener *>(data & ~TAG_MASK))
                elif tag != TAG_WAKE:
                    c = <Conn *>(data & ~TAG_MASK)
                    if c.state != CONN_CLOSED:
                        self._handle(c, tag == TAG_BACKEND, self.events[i].events)
                elif data != TAG_WAKE:
                    flow_reply(self, <Flow *>(data & ~TAG_MASK))
            if self.udp_out != NULL and self.udp_out.n:
                udp_flush(self)
            # Slots closed in this batch are reused only now: later events of the same batch
            # may still name them.
            while self.dead != NULL:
                dead = self.dead
                self.dead = dead.next
                dead.state = CONN_FREE
                dead.next = self.free_conns
                self.free_conns = dead
            if self.now_ms >= self.next_scan_ms:
                self._scan_timeouts()
                if self.nflows:
                    expire_flows(self)
                self.next_scan_ms = self.now_ms + SCAN_INTERVAL_MS
            if self.npaused:
                self._resume_listeners()
            if self.now_ms >= deadline:
                return 0
            if (self.counts_changed and self.report_counts
                    and monotonic_us() - self.last_report_us >= self.report_interval_ms * 1000):
                return 0

    cdef int _wait(self, int timeout_ms) noexcept nogil:
        # epoll_wait, except while the loop churns through new connections near saturation
        # (coalesce_load percent of the last window spent handling events, and accepts in
        # it): then, with nothing ready, it first sleeps coalesce_us on a timer and looks
        # again. Blocked in epoll_wait, the loop is woken by every packet, a cost the sender
        # pays (an interrupt to this CPU, an exit on a virtual machine); the packets that
        # arrive during the timed sleep queue up and are handled in one batch. Idle or
        # lightly loaded, and with long-lived connections, it blocks at once.
        cdef int64_t now_us
        cdef int n = 0
        cdef timespec pause
        if self.coalesce_us == 0 or (self.window_accepts == 0 and not self.churning):
            # Nothing to measure until an accept (long-lived connections): no clock read.
            self.window_us = 0
            return epoll_wait(self.epfd, self.events, self.max_events, timeout_ms)
        now_us = monotonic_us()
        if self.window_us == 0:
            self.window_us = now_us  # the first accept since the loop last measured
            self.busy_us = 0
        else:
            self.busy_us += now_us - self.woke_us
        if now_us - self.window_us >= LOAD_WINDOW_US:
            self.churning = (self.window_accepts > 0 and self.busy_us * 100
                             >= (now_us - self.window_us) * self.coalesce_load)
            self.window_us = now_us
            self.busy_us = 0
            self.window_accepts = 0
        if self.churning and timeout_ms > 0:
            n = epoll_wait(self.epfd, self.events, self.max_events, 0)
            if n <= 0:
                pause.tv_sec = 0
                pause.tv_nsec = self.coalesce_us * 1000
                clock_nanosleep(CLOCK_MONOTONIC, 0, &pause, NULL)
                self.coalesced += 1
                n = epoll_wait(self.epfd, self.events, self.max_events, 0)
        if n <= 0:
            n = epoll_wait(self.epfd, self.events, self.max_events, timeout_ms)
        self.woke_us = monotonic_us()
        return n

    cdef void _pause_listener(self, Listener *listener, int64_t until_ms) noexcept nogil:
        # Called without the GIL. until_ms 0: paused until its frontend has a free slot.
        if listener.listening:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, listener.fd, NULL)
            listener.listening = False
            self.npaused += 1
        listener.resume_ms = until_ms

    cdef void _resume_listener(self, Listener *listener) noexcept nogil:
        # Called without the GIL. The listener is level-triggered: a burst may stop early.
        cdef epoll_event ev
        listener.resume_ms = 0
        if listener.listening or listener.fd < 0:
            return
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>listener | TAG_LISTENER
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, listener.fd, &ev) == 0:
            listener.listening = True
            self.npaused -= 1

    cdef void _resume_listeners(self) noexcept nogil:
        # Called without the GIL, only while some listener is paused.
        cdef Listener *listener
        cdef int i
        if self.draining:
            return
        for i in range(self.nlisteners):
            listener = &self.listeners[i]
            if listener.listening:
                continue
            if listener.resume_ms:
                if self.now_ms >= listener.resume_ms:
                    self._resume_listener(listener)
            elif listener.frontend.nconns < listener.frontend.max_conn:
                self._resume_listener(listener)

    cdef void _accept_burst(self, Listener *listener) noexcept nogil:
        # Called without the GIL; touches no Python objects.
        cdef SockAddr addr
        cdef socklen_t addrlen
        cdef int fd, i, accepted = 0
        cdef Frontend *fe = listener.frontend
        while accepted < 64:
            if fe.nconns >= fe.max_conn:
                for i in range(self.nlisteners):
                    if self.listeners[i].frontend == fe:
                        self._pause_listener(&self.listeners[i], 0)
                return
            if self.free_conns == NULL:
                return  # slots closed in this batch free up at its end; epoll reports us again
            addrlen = sizeof(addr)
            fd = accept4(listener.fd, &addr.sa, &addrlen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR or errno == ECONNABORTED:
                    continue
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    # The connection stays queued; retrying now would spin the CPU.
                    self._pause_listener(listener, self.now_ms + EMFILE_PAUSE_MS)
                return
            accepted += 1
            fe.accepted += 1
            self.window_accepts += 1
            self._new_conn(listener, fd, &addr)

    cdef void _new_conn(self, Listener *listener, int fd, SockAddr *addr) noexcept nogil:
        # Called without the GIL; touches no Python objects.
        cdef Conn *c = self.free_conns
        cdef Frontend *fe = listener.frontend
        cdef epoll_event ev
        self.free_conns = c.next
        c.cfd = fd
        c.bfd = -1
        c.cflags = CAN_WRITE  # a new socket's send buffer is empty
        c.bflags = 0
        c.up.buf = c.down.buf = NULL
        c.up.pipe_r = c.up.pipe_w = c.down.pipe_r = c.down.pipe_w = -1
        c.up.piped = c.down.piped = 0
        c.up.spliced = c.down.spliced = self.splice_mode == SPLICE_ALWAYS
        c.backend = -1
        c.ntried = 0
        c.replayable = self.splice_mode != SPLICE_ALWAYS
        c.on_probation = False
        c.replay = NULL
        c.frontend = fe
        c.pool = NULL
        c.src = addr[0]
        c.dst.sa.sa_family = 0
        c.active_ms = self.now_ms
        c.start_ms = self.now_ms
        c.opened_ms = 0
        c.up_bytes = c.down_bytes = c.up_counted = c.down_counted = 0
        c.backend_id = NO_ID
        c.end_reason = 0
        c.prev = NULL
        c.next = self.live
        if self.live != NULL:
            self.live.prev = c
        self.live = c
        self.nconns += 1
        fe.nconns += 1
        c.waiting = 0
        if fe.ntrusted and is_trusted(fe, addr):
            c.waiting = WAIT_PROXY
        if fe.nsni:
            c.waiting |= WAIT_HELLO
        ev.events = CLIENT_EVENTS
        ev.data.u64 = <uint64_t>c
        c.state = CONN_CONNECTING
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            self._close(c, True, END_ERROR)
            return
        if c.waiting:
            # Read first, pick later. The peeked bytes go out from a buffer: copy that
            # direction until a read fills a buffer, even with splice always.
            c.state = CONN_PEEKING
            c.deadline_ms = self.now_ms + fe.inspect_timeout_ms
            c.up.spliced = False
            return
        self._start_pick(c, fe.pool)

    cdef void _start_pick(self, Conn *c, Pool *pool) noexcept nogil:
        # The pool is known: hash the client if the pool's algorithm needs it, and connect.
        # Called without the GIL; touches no Python objects.
        c.pool = pool
        c.state = CONN_CONNECTING
        if pool.table.algo.needs & NEEDS_CLIENT_KEY:
            c.key = hash_sockaddr(<sockaddr_storage *>&c.src, pool.hash_port)
        else:
            c.key = 0
        if self._connect_next(c) < 0:
            self._close(c, True, END_CONNECT_FAILED)

    cdef void _peek(self, Conn *c) noexcept nogil:
        # Reads what the frontend must see before the pick (a PROXY header from a trusted
        # sender, then a ClientHello for SNI routing) into the connection's first buffer, at
        # most PEEK_MAX bytes, and picks once it has them. Called without the GIL; touches no
        # Python objects.
        cdef Frontend *fe = c.frontend
        cdef Buf *b = c.up.buf
        cdef ProxyHeader header
        cdef SniResult hello
        cdef size_t cap = PEEK_MAX if PEEK_MAX < self.buffer_size else self.buffer_size
        cdef size_t want
        cdef ssize_t n
        cdef int r, route
        if b == NULL:
            b = self._buf_get()
            if b == NULL:
                self._close(c, True, END_ERROR)
                return
            b.off = 0
            b.len = 0
            c.up.buf = b
        while True:
            if c.waiting & WAIT_PROXY:
                r = proxy_parse(<const uint8_t *>b.data, b.len, &header)
                if r == PEEK_ERROR or (r == PEEK_MORE and (b.len >= cap or c.cflags & READ_EOF)):
                    self._reject(c)
                    return
                if r > 0:
                    if header.command == PROXY_PROXY and header.family != 0:
                        c.src = header.src
                        c.dst = header.dst
                    b.len -= r
                    memmove(b.data, b.data + r, b.len)  # a replay must not resend the header
                    c.waiting &= ~WAIT_PROXY
                    continue
            elif c.waiting & WAIT_HELLO:
                r = sni_parse(<const uint8_t *>b.data, b.len, &hello)
                if r == PEEK_MORE and (b.len >= cap or c.cflags & READ_EOF):
                    r = PEEK_ERROR
                if r != PEEK_MORE:
                    route = -1
                    if r > 0 and hello.found:
                        route = sni_match(fe.sni, fe.nsni, hello.name, hello.len)
                    if route >= 0:
                        self._peek_done(c, &self.pools[fe.sni[route].pool])
                    elif fe.sni_required:
                        self._reject(c)
                    else:
                        self._peek_done(c, fe.pool)
                    return
            else:
                self._peek_done(c, fe.pool)
                return
            if not c.cflags & CAN_READ:
                return  # wait for more
            want = cap - b.len
            n = recv(c.cfd, b.data + b.len, want, 0)
            if n > 0:
                b.len += n
                if <size_t>n < want and not c.cflags & PEER_RDHUP:
                    c.cflags &= ~CAN_READ  # short read: drained
            elif n == 0:
                c.cflags = (c.cflags | READ_EOF) & ~CAN_READ
                if b.len == 0:
                    self._close(c, False, END_CLIENT_CLOSED)  # closed before sending anything
                    return
            elif errno == EAGAIN:
                c.cflags &= ~CAN_READ
            elif errno != EINTR:
                self._close(c, True, END_CLIENT_RESET)
                return

    cdef void _peek_done(self, Conn *c, Pool *pool) noexcept nogil:
        # Called without the GIL; touches no Python objects.
        c.waiting = 0
        if c.up.buf != NULL and c.up.buf.len == 0:
            self._buf_put(c.up.buf)  # nothing but a PROXY header: hold no buffer
            c.up.buf = NULL
        self._start_pick(c, pool)

    cdef void _reject(self, Conn *c) noexcept nogil:
        # A trusted sender without a valid PROXY header, or no SNI route with sni-required.
        # Called without the GIL; touches no Python objects.
        self._close(c, False, END_REJECTED)

    cdef int _send_proxy_header(self, Conn *c) noexcept nogil:
        # Sends the PROXY header on a backend connection that has just connected: its socket
        # buffer is empty, so one small send goes out whole. Returns -1 when it did not.
        # Called without the GIL; touches no Python objects.
        cdef uint8_t header[PROXY_MAX_HEADER]
        cdef socklen_t addrlen = sizeof(SockAddr)
        cdef int length, flags = MSG_NOSIGNAL
        if c.dst.sa.sa_family == 0:
            if getsockname(c.cfd, &c.dst.sa, &addrlen) < 0:
                return -1
        length = proxy_build(c.pool.send_proxy, &c.src, &c.dst, header, PROXY_MAX_HEADER)
        if length < 0:
            return -1
        if c.up.buf != NULL and c.up.buf.len > 0:
            flags |= MSG_MORE  # the peeked bytes follow at once: one segment for both
        return 0 if send(c.bfd, header, length, flags) == length else -1

    cdef int _connect_next(self, Conn *c) noexcept nogil:
        # Starts a non-blocking connect to the next backend the algorithm picks, skipping those
        # this connection already failed on. Returns -1 when no backend is left to try.
        # Called without the GIL; touches no Python objects.
        cdef int index, fd, one = 1
        cdef Pool *pool = c.pool
        cdef Backend *b
        cdef epoll_event ev
        while c.ntried < pool.max_tries:
            index = pool.table.algo.pick(&pool.table, c.key, c.tried, c.ntried)
            if index < 0:
                # Every backend in use was tried: the up backups, then the primaries marked
                # down, before giving up.
                index = table_fallback(&pool.table, c.tried, c.ntried)
            if index < 0:
                return -1
            c.tried[c.ntried] = index
            c.ntried += 1
            b = &pool.table.backends[index]
            fd = socket(b.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            if fd < 0:
                return -1
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            if connect(fd, <sockaddr *>&b.addr, b.addrlen) == 0 or errno == EINPROGRESS:
                ev.events = CONN_EVENTS
                ev.data.u64 = <uint64_t>c | TAG_BACKEND
                if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                    close(fd)
                    return -1
                c.bfd = fd
                c.bflags = 0
                c.backend = index
                c.backend_id = b.id
                c.opened_ms = 0
                c.state = CONN_CONNECTING
                c.deadline_ms = self.now_ms + pool.connect_timeout_ms
                backend_add_local(&pool.table, index, 1)
                self._count_changed(b)
                return 0
            close(fd)
            b.failed += 1
            b.streak += 1
            self._count_changed(b)
        return -1

    cdef bint _closed_early(self, Conn *c) noexcept nogil:
        # A backend that closes before its first byte this soon after accepting, while the
        # client still talks, counts as failed: it may be refusing work while its listener
        # still accepts. (After the client's FIN, closing is the backend's answer.) Called
        # without the GIL; touches no Python objects.
        return (not c.cflags & READ_EOF
                and self.now_ms - c.opened_ms <= c.pool.connect_timeout_ms)

    cdef void _connect_failed(self, Conn *c) noexcept nogil:
        # The backend refused, reset or did not answer in time: count it and try the next one.
        # Called without the GIL; touches no Python objects.
        cdef Backend *b = self._backend_of(c)
        b.failed += 1
        b.streak += 1
        self._count_changed(b)
        close(c.bfd)
        c.bfd = -1
        self._count_bytes(c)
        self._release_backend(c)
        if self._connect_next(c) < 0:
            self._close(c, True, END_CONNECT_FAILED)

    cdef void _prove(self, Conn *c) noexcept nogil:
        # The connection to its backend held: count the connect a success.
        cdef Backend *b = self._backend_of(c)
        c.on_probation = False
        b.succeeded += 1
        b.streak = 0
        self._changed(b)

    cdef void _drop_replay(self, Conn *c) noexcept nogil:
        # The backend answered, or too much was sent to keep: no retry from here on.
        if c.on_probation:
            self._prove(c)
        c.replayable = False
        if c.replay != NULL:
            self._buf_put(c.replay)
            c.replay = NULL

    cdef bint _retry_after_reset(self, Conn *c) noexcept nogil:
        # The backend failed before sending a byte, and all we sent it is still buffered: count
        # a failure and send it again to the next backend. Returns False when that is not
        # possible (the caller then closes). Called without the GIL; touches no Python objects.
        cdef Buf *b = c.up.buf
        if not c.replayable or c.cflags & WRITE_SHUT:
            return False
        c.on_probation = False  # a failure, which _connect_failed counts
        if b == NULL:
            b = c.replay
            c.replay = NULL
            c.up.buf = b
        if b != NULL:
            b.len += b.off  # the first buffer, from its start: sent and unsent bytes alike
            b.off = 0
        c.bflags = 0
        self._connect_failed(c)
        return True

    cdef Backend *_backend_of(self, Conn *c) noexcept nogil:
        # A reload can remove the backend of an open connection: it then counts elsewhere.
        if c.backend < 0:
            return &self.detached
        return &c.pool.table.backends[c.backend]

    cdef void _release_backend(self, Conn *c) noexcept nogil:
        if c.backend >= 0:
            backend_add_local(&c.pool.table, c.backend, -1)
            self._count_changed(&c.pool.table.backends[c.backend])
            c.backend = -1

    cdef void _handle(self, Conn *c, bint backend_side, uint32_t ev) noexcept nogil:
        # One epoll event on one socket of a connection. Called without the GIL; touches no
        # Python objects.
        cdef Backend *b
        cdef int r
        cdef int64_t took
        c.active_ms = self.now_ms
        if backend_side:
            if c.state == CONN_CONNECTING:
                if ev & (EPOLLERR | EPOLLHUP):
                    self._connect_failed(c)
                    return
                if not ev & EPOLLOUT:
                    return
                if c.pool.send_proxy and self._send_proxy_header(c) < 0:
                    self._connect_failed(c)
                    return
                c.state = CONN_OPEN
                c.opened_ms = self.now_ms
                c.sent_ms = 0
                b = self._backend_of(c)
                b.new_conns += 1
                self._changed(b)
                # The connect started connect_timeout before its deadline.
                took = self.now_ms - (c.deadline_ms - c.pool.connect_timeout_ms)
                b.connect_hist[bucket(CONNECT_BOUNDS_MS, took)] += 1
                b.connect_ms_sum += took
                # A connect counts as a success once the backend answers or can no longer be
                # left for another (passive detection of a backend that accepts, then fails).
                c.on_probation = True
                if not c.replayable:
                    self._prove(c)
            c.bflags |= flags_from_events(ev)
        else:
            c.cflags |= flags_from_events(ev)
            if c.state == CONN_PEEKING:
                if ev & EPOLLERR:
                    self._close(c, True, END_CLIENT_RESET)
                else:
                    self._peek(c)
                return
            if c.state == CONN_CONNECTING:
                if ev & EPOLLERR:
                    self._close(c, True, END_CLIENT_RESET)
                return  # client bytes wait in the socket until the backend is connected
        # _pump returns -1 when its source socket failed, -2 when its destination did.
        b = self._backend_of(c)
        r = self._pump(c, &c.up, c.cfd, &c.cflags, c.bfd, &c.bflags, &c.up_bytes)
        if r < 0:
            if not (r == -2 and self._retry_after_reset(c)):
                self._close(c, True, END_CLIENT_RESET if r == -1 else END_BACKEND_RESET)
            return
        r = self._pump(c, &c.down, c.bfd, &c.bflags, c.cfd, &c.cflags, &c.down_bytes)
        if r < 0:
            if not (r == -1 and self._retry_after_reset(c)):
                self._close(c, True, END_CLIENT_RESET if r == -2 else END_BACKEND_RESET)
            return
        if not c.cflags & (CAN_WRITE | OUT_WATCHED) and self._watch_client_out(c) < 0:
            self._close(c, True, END_ERROR)
            return
        if (c.cflags & c.bflags & READ_EOF) and (c.cflags & c.bflags & WRITE_SHUT):
            self._close(c, False, END_CLIENT_CLOSED)

    cdef int _watch_client_out(self, Conn *c) noexcept nogil:
        # The client's send buffer is full: from now on its EPOLLOUT edges matter. Modifying
        # the registration polls the socket again, so room made meanwhile is reported too.
        cdef epoll_event ev
        ev.events = CONN_EVENTS
        ev.data.u64 = <uint64_t>c
        if epoll_ctl(self.epfd, EPOLL_CTL_MOD, c.cfd, &ev) < 0:
            return -1
        c.cflags |= OUT_WATCHED
        return 0

    cdef int _pump(self, Conn *c, Channel *ch, int src, uint32_t *sflags, int dst,
                   uint32_t *dflags, uint64_t *counter) noexcept nogil:
        # Moves bytes src -> dst until one side would block. Returns -1 on a socket error.
        # Called without the GIL; touches no Python objects.
        cdef Buf *b = ch.buf
        cdef ssize_t n
        cdef int r
        cdef bint fin_follows = False  # a short read came with a FIN pending: read it first
        cdef bint src_failed = False
        if ch.spliced:
            r = self._pump_splice(ch, src, sflags, dst, dflags, counter)
            if r != NO_PIPE:
                if c.end_reason == 0 and dflags[0] & WRITE_SHUT:
                    c.end_reason = END_CLIENT_CLOSED if ch == &c.up else END_BACKEND_CLOSED
                return r
            ch.spliced = False  # out of file descriptors for a pipe: copy instead
        while True:
            if b != NULL and b.len > 0 and not fin_follows:
                if not dflags[0] & CAN_WRITE:
                    break
                # The last bytes before a FIN: MSG_MORE holds them for the FIN that
                # propagate_eof sends right after, data and FIN in one segment (one fewer
                # for the peer to ACK, as HAProxy does).
                n = send(dst, b.data + b.off, b.len,
                         MSG_NOSIGNAL | MSG_MORE if sflags[0] & READ_EOF else MSG_NOSIGNAL)
                if n < 0:
                    if errno == EAGAIN:
                        dflags[0] &= ~CAN_WRITE
                        break
                    if errno == EINTR:
                        continue
                    ch.buf = b
                    return -2
                b.off += n
                b.len -= n
                counter[0] += n
                if b.len > 0:
                    dflags[0] &= ~CAN_WRITE  # a short send means the socket buffer is full
                    break
                if c.replayable and ch == &c.up:
                    c.replay = b  # keep what the backend has not answered yet
                    b = NULL
            if (sflags[0] & READ_EOF) or not sflags[0] & CAN_READ:
                break
            if c.replay != NULL and ch == &c.up:
                self._drop_replay(c)  # a second chunk: more than one buffer to keep
            if b == NULL:
                b = self._buf_get()
                if b == NULL:
                    return -1
            elif b.len == 0:
                b.off = 0
            # Into the buffer's free space: the read after a short one (FIN pending) appends.
            n = recv(src, b.data + b.len, self.buffer_size - b.len, 0)
            if n > 0:
                b.len += n
                if c.replayable and ch == &c.down:
                    self._drop_replay(c)
                if fin_follows:
                    fin_follows = False  # more data came first: send it, then read on
                elif <uint32_t>n < self.buffer_size:
                    # Short read: drained, unless a FIN is pending behind the data. Then it
                    # is read now, before the data goes out, so that both leave together.
                    if sflags[0] & PEER_RDHUP:
                        fin_follows = True
                    else:
                        sflags[0] &= ~CAN_READ
                elif self.splice_mode == SPLICE_AUTO:
                    ch.spliced = True  # bulk transfer: send this buffer, splice the rest
                    self._drop_replay(c)
                continue
            if n == 0:
                sflags[0] = (sflags[0] | READ_EOF) & ~CAN_READ
            elif errno == EAGAIN:
                sflags[0] &= ~CAN_READ
            elif errno != EINTR:
                if not fin_follows:
                    ch.buf = b
                    return -1
                # Forward what came before the error, then fail (as without the second read).
                src_failed = True
                sflags[0] &= ~CAN_READ
            fin_follows = False
        if b != NULL and b.len == 0:
            self._buf_put(b)
            b = NULL
        ch.buf = b
        if src_failed:
            return -1
        if ch.spliced and b == NULL:
            r = self._pump_splice(ch, src, sflags, dst, dflags, counter)
            if r != NO_PIPE:
                if c.end_reason == 0 and dflags[0] & WRITE_SHUT:
                    c.end_reason = END_CLIENT_CLOSED if ch == &c.up else END_BACKEND_CLOSED
                return r
            ch.spliced = False
        if (sflags[0] & READ_EOF) and b == NULL and not dflags[0] & WRITE_SHUT:
            if c.replayable and ch == &c.down and self._closed_early(c):
                return -1  # the backend closed without answering: the caller retries
            if c.end_reason == 0:
                c.end_reason = END_CLIENT_CLOSED if ch == &c.up else END_BACKEND_CLOSED
            propagate_eof(dst, dflags, sflags[0])
        return 0

    cdef int _pump_splice(self, Channel *ch, int src, uint32_t *sflags, int dst,
                          uint32_t *dflags, uint64_t *counter) noexcept nogil:
        # Like _pump, but the bytes go socket -> pipe -> socket inside the kernel.
        # Called without the GIL; touches no Python objects.
        cdef ssize_t n
        if ch.buf != NULL:
            return 0  # copy-mode bytes still pending: _pump sends them first
        while True:
            if ch.piped > 0:
                if not dflags[0] & CAN_WRITE:
                    break
                n = splice(ch.pipe_r, NULL, dst, NULL, ch.piped, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n < 0:
                    if errno == EAGAIN:
                        dflags[0] &= ~CAN_WRITE
                        break
                    if errno == EINTR:
                        continue
                    return -2
                ch.piped -= n
                counter[0] += n
                if ch.piped > 0:
                    dflags[0] &= ~CAN_WRITE
                    break
            if (sflags[0] & READ_EOF) or not sflags[0] & CAN_READ:
                break
            if ch.pipe_r < 0 and self._pipe_get(ch) < 0:
                return NO_PIPE
            n = splice(src, NULL, ch.pipe_w, NULL, self.buffer_size,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                # Unlike recv, a short splice does not mean the socket is drained: the pipe can
                # run out of page slots first. Read on until EAGAIN.
                ch.piped = n
            elif n == 0:
                sflags[0] = (sflags[0] | READ_EOF) & ~CAN_READ
            elif errno == EAGAIN:
                sflags[0] &= ~CAN_READ  # the pipe is empty here, so the socket is
            elif errno != EINTR:
                return -1
        if ch.piped == 0 and ch.pipe_r >= 0:
            self._pipe_put(ch)
        if (sflags[0] & READ_EOF) and ch.piped == 0 and not dflags[0] & WRITE_SHUT:
            propagate_eof(dst, dflags, sflags[0])
        return 0

    cdef void _close(self, Conn *c, bint reset, int reason) noexcept nogil:
        # Closes both sockets; with reset, the peers see RST instead of FIN. reason (END_*)
        # says why, unless one was recorded before. Called without the GIL; touches no Python
        # objects.
        cdef Channel *ch
        cdef Backend *b
        cdef int k
        if c.end_reason == 0:
            c.end_reason = reason
        if 0 <= c.end_reason < END_KINDS:
            c.frontend.ended[c.end_reason] += 1
        if c.opened_ms and c.backend >= 0:
            b = &c.pool.table.backends[c.backend]
            b.duration_hist[bucket(DURATION_BOUNDS_MS, self.now_ms - c.start_ms)] += 1
            b.duration_ms_sum += self.now_ms - c.start_ms
        if self.log_ring != NULL:
            self._log(c)
        if reset:
            set_linger_reset(c.cfd)
            if c.bfd >= 0:
                set_linger_reset(c.bfd)
        close(c.cfd)
        if c.bfd >= 0:
            close(c.bfd)
            c.bfd = -1
        for k in range(2):
            ch = &c.up if k == 0 else &c.down
            if ch.buf != NULL:
                self._buf_put(ch.buf)
                ch.buf = NULL
            if ch.pipe_r >= 0:
                if ch.piped == 0:
                    self._pipe_put(ch)
                else:
                    close(ch.pipe_r)  # bytes still in it: no use to anyone else
                    close(ch.pipe_w)
                    ch.pipe_r = ch.pipe_w = -1
                    ch.piped = 0
                    self.pipes_held -= 1
        self._drop_replay(c)
        self._count_bytes(c)
        self._release_backend(c)
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.live = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        c.state = CONN_CLOSED
        c.next = self.dead
        self.dead = c
        self.nconns -= 1
        c.frontend.nconns -= 1

    cdef void _count_bytes(self, Conn *c) noexcept nogil:
        # Adds what the connection moved since the last call to its backend's counters.
        # Called without the GIL; touches no Python objects.
        cdef Backend *b = self._backend_of(c)
        if c.up_bytes == c.up_counted and c.down_bytes == c.down_counted:
            return
        b.up_bytes += c.up_bytes - c.up_counted
        b.down_bytes += c.down_bytes - c.down_counted
        self._changed(b)
        c.up_counted = c.up_bytes
        c.down_counted = c.down_bytes

    cdef void _log(self, Conn *c) noexcept nogil:
        # Records the connection in the access log's ring; a full ring drops it (counted):
        # forwarding never waits for the writer. Called without the GIL; touches no Python
        # objects.
        cdef LogRecord *r
        if self.log_head - self.log_tail >= self.log_size:
            self.log_dropped += 1
            return
        r = &self.log_ring[self.log_head % self.log_size]
        self.log_head += 1
        r.client = c.src
        r.start_ms = c.start_ms
        r.connected_ms = c.opened_ms
        r.end_ms = self.now_ms
        r.up_bytes = c.up_bytes
        r.down_bytes = c.down_bytes
        r.frontend = c.frontend.id
        r.pool = c.pool.id if c.pool != NULL else NO_ID
        r.backend = c.backend_id
        r.retries = c.ntried - 1 if c.ntried > 0 else 0
        r.reason = c.end_reason

    cdef void _scan_timeouts(self) noexcept nogil:
        # Called without the GIL; touches no Python objects.
        cdef Conn *c = self.live
        cdef Conn *nxt
        cdef int64_t idle_ms
        while c != NULL:
            nxt = c.next
            if c.state == CONN_CONNECTING:
                if c.bfd >= 0 and self.now_ms >= c.deadline_ms:
                    self._connect_failed(c)
            elif c.state == CONN_PEEKING:
                if self.now_ms >= c.deadline_ms:
                    # No PROXY header in time: refuse. No whole ClientHello: route without SNI.
                    if c.waiting & WAIT_PROXY or c.frontend.sni_required:
                        self._reject(c)
                    else:
                        self._peek_done(c, c.frontend.pool)
            else:
                if c.pool.first_byte_timeout_ms and c.replayable and c.replay != NULL:
                    # The client's bytes went out and nothing came back yet (to within a scan).
                    if c.sent_ms == 0:
                        c.sent_ms = self.now_ms
                    elif self.now_ms - c.sent_ms >= c.pool.first_byte_timeout_ms:
                        if not self._retry_after_reset(c):
                            self._close(c, True, END_FIRST_BYTE_TIMEOUT)
                        c = nxt
                        continue
                idle_ms = c.frontend.idle_timeout_ms
                if idle_ms > 0 and self.now_ms - c.active_ms >= idle_ms:
                    self._close(c, False, END_IDLE_TIMEOUT)
            c = nxt

    cdef Buf *_buf_get(self) noexcept nogil:
        # An empty buffer. A new one is emptied too: a recv that reads nothing (EAGAIN, EOF)
        # leaves it as it came, and the caller keeps or pools it by its length.
        cdef Buf *b = self.free_bufs
        if b != NULL:
            self.free_bufs = b.next
            self.nfree_bufs -= 1
        else:
            b = <Buf *>malloc(sizeof(Buf) + self.buffer_size)
            if b == NULL:
                return NULL
        b.off = 0
        b.len = 0
        self.bufs_held += 1
        return b

    cdef void _buf_put(self, Buf *b) noexcept nogil:
        self.bufs_held -= 1
        if self.nfree_bufs >= self.max_free_bufs:
            free(b)
            return
        b.next = self.free_bufs
        self.free_bufs = b
        self.nfree_bufs += 1

    cdef int _pipe_get(self, Channel *ch) noexcept nogil:
        cdef int fds[2]
        if self.nfree_pipes > 0:
            self.nfree_pipes -= 1
            ch.pipe_r = self.free_pipes[2 * self.nfree_pipes]
            ch.pipe_w = self.free_pipes[2 * self.nfree_pipes + 1]
        else:
            if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
                return -1
            # A pipe holds 64 KiB by default; let it hold one buffer's worth.
            fcntl(fds[1], F_SETPIPE_SZ, <int>self.buffer_size)
            ch.pipe_r = fds[0]
            ch.pipe_w = fds[1]
        self.pipes_held += 1
        return 0

    cdef void _pipe_put(self, Channel *ch) noexcept nogil:
        self.pipes_held -= 1
        if self.nfree_pipes >= self.max_free_pipes:
            close(ch.pipe_r)
            close(ch.pipe_w)
        else:
            self.free_pipes[2 * self.nfree_pipes] = ch.pipe_r
            self.free_pipes[2 * self.nfree_pipes + 1] = ch.pipe_w
            self.nfree_pipes += 1
        ch.pipe_r = ch.pipe_w = -1

    cdef Pool *_pool_by_id(self, uint32_t pool_id) except NULL:
        cdef int i
        for i in range(self.npools):
            if self.pools[i].id == pool_id:
                return &self.pools[i]
        raise ValueError(f"table for an unknown pool: {pool_id}")

    cdef int _set_pool_table(self, Pool *pool, PreparedTable prepared) except -1:
        # The swap itself: O(backends + live connections), no algorithm build.
        cdef Table *table = &pool.table
        cdef Table *new = &prepared.table
        cdef Backend *old = table.backends
        cdef int old_n = table.n
        cdef int *remap = NULL
        cdef Conn *c
        cdef Conn *nxt
        cdef int i, j
        cdef bint same_places = old_n == new.n
        remap = <int *>malloc((old_n + 1) * sizeof(int))
        if remap == NULL:
            raise MemoryError()
        # Live connections keep their backend across the swap when its id is still there. A
        # health or weight change keeps every id in its place: no lookups then.
        for i in range(old_n):
            if not same_places or old[i].id != new.backends[i].id:
                same_places = False
                break
            remap[i] = i
        if not same_places:
            new_index = prepared.index
            for i in range(old_n):
                remap[i] = new_index.get(old[i].id, -1)
        # While the old table still counts them: on-down = "close" resets the connections of a
        # backend that goes down, and the others' bytes are added to their backends.
        c = self.live
        while c != NULL:
            nxt = c.next
            if c.pool == pool:
                j = remap[c.backend] if c.backend >= 0 else -1
                # Weight 0 is a drain (the operator's): its connections finish.
                if (pool.close_on_down and j >= 0 and old[c.backend].up
                        and not new.backends[j].up and new.backends[j].weight > 0):
                    self._close(c, True, END_BACKEND_DOWN)
                else:
                    self._count_bytes(c)
            c = nxt
        for i in range(old_n):
            if remap[i] >= 0:
                backend_carry(&new.backends[remap[i]], &old[i])
        table_adopt(table, new)
        c = self.live
        while c != NULL:
            if c.pool == pool:
                if c.backend >= 0:
                    c.backend = remap[c.backend]
                    if c.backend >= 0:
                        table.backends[c.backend].local_active += 1
                for i in range(c.ntried):
                    c.tried[i] = remap[c.tried[i]]
            c = c.next
        if self.nflows:
            remap_flows(self, pool, remap)
        free(remap)
        # The counts carried and recounted above: the eligible total and count-ordered state.
        table_adopt_counts(table)
        return same_places


cdef class PreparedTable:
    """A table from Worker.prepare_table, waiting for Worker.set_table."""

    def __dealloc__(self):
        table_free(&self.table)


cdef class Balancer:
    """An algorithm over a backend table, without sockets: for tests and benchmarks.

    ``Balancer(algorithm, rows)`` with rows of (host, port, weight, up, backup); ``pick(key)``
    returns a backend index, ``pick_address(host, port)`` hashes a client address first.
    """

    def __cinit__(self):
        builder_init(&self.builder)
        self.built = NULL

    def __init__(self, str algorithm, list rows, double balance_factor=0.0):
        table_init(&self.table, find_algorithm(algorithm), balance_factor)
        self._apply(rows)

    def __dealloc__(self):
        with nogil:
            builder_stop(&self.builder)
        table_free(&self.table)
        state_release(self.built)

    cdef int _apply(self, list rows) except -1:
        new = table_parse(rows, False)
        table_swap(&self.table, &new)
        if table_refresh(&self.table) < 0:
            raise MemoryError()
        self.names = [f"{row[0]}:{row[1]}" for row in rows]
        return 0

    def update(self, list rows):
        """Replace the table (weights, health, the set itself), the algorithm starting anew."""
        self._apply(rows)

    def adopt(self, list rows):
        """Replace the table as a worker's prepare_table and set_table do: built apart (a hash
        algorithm's state shared with the last build when only health changed), then swapped
        in, the algorithm resuming where it was. Counts start from zero."""
        cdef Table prepared
        cdef Table parsed
        cdef int r
        table_init(&prepared, self.table.algo, self.table.balance_factor)
        prepared.panic_threshold = self.table.panic_threshold
        parsed = table_parse(rows, False)
        prepared.backends = parsed.backends
        prepared.n = parsed.n
        with nogil:
            r = builder_refresh(&self.builder, &prepared, &self.built)
        if r < 0:
            table_free(&prepared)
            raise MemoryError()
        table_adopt(&self.table, &prepared)
        table_adopt_counts(&self.table)
        self.names = [f"{row[0]}:{row[1]}" for row in rows]

    def pick(self, uint64_t key=0, tried=()):
        cdef int ctried[MAX_TRIES]
        cdef int n = 0
        for index in tried[:MAX_TRIES]:
            ctried[n] = index
            n += 1
        return self.table.algo.pick(&self.table, key, ctried, n)

    def pick_address(self, str host, int port=0, bint with_port=False):
        return self.pick(hash_client(host, port, with_port))

    def bench(self, uint64_t n, uint64_t key_seed=0, bint churn=False):
        """Runs n picks without the GIL, key k being mix64(key_seed + k); returns nanoseconds.
        With churn, each pick is followed by a connect and a close of the backend picked."""
        cdef timespec start, end
        cdef uint64_t k
        cdef int i
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &start)
            for k in range(n):
                i = self.table.algo.pick(&self.table, mix64(key_seed + k), NULL, 0)
                if churn and i >= 0:
                    backend_add_local(&self.table, i, 1)
                    backend_add_local(&self.table, i, -1)
            clock_gettime(CLOCK_MONOTONIC, &end)
        return (end.tv_sec - start.tv_sec) * 1000000000 + (end.tv_nsec - start.tv_nsec)

    def connect(self, int index):
        """Count one more active connection on a backend (this balancer's own)."""
        backend_add_local(&self.table, index, 1)

    def disconnect(self, int index):
        backend_add_local(&self.table, index, -1)

    def set_others(self, list others):
        for i in range(self.table.n):
            backend_set_others(&self.table, i, others[i])

    def active(self):
        return [self.table.backends[i].local_active for i in range(self.table.n)]

    @property
    def eligible(self):
        """Indices of the backends in use (up primaries, else up backups, else all primaries)."""
        return [self.table.eligible[i] for i in range(self.table.n_eligible)]

    @property
    def names(self):
        return list(self.names)


def algorithm_names():
    """Names of the compiled algorithms, in registration order."""
    return [ALGORITHMS[i].name.decode() for i in range(N_ALGORITHMS)]


def histogram_bounds():
    """The upper bounds (ms) of the connect-time and duration histogram buckets."""
    return (tuple(CONNECT_BOUNDS_MS[i] for i in range(HIST_BUCKETS - 1)),
            tuple(DURATION_BOUNDS_MS[i] for i in range(HIST_BUCKETS - 1)))


def algorithm_needs(str name):
    """What a pick of this algorithm reads besides the table: a set of "client-key",
    "global-counts" and "peek"."""
    cdef const Algorithm *algo = find_algorithm(name)
    return {word for flag, word in ((NEEDS_CLIENT_KEY, "client-key"),
                                    (NEEDS_GLOBAL_COUNTS, "global-counts"),
                                    (NEEDS_PEEK, "peek")) if algo.needs & flag}


def hash_client(str host, int port=0, bint with_port=False):
    """The 64-bit key a worker computes for a client address."""
    cdef sockaddr_storage addr
    cdef socklen_t addrlen
    fill_sockaddr(&addr, &addrlen, host, port)
    return hash_sockaddr(&addr, with_port)
