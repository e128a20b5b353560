# Declarations of the data plane: the backend table, the algorithm interface, pools, frontends,
# listeners, connections and the classes Python sees (Worker runs the epoll loop; Balancer
# exposes picks to tests and benchmarks; PeerCounts sums the other workers' counts). Bodies
# live in _dataplane.pyx and the .pxi files it includes.
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from includes.linux cimport (epoll_event, iovec, mmsghdr, pthread_cond_t, pthread_mutex_t,
                             pthread_t, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage,
                             socklen_t)


cdef enum:
    MAX_TRIES = 16          # one connection tries at most this many backends (retries + 1)
    HIST_BUCKETS = 13       # connect-time and duration histograms: 12 bounds, then +Inf
    END_KINDS = 11          # END_* codes, 0 (open) included

# Side flags: what we know about one socket of a connection.
cdef enum:
    CAN_READ = 1            # epoll said readable and we have not seen EAGAIN since
    CAN_WRITE = 2           # epoll said writable and we have not seen EAGAIN since
    READ_EOF = 4            # the peer sent FIN (recv returned 0)
    WRITE_SHUT = 8          # we sent FIN (shutdown(SHUT_WR))
    PEER_RDHUP = 16         # epoll reported RDHUP: a short read does not mean drained
    OUT_WATCHED = 32        # client socket: registered for EPOLLOUT too (it once filled up)

# Connection states.
cdef enum:
    CONN_FREE = 0
    CONN_CONNECTING = 1
    CONN_OPEN = 2
    CONN_CLOSED = 3         # closed during this epoll batch; freed at its end
    CONN_PEEKING = 4        # reading a PROXY header or a ClientHello before the pick

# What a peeking connection still waits for.
cdef enum:
    WAIT_PROXY = 1          # a PROXY v1/v2 header (the sender is trusted)
    WAIT_HELLO = 2          # a TLS ClientHello, for its SNI

# How bytes are moved between the two sockets.
cdef enum:
    SPLICE_NEVER = 0
    SPLICE_ALWAYS = 1
    SPLICE_AUTO = 2         # copy; switch a direction to splice once a read fills the buffer


# ---- read-before-pick parsers (ext/proto) -------------------------------------------------------
# What a worker reads from a new connection before it picks a backend: a PROXY header, a TLS
# ClientHello. The parsers take the whole prefix received so far and answer "need more", "done"
# or "error".
# Compact storage of an IPv4 or IPv6 socket address.
cdef union SockAddr:
    sockaddr sa
    sockaddr_in v4
    sockaddr_in6 v6

cdef enum:
    PEEK_MORE = 0           # the bytes so far are a prefix of a valid message: read more
    PEEK_ERROR = -1         # not this protocol, or malformed

cdef enum:
    PROXY_LOCAL = 0         # v2 LOCAL, or v1 "PROXY UNKNOWN": keep the connection's own addresses
    PROXY_PROXY = 1

cdef enum:
    PEEK_MAX = 16384        # bytes read before a pick: a ClientHello's records must fit in them
    PROXY_V1_MAX = 107      # the longest v1 line, CRLF included
    PROXY_MAX_HEADER = 107  # the longest header proxy_build writes (v1 TCP6; v2 TCP6 is 52)

cdef struct ProxyHeader:
    int command             # PROXY_LOCAL or PROXY_PROXY
    int family              # AF_INET or AF_INET6 for PROXY over TCP4/TCP6 (or UDP in v2); 0 for
                            # UNSPEC, UNKNOWN, AF_UNIX and LOCAL, when src and dst are unset
    SockAddr src            # ports in network byte order, as in a sockaddr
    SockAddr dst

cdef struct SniRoute:
    const char *pattern     # lower-case; a wildcard is stored as its suffix: ".example.test"
    int len
    bint wildcard
    int pool                # opaque to the matcher (an index the data plane uses)

cdef struct SniResult:
    int found               # 1: the hello carried a host_name; 0: it had none
    int len
    char name[256]          # lower-cased copy of the host name (max 255 bytes), NUL-terminated

# ---- end of read-before-pick parsers ------------------------------------------------------------


cdef struct Table

