# Declarations of the data plane: the backend table, the algorithm interface, connections and
# the two classes Python sees (Worker runs the epoll loop; Balancer exposes picks to tests and
# benchmarks). Bodies live in _dataplane.pyx and the .pxi files it includes.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from includes.linux cimport epoll_event, sockaddr_storage, socklen_t


cdef enum:
    MAX_TRIES = 16          # one connection tries at most this many backends (retries + 1)

# Side flags: what we know about one socket of a connection.
cdef enum:
    CAN_READ = 1            # epoll said readable and we have not seen EAGAIN since
    CAN_WRITE = 2           # epoll said writable and we have not seen EAGAIN since
    READ_EOF = 4            # the peer sent FIN (recv returned 0)
    WRITE_SHUT = 8          # we sent FIN (shutdown(SHUT_WR))
    PEER_RDHUP = 16         # epoll reported RDHUP: a short read does not mean drained

# Connection states.
cdef enum:
    CONN_FREE = 0
    CONN_CONNECTING = 1
    CONN_OPEN = 2
    CONN_CLOSED = 3         # closed during this epoll batch; freed at its end

# How bytes are moved between the two sockets.
cdef enum:
    SPLICE_NEVER = 0
    SPLICE_ALWAYS = 1
    SPLICE_AUTO = 2         # copy; switch a direction to splice once a read fills the buffer


# ---- read-before-pick parsers (ext/proto) -------------------------------------------------------
# What a worker reads from a new connection before it picks a backend: a PROXY header, a TLS
# ClientHello. The parsers take the whole prefix received so far and answer "need more", "done"
# or "error".
from includes.linux cimport sockaddr, sockaddr_in, sockaddr_in6

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


# One balancing algorithm. Each lives in its own ext/lb/<name>.pxi and registers one of these.
# All three functions are called without the GIL and touch no Python objects.
ctypedef struct Algorithm:
    const char *name
    bint uses_key           # pick() needs the hashed client address
    # (Re)build table.state from table.eligible after any change of weights, health or the set.
    # Returns 0, or -1 when out of memory.
    int (*build)(Table *table) noexcept nogil
    # Frees table.state (may be NULL).
    void (*release)(Table *table) noexcept nogil
    # Returns the index of the chosen backend in table.backends, or -1 when none is left.
    # tried[0:ntried] are backends this connection already failed on: never return one of them.
    int (*pick)(Table *table, uint64_t key, const int *tried, int ntried) noexcept nogil


cdef struct Backend:
    sockaddr_storage addr
    socklen_t addrlen
    int32_t weight
    bint up
    bint backup
    int32_t local_active    # connections this worker holds to it (assigned, connecting or open)
    int32_t others_active   # connections all other workers hold, as of the supervisor's last counts
    int64_t rr_current      # smooth weighted round robin state
    uint64_t new_conns      # counters since the last report
    uint64_t up_bytes
    uint64_t down_bytes
    uint32_t failed
    uint32_t succeeded
    uint32_t streak         # consecutive connect failures seen by this worker
    uint64_t id_hash        # hash of the address: ties hashing algorithms to backends, not positions


cdef struct Table:
    Backend *backends
    int n
    int *eligible           # the backends in use: up primaries, else up backups, else all primaries
    int n_eligible
    int64_t eligible_weight # sum of the eligible backends' weights
    double balance_factor   # bounded-load hashing: cap = factor * average active; 0 disables
    uint64_t rng            # per-table xorshift state for the randomised algorithms
    void *state             # the algorithm's own data (hash ring, lookup table), built by build()
    const Algorithm *algo


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
    int backend             # index into the table, -1 while none
    int tried[MAX_TRIES]
    int ntried
    uint64_t key            # hashed client address, for the hashing algorithms
    int64_t deadline_ms     # connect deadline while connecting
    int64_t active_ms       # last time bytes moved or the connection changed state
    # Until the backend sends its first byte, everything sent to it is still in the first
    # buffer (replayable), so a reset (a backend that died with us in its accept queue) can be
    # retried on the next backend. replay holds that buffer once fully sent.
    bint replayable
    Buf *replay
    Conn *prev              # live list (for timeouts) or free list
    Conn *next


cdef class Balancer:
    cdef Table table
    cdef object names

    cdef int _apply(self, list rows) except -1


cdef class Worker:
    cdef Table table
    cdef int epfd
    cdef int listen_fd
    cdef int wake_fd
    cdef int control_fd
    cdef bint listening     # the listening socket is registered with epoll
    cdef bint draining
    cdef int64_t listen_resume_ms   # paused after EMFILE/ENFILE until then; 0 when not paused
    cdef int64_t now_ms
    cdef int64_t next_scan_ms
    cdef int64_t connect_timeout_ms
    cdef int64_t idle_timeout_ms
    cdef int max_tries
    cdef int max_conn
    cdef int report_interval_ms
    cdef int nconns
    cdef bint hash_port     # hash the client port too (hash key src-ip-port)
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
    cdef bint counts_changed
    cdef uint64_t accepted_total
    cdef uint32_t table_version
    cdef Backend detached   # counts for connections whose backend left the table (reload)

    cdef int _set_table(self, list rows) except -1
    cdef int _poll(self, int timeout_ms) noexcept nogil
    cdef void _accept_burst(self) noexcept nogil
    cdef void _pause_listener(self, int64_t until_ms) noexcept nogil
    cdef void _resume_listener(self) noexcept nogil
    cdef void _new_conn(self, int fd, sockaddr_storage *addr) noexcept nogil
    cdef int _connect_next(self, Conn *c) noexcept nogil
    cdef void _connect_failed(self, Conn *c) noexcept nogil
    cdef void _drop_replay(self, Conn *c) noexcept nogil
    cdef bint _retry_after_reset(self, Conn *c) noexcept nogil
    cdef void _handle(self, Conn *c, bint backend_side, uint32_t ev) noexcept nogil
    cdef int _pump(self, Conn *c, Channel *ch, int src, uint32_t *sflags, int dst,
                   uint32_t *dflags, uint64_t *counter) noexcept nogil
    cdef int _pump_splice(self, Channel *ch, int src, uint32_t *sflags, int dst,
                          uint32_t *dflags, uint64_t *counter) noexcept nogil
    cdef void _release_backend(self, Conn *c) noexcept nogil
    cdef Backend *_backend_of(self, Conn *c) noexcept nogil
    cdef void _close(self, Conn *c, bint reset) noexcept nogil
    cdef void _scan_timeouts(self) noexcept nogil
    cdef Buf *_buf_get(self) noexcept nogil
    cdef void _buf_put(self, Buf *b) noexcept nogil
    cdef int _pipe_get(self, Channel *ch) noexcept nogil
    cdef void _pipe_put(self, Channel *ch) noexcept nogil