# What an algorithm's pick() reads besides the table (Algorithm.needs).
cdef enum:
    NEEDS_CLIENT_KEY = 1    # the hashed client address (the PROXY source where one was accepted)
    NEEDS_GLOBAL_COUNTS = 2 # every worker's active connections, not only this worker's
    NEEDS_PEEK = 4          # bytes the client sent before the pick


# One balancing algorithm. Each lives in its own ext/lb/<name>.pxi and registers one of these.
# All three functions are called without the GIL and touch no Python objects.
ctypedef struct Algorithm:
    const char *name
    uint32_t needs          # NEEDS_* flags
    # (Re)build table.state from table.eligible after any change of weights, health or the set.
    # Returns 0, or -1 when out of memory.
    int (*build)(Table *table) noexcept nogil
    # Frees table.state (may be NULL).
    void (*release)(Table *table) noexcept nogil
    # Returns the index of the chosen backend in table.backends, or -1 when none is left.
    # tried[0:ntried] are backends this connection already failed on: never return one of them.
    int (*pick)(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil
    # The active count of backend index changed (this worker's or the others'); index -1: any
    # number of them did. Algorithms whose state orders backends by their counts update it here.
    void (*counts_changed)(Table *table, int index) noexcept nogil
    # A table built apart (its counts zero, its state fresh) was swapped in for the one in use
    # and given its counts: re-read every count, and resume where the old table was (Table
    # keeps what must survive swaps, such as roundrobin's turn).
    void (*adopted)(Table *table) noexcept nogil
    # build() takes milliseconds (a whole hash ring or lookup table): a worker runs it on its
    # low-priority builder thread.
    bint slow_build


cdef struct Backend:
    sockaddr_storage addr
    socklen_t addrlen
    uint32_t id             # stable, given by the supervisor: messages and table swaps key on it
    int32_t reported_active # local_active as of the last report
    int32_t weight
    bint up
    bint backup
    bint in_use             # in the table's eligible set
    int32_t local_active    # connections this worker holds to it (assigned, connecting or open)
    int32_t others_active   # connections all other workers hold, as of the supervisor's last counts
    uint64_t new_conns      # counters since the last report
    uint64_t up_bytes
    uint64_t down_bytes
    uint32_t failed
    uint32_t succeeded
    uint32_t streak         # consecutive connect failures seen by this worker
    uint32_t connect_hist[HIST_BUCKETS]     # connects by time taken, since the last report
    uint32_t duration_hist[HIST_BUCKETS]    # connections by how long they lasted, likewise
    uint64_t connect_ms_sum                 # their sums, in ms
    uint64_t duration_ms_sum
    uint64_t id_hash        # hash of the address: ties hashing algorithms to backends, not positions
    uint8_t queued          # QUEUED_* flags: on the worker's lists of backends to report


# Which of the worker's report lists a backend is on (Backend.queued).
cdef enum:
    QUEUED_STATS = 1        # some counter moved since the last full report
    QUEUED_COUNT = 2        # its active count changed, or a connect failed, since the last report


cdef struct Table:
    Backend *backends
    int n
    int *eligible           # the backends in use: up primaries, else up backups, else all primaries
    int n_eligible
    int64_t eligible_weight # sum of the eligible backends' weights
    int64_t eligible_active # sum of the eligible backends' active counts (every worker's)
    double panic_threshold  # fewer primaries up than this share of them: use every primary
    double balance_factor   # bounded-load hashing: cap = factor * average active; 0 disables
    uint64_t rng            # per-table xorshift state for the randomised algorithms
    uint64_t turn           # roundrobin's first picks so far: an adopted table resumes there
    void *state             # the algorithm's own data (hash ring, lookup table), built by build()
    const Algorithm *algo
    # What the hashing algorithms build over (table_select): every primary while the backends
    # in use are primaries holding at least half their weight (a health change then leaves the
    # build as it is, and picks skip the backends not in use), else the backends in use.
    bint base_primaries
    uint64_t base_key       # the base's places, addresses and weights, hashed: equal key, equal build


# The head of a state that tables may share (a hash ring, a Maglev table): a table swapped in
# after a health change holds the same one as the table before it.
cdef struct SharedState:
    int64_t refs            # the tables holding it and a pool's cache of the last build (atomic)
    uint64_t key            # the Table.base_key it was built for


# ---- services: pools, frontends, listeners

# Where connections go: one backend table and how its backends are connected.
cdef struct Pool:
    Table table
    SharedState *built      # the last slow build (Algorithm.slow_build), for the next to reuse
    uint32_t id             # the supervisor's pool id
    int64_t connect_timeout_ms
    int max_tries           # retries + 1
    bint hash_port          # hash the client port too (hash key src-ip-port)
    int send_proxy          # 0: off; 1 or 2: the PROXY protocol version sent first to backends
    bint close_on_down      # on-down = "close": reset the connections of a backend marked down
    int64_t first_byte_timeout_ms   # observe = "first-byte": 0 off
    int64_t udp_idle_timeout_ms     # a UDP flow that carried nothing this long ends
    uint32_t udp_responses          # replies per client datagram after which a UDP flow
                                    # ends (nginx's proxy_responses); 0: never


# A network of trusted PROXY senders (accept-proxy).
cdef struct TrustedNet:
    int family
    int prefix
    uint8_t addr[16]


# ---- UDP flows (ext/udp/flows.pxi) --------------------------------------------------------------
cdef enum:
    UDP_BATCH = 32          # datagrams per recvmmsg / sendmmsg
    UDP_MAX = 65536         # the largest datagram, whole
    UDP_CONTROL = 64        # room for one IP_PKTINFO / IPV6_PKTINFO message
    UDP_DROP_KINDS = 5

# Why a datagram was not forwarded.
cdef enum:
    UDP_DROP_NO_BACKEND = 0     # the pool had no backend to pick
    UDP_DROP_ERROR = 1          # out of descriptors or memory for the flow's socket
    UDP_DROP_BACKEND_SEND = 2   # the backend's socket would not take it (buffer full)
    UDP_DROP_CLIENT_SEND = 3    # the client's reply could not be sent
    UDP_DROP_REFUSED = 4        # the backend's host answered port unreachable

cdef struct UdpCounters:
    uint64_t created            # flows
    uint64_t evicted            # oldest flows ended to make room (max-flows)
    uint64_t datagrams_in       # client -> backend
    uint64_t bytes_in
    uint64_t datagrams_out      # backend -> client
    uint64_t bytes_out
    uint64_t dropped[UDP_DROP_KINDS]

cdef struct Flow


# Where clients arrive: limits, timeouts and the routes to pools.
cdef struct Frontend:
    uint32_t id             # the supervisor's frontend id
    Pool *pool              # the default route
    int max_conn            # connections of this worker on this frontend; accepting pauses there
    int nconns
    int64_t idle_timeout_ms
    int64_t inspect_timeout_ms
    TrustedNet *trusted     # accept-proxy senders
    int ntrusted
    SniRoute *sni           # SNI routes; their pool fields index Worker.pools
    int nsni
    bint sni_required
    bint paused             # its listeners are paused at max_conn
    int32_t reported_active
    uint64_t accepted       # counters since the last report
    uint32_t ended[END_KINDS]   # connections ended, by END_* reason, since the last report
    bint udp                    # its listeners are UDP sockets: datagrams go by flows
    int max_flows               # UDP flows of this worker on this frontend
    int nflows
    int32_t reported_flows
    Flow *oldest                # its flows by last use, oldest first: idle ones expire
    Flow *newest                # from this end, and the oldest is evicted when full
    UdpCounters udp_counts      # since the last report


# One listening socket of a frontend.
cdef struct Listener:
    int fd
    Frontend *frontend
    bint listening          # registered with epoll
    int64_t resume_ms       # paused after EMFILE/ENFILE until then; 0 when not paused by that
    bint pktinfo            # UDP bound to a wildcard: datagrams carry the address they were
                            # sent to, and replies leave from it


# A client address and port on one listener, and the backend its datagrams go to.
cdef struct Flow:
    SockAddr client
    SockAddr local          # where the client sent to (pktinfo listeners only)
    Listener *listener
    Pool *pool
    int fd                  # connected to the backend; -1 while the slot is free
    int backend             # index into pool.table; -1 when a reload removed it
    uint32_t backend_id
    uint32_t requests       # client datagrams forwarded
    uint32_t responses      # replies forwarded
    uint64_t hash
    int64_t last_ms         # last datagram either way
    Flow *chain             # next in its hash bucket, or in the free list
    Flow *older             # the frontend's flows by last use
    Flow *newer

# One batch of datagrams for recvmmsg or sendmmsg: headers, addresses and the bytes.
cdef struct UdpBatch:
    mmsghdr msgs[UDP_BATCH]
    iovec iov[UDP_BATCH]
    SockAddr names[UDP_BATCH]
    char control[UDP_BATCH][UDP_CONTROL]
    char *data              # UDP_BATCH x UDP_MAX bytes
    int n                   # queued to send
    Listener *listener      # where the queued replies go out


# Why a connection ended, for the access log.
cdef enum:
    END_CLIENT_CLOSED = 1       # the client closed first, the backend then
    END_BACKEND_CLOSED = 2      # the backend closed first
    END_CLIENT_RESET = 3        # a reset or an error on the client's socket
    END_BACKEND_RESET = 4       # a reset or an error on the backend's socket
    END_CONNECT_FAILED = 5      # every backend tried refused, reset or timed out
    END_IDLE_TIMEOUT = 6
    END_REJECTED = 7            # no valid PROXY header from a trusted sender, no SNI route
    END_BACKEND_DOWN = 8        # on-down close
    END_FIRST_BYTE_TIMEOUT = 9  # observe first-byte, and no backend left to try
    END_ERROR = 10              # out of memory or descriptors


# One ended connection, as the access log records it. Times are CLOCK_MONOTONIC ms.
cdef struct LogRecord:
    SockAddr client             # the PROXY source where one was accepted
    int64_t start_ms
    int64_t connected_ms        # 0: never connected
    int64_t end_ms
    uint64_t up_bytes
    uint64_t down_bytes
    uint32_t frontend           # ids; NO_ID when none
    uint32_t pool
    uint32_t backend
    uint16_t retries
    uint16_t reason             # END_*


cdef struct Buf:
    Buf *next               # free-list link while pooled
    uint32_t off
    uint32_t len
    char data[1]            # buffer_size bytes, allocated with the struct


# One direction of a connection: bytes read from one socket, not yet written to the other.
cdef struct Channel:
    Buf *buf                # copy mode: pending bytes, NULL when none (idle connections hold none)
    int pipe_r              # splice mode: a kernel pipe holding pending bytes, -1 when none
    int pipe_w
    uint32_t piped          # bytes in the pipe
    bint spliced            # this direction has switched to splice


cdef struct Conn:
    int cfd                 # client socket
    int bfd                 # backend socket, -1 while none
    uint32_t cflags         # Side flags of the client socket
    uint32_t bflags         # Side flags of the backend socket
    Channel up              # client -> backend
    Channel down            # backend -> client
    int state
    int waiting             # while peeking: WAIT_PROXY and/or WAIT_HELLO
    Frontend *frontend
    Pool *pool              # NULL until picked (peeking connections)
    int backend             # index into pool.table, -1 while none
    int tried[MAX_TRIES]
    int ntried
    uint64_t key            # hashed client address, for the hashing algorithms
    int64_t deadline_ms     # connect deadline while connecting, inspect deadline while peeking
    SockAddr src            # the client: its PROXY source where one was accepted
    SockAddr dst            # the address it connected to; family 0 until read (send-proxy)
    int64_t active_ms       # last time bytes moved or the connection changed state
    int64_t opened_ms       # when the backend connection was established
    int64_t start_ms        # accepted
    uint64_t up_bytes       # client -> backend, all tries
    uint64_t down_bytes
    uint64_t up_counted     # of those, added to the backend's counters
    uint64_t down_counted
    uint32_t backend_id     # of the last backend tried; NO_ID before
    int end_reason          # END_*, 0 while open
    int64_t sent_ms         # first seen with the client's bytes sent and unanswered (observe)
    bint on_probation       # connected, but may still fail before answering: not yet a success
    # Until the backend sends its first byte, everything sent to it is still in the first
    # buffer (replayable), so a reset (a backend that died with us in its accept queue) can be
    # retried on the next backend. replay holds that buffer once fully sent.
    bint replayable
    Buf *replay
    Conn *prev              # live list (for timeouts) or free list
    Conn *next


# A thread that builds tables' algorithm state at a lower CPU priority than the forwarding loop
# (ext/core/builder.pxi). One per Worker, started at its first slow build.
cdef struct TableBuilder:
    pthread_mutex_t calls   # one build at a time, whichever thread asks
    pthread_mutex_t lock    # guards the fields below
    pthread_cond_t changed  # a job posted, a job done, or stopping
    pthread_t thread
    int pid                 # the process that started the thread (0: not started)
    Table *job              # the table to refresh; NULL once done
    int result              # table_refresh's
    bint stopping


# A backend table parsed and with its algorithm's state built, not yet in use: built off the
# forwarding loop (Worker.prepare_table, on another thread) and swapped in by Worker.set_table.
cdef class PreparedTable:
    cdef Table table
    cdef uint32_t pool_id
    cdef dict index         # backend id -> its place in table.backends


cdef class Balancer:
    cdef Table table
    cdef TableBuilder builder   # adopt() builds as a worker's prepare_table does
    cdef SharedState *built
    cdef object names

    cdef int _apply(self, list rows) except -1


cdef class Worker:
    cdef TableBuilder builder
    cdef Pool *pools
    cdef int npools
    cdef Frontend *frontends
    cdef int nfrontends
    cdef Listener *listeners
    cdef int nlisteners
    cdef int npaused        # listeners not registered with epoll while not draining
    cdef object sni_patterns    # the bytes SniRoute.pattern points into
    cdef dict backend_index     # backend id -> (pool index, index in its table)
    cdef int epfd
    cdef bint draining
    cdef int64_t now_ms
    cdef int64_t next_scan_ms
    cdef int max_conn       # connection slots: every frontend's max_conn together
    cdef int report_interval_ms
    cdef int nconns
    cdef int splice_mode
    cdef uint32_t buffer_size
    cdef Conn *conns        # max_conn slots
    cdef Conn *free_conns
    cdef Conn *live         # doubly linked list of connections in use
    cdef Conn *dead         # closed during the current batch
    cdef Buf *free_bufs
    cdef int nfree_bufs
    cdef int max_free_bufs
    cdef int *free_pipes    # pooled empty pipes: [r0, w0, r1, w1, ...]
    cdef int bufs_held      # buffers and pipes held by connections: 0 once all have closed
    cdef int pipes_held
    cdef int nfree_pipes
    cdef int max_free_pipes
    cdef epoll_event *events
    cdef int max_events
    cdef int held_events    # a batch kept back while Python handles a wake-up in it
    # Coalescing (_wait): under connection churn near saturation, a wait on a timer first.
    cdef int coalesce_us    # 0: off
    cdef int coalesce_load  # percent of a window spent handling events that counts as busy
    cdef bint churning      # the last window was busy and had accepts
    cdef int64_t window_us  # CLOCK_MONOTONIC µs when the current window began; 0: none
    cdef int64_t busy_us    # time spent handling events (not waiting) in the current window
    cdef int64_t woke_us    # when the last epoll_wait returned
    cdef int window_accepts
    cdef uint64_t coalesced     # timed waits so far
    cdef bint counts_changed
    cdef bint report_counts     # report_interval_ms set: count changes go out on their own
    cdef int64_t last_report_us     # CLOCK_MONOTONIC µs (now_ms is too coarse for 1 ms)
    cdef Backend **changed      # backends whose counters moved since the last full report
    cdef int nchanged
    cdef Backend **count_changed    # backends whose active count changed, or a connect failed
    cdef int ncount_changed
    cdef int changed_capacity   # room in both lists: every backend of every table
    cdef int64_t counts_since_us    # CLOCK_MONOTONIC µs of the oldest unreported count change
    cdef int64_t reported_since_us  # the same for the counts in the last report
    cdef uint32_t table_version
    cdef Backend detached   # counts for connections whose backend left the table (reload)
    cdef LogRecord *log_ring    # ended connections for the access log; NULL when off
    cdef uint32_t log_size
    cdef uint64_t log_head      # next record to write
    cdef uint64_t log_tail      # next record to read
    cdef uint64_t log_dropped   # records lost because the ring was full
    cdef Flow *flows            # every UDP frontend's max_flows slots; NULL without UDP
    cdef Flow *free_flows
    cdef Flow **flow_buckets    # by hash of listener and client address
    cdef uint64_t flow_mask
    cdef int nflows
    cdef UdpBatch *udp_in       # datagrams read from a listener
    cdef UdpBatch *udp_out      # replies waiting for one sendmmsg

    cdef _add_pool(self, dict spec)
    cdef bint _set_others(self, object backend_id, long count) except -1
    cdef _add_frontend(self, dict spec)
    cdef int _set_pool_table(self, Pool *pool, PreparedTable prepared) except -1
    cdef Pool *_pool_by_id(self, uint32_t pool_id) except NULL
    cdef int _requeue_changed(self) except -1
    cdef void _changed(self, Backend *b) noexcept nogil
    cdef void _count_changed(self, Backend *b) noexcept nogil
    cdef tuple _backend_row(self, Backend *b)
    cdef int _poll(self, int timeout_ms) noexcept nogil
    cdef int _wait(self, int timeout_ms) noexcept nogil
    cdef void _accept_burst(self, Listener *listener) noexcept nogil
    cdef void _pause_listener(self, Listener *listener, int64_t until_ms) noexcept nogil
    cdef void _resume_listener(self, Listener *listener) noexcept nogil
    cdef void _resume_listeners(self) noexcept nogil
    cdef void _new_conn(self, Listener *listener, int fd, SockAddr *addr) noexcept nogil
    cdef void _peek(self, Conn *c) noexcept nogil
    cdef void _peek_done(self, Conn *c, Pool *pool) noexcept nogil
    cdef void _reject(self, Conn *c) noexcept nogil
    cdef void _start_pick(self, Conn *c, Pool *pool) noexcept nogil
    cdef int _send_proxy_header(self, Conn *c) noexcept nogil
    cdef int _connect_next(self, Conn *c) noexcept nogil
    cdef bint _closed_early(self, Conn *c) noexcept nogil
    cdef void _connect_failed(self, Conn *c) noexcept nogil
    cdef void _drop_replay(self, Conn *c) noexcept nogil
    cdef void _prove(self, Conn *c) noexcept nogil
    cdef bint _retry_after_reset(self, Conn *c) noexcept nogil
    cdef void _handle(self, Conn *c, bint backend_side, uint32_t ev) noexcept nogil
    cdef int _watch_client_out(self, Conn *c) noexcept nogil
    cdef int _pump(self, Conn *c, Channel *ch, int src, uint32_t *sflags, int dst,
                   uint32_t *dflags, uint64_t *counter) noexcept nogil
    cdef int _pump_splice(self, Channel *ch, int src, uint32_t *sflags, int dst,
                          uint32_t *dflags, uint64_t *counter) noexcept nogil
    cdef void _release_backend(self, Conn *c) noexcept nogil
    cdef Backend *_backend_of(self, Conn *c) noexcept nogil
    cdef void _close(self, Conn *c, bint reset, int reason) noexcept nogil
    cdef void _count_bytes(self, Conn *c) noexcept nogil
    cdef void _log(self, Conn *c) noexcept nogil
    cdef void _scan_timeouts(self) noexcept nogil
    cdef Buf *_buf_get(self) noexcept nogil
    cdef void _buf_put(self, Buf *b) noexcept nogil
    cdef int _pipe_get(self, Channel *ch) noexcept nogil
    cdef void _pipe_put(self, Channel *ch) noexcept nogil


cdef class PeerCounts:
    cdef readonly dict by_worker    # pid of another worker -> {backend id: its active}
    cdef readonly dict others       # backend id -> the sum over by_worker

    cdef long _sum(self, PyObject *backend_id) except? -1
    cdef int _set(self, object backend_id, long total, Worker worker, list unknown) except -1
