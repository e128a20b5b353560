# UDP frontends: datagrams forwarded by flows. A flow is a client address and port on one
# listener, the backend picked for it and a socket connected to that backend, so that the
# backend's replies come back on a socket of their own and map to the client with no lookup.
#
# Flows live in a hash table (by listener and client address) and, per frontend, in a list by
# last use: idle flows expire from its old end, and a frontend at max_flows evicts its oldest.
# Datagrams are read from a listener with recvmmsg and replies leave through it with sendmmsg,
# up to UDP_BATCH at a time, from the address the client sent to. A flow's socket is in the
# epoll set with the TAG_WAKE tag and its own (non-null) pointer: the wake-up descriptors are
# the ones whose data is TAG_WAKE alone.
#
# A flow slot freed during an epoll batch may be reused in the same batch: an event still
# naming it then reads the new flow's socket, which is harmless (it finds nothing, or the new
# flow's own reply).

DEF UDP_READS_PER_EVENT = 4   # recvmmsg calls per readable event: other sockets get their turn


cdef udp_init(Worker w, list frontends_max_flows):
    # Allocates the flow slots, the hash table and the two batches, once a worker has a UDP
    # frontend; sets IP_PKTINFO on UDP listeners bound to a wildcard address.
    cdef int64_t total = sum(frontends_max_flows), i
    cdef uint64_t size = 64
    cdef int k, j, one = 1
    cdef Listener *listener
    cdef SockAddr bound
    cdef socklen_t boundlen
    cdef UdpBatch *batch
    cdef bint wildcard
    while size < 2 * total:
        size *= 2
    w.flows = <Flow *>calloc(total, sizeof(Flow))
    w.flow_buckets = <Flow **>calloc(size, sizeof(Flow *))
    w.udp_in = <UdpBatch *>calloc(1, sizeof(UdpBatch))
    w.udp_out = <UdpBatch *>calloc(1, sizeof(UdpBatch))
    if w.flows == NULL or w.flow_buckets == NULL or w.udp_in == NULL or w.udp_out == NULL:
        raise MemoryError()
    w.flow_mask = size - 1
    i = total - 1
    while i >= 0:
        w.flows[i].fd = -1
        w.flows[i].chain = w.free_flows
        w.free_flows = &w.flows[i]
        i -= 1
    for j in range(2):
        batch = w.udp_in if j == 0 else w.udp_out
        batch.data = <char *>malloc(UDP_BATCH * UDP_MAX)
        if batch.data == NULL:
            raise MemoryError()
        for k in range(UDP_BATCH):
            batch.iov[k].iov_base = batch.data + k * UDP_MAX
            batch.msgs[k].msg_hdr.msg_iov = &batch.iov[k]
            batch.msgs[k].msg_hdr.msg_iovlen = 1
            batch.msgs[k].msg_hdr.msg_name = &batch.names[k]
            batch.msgs[k].msg_hdr.msg_control = batch.control[k]
    for k in range(w.nlisteners):
        listener = &w.listeners[k]
        if not listener.frontend.udp:
            continue
        boundlen = sizeof(bound)
        if getsockname(listener.fd, &bound.sa, &boundlen) < 0:
            raise OSError(errno, "getsockname failed on a UDP listener")
        if bound.sa.sa_family == AF_INET6:
            wildcard = True
            for j in range(16):
                wildcard = wildcard and bound.v6.sin6_addr.s6_addr[j] == 0
            if wildcard:
                if setsockopt(listener.fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof(one)):
                    raise OSError(errno, "cannot set IPV6_RECVPKTINFO")
                listener.pktinfo = True
        elif bound.v4.sin_addr.s_addr == 0:
            if setsockopt(listener.fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one)):
                raise OSError(errno, "cannot set IP_PKTINFO")
            listener.pktinfo = True


cdef void udp_free(Worker w) noexcept:
    cdef uint64_t i
    cdef int k
    cdef Flow *f
    cdef UdpBatch *batch
    if w.flow_buckets != NULL:
        for i in range(w.flow_mask + 1):
            f = w.flow_buckets[i]
            while f != NULL:
                close(f.fd)
                f = f.chain
    free(w.flows)
    free(w.flow_buckets)
    for k in range(2):
        batch = w.udp_in if k == 0 else w.udp_out
        if batch != NULL:
            free(batch.data)
            free(batch)
    for k in range(w.nlisteners):
        if w.listeners[k].frontend.udp and w.listeners[k].fd >= 0:
            close(w.listeners[k].fd)  # kept open while draining: replies leave through it


cdef inline uint64_t flow_hash(const Listener *listener, const SockAddr *client) noexcept nogil:
    return mix64(hash_sockaddr(<const sockaddr_storage *>client, True) ^ <uint64_t>listener)


cdef inline bint same_client(const SockAddr *a, const SockAddr *b) noexcept nogil:
    if a.sa.sa_family != b.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET6:
        return (a.v6.sin6_port == b.v6.sin6_port
                and memcmp(&a.v6.sin6_addr, &b.v6.sin6_addr, 16) == 0)
    return a.v4.sin_port == b.v4.sin_port and a.v4.sin_addr.s_addr == b.v4.sin_addr.s_addr


cdef inline socklen_t sockaddr_len(const SockAddr *addr) noexcept nogil:
    return sizeof(sockaddr_in6) if addr.sa.sa_family == AF_INET6 else sizeof(sockaddr_in)


cdef void read_pktinfo(msghdr *hdr, SockAddr *local) noexcept nogil:
    # The address a datagram was sent to, from its IP_PKTINFO / IPV6_PKTINFO message; family 0
    # when it carried none. Called without the GIL; touches no Python objects.
    cdef cmsghdr *cm = CMSG_FIRSTHDR(hdr)
    local.sa.sa_family = 0
    while cm != NULL:
        if cm.cmsg_level == IPPROTO_IP and cm.cmsg_type == IP_PKTINFO:
            local.v4.sin_family = AF_INET
            local.v4.sin_addr = (<in_pktinfo *>CMSG_DATA(cm)).ipi_spec_dst
            return
        if cm.cmsg_level == IPPROTO_IPV6 and cm.cmsg_type == IPV6_PKTINFO:
            local.v6.sin6_family = AF_INET6
            local.v6.sin6_addr = (<in6_pktinfo *>CMSG_DATA(cm)).ipi6_addr
            return
        cm = CMSG_NXTHDR(hdr, cm)


cdef size_t write_pktinfo(char *control, const SockAddr *local) noexcept nogil:
    # A control message that makes a reply leave from local; returns its length.
    # Called without the GIL; touches no Python objects.
    cdef cmsghdr *cm = <cmsghdr *>control
    cdef in_pktinfo *v4
    cdef in6_pktinfo *v6
    memset(control, 0, UDP_CONTROL)
    if local.sa.sa_family == AF_INET6:
        cm.cmsg_level = IPPROTO_IPV6
        cm.cmsg_type = IPV6_PKTINFO
        cm.cmsg_len = CMSG_LEN(sizeof(in6_pktinfo))
        v6 = <in6_pktinfo *>CMSG_DATA(cm)
        v6.ipi6_addr = local.v6.sin6_addr
        return CMSG_SPACE(sizeof(in6_pktinfo))
    cm.cmsg_level = IPPROTO_IP
    cm.cmsg_type = IP_PKTINFO
    cm.cmsg_len = CMSG_LEN(sizeof(in_pktinfo))
    v4 = <in_pktinfo *>CMSG_DATA(cm)
    v4.ipi_spec_dst = local.v4.sin_addr
    return CMSG_SPACE(sizeof(in_pktinfo))


cdef void udp_read(Worker w, Listener *listener) noexcept nogil:
    # Reads the datagrams waiting on a UDP listener, a batch at a time, and forwards each.
    # Called without the GIL; touches no Python objects.
    cdef UdpBatch *batch = w.udp_in
    cdef msghdr *hdr
    cdef SockAddr local
    cdef int n, i, reads
    for reads in range(UDP_READS_PER_EVENT):
        for i in range(UDP_BATCH):
            hdr = &batch.msgs[i].msg_hdr
            batch.iov[i].iov_len = UDP_MAX
            hdr.msg_namelen = sizeof(SockAddr)
            hdr.msg_controllen = UDP_CONTROL if listener.pktinfo else 0
            hdr.msg_flags = 0
        n = recvmmsg(listener.fd, batch.msgs, UDP_BATCH, MSG_DONTWAIT, NULL)
        if n <= 0:
            return
        for i in range(n):
            hdr = &batch.msgs[i].msg_hdr
            local.sa.sa_family = 0
            if listener.pktinfo:
                read_pktinfo(hdr, &local)
            udp_forward(w, listener, &batch.names[i], &local, <char *>batch.iov[i].iov_base,
                        batch.msgs[i].msg_len)
        if n < UDP_BATCH:
            return


cdef void udp_forward(Worker w, Listener *listener, SockAddr *client, SockAddr *local,
                      char *data, size_t length) noexcept nogil:
    # One client datagram: to its flow's backend, opening the flow first. A flow whose
    # backend is down or gone moves to another on this datagram.
    # Called without the GIL; touches no Python objects.
    cdef Frontend *fe = listener.frontend
    cdef UdpCounters *counts = &fe.udp_counts
    cdef uint64_t h = flow_hash(listener, client)
    cdef Flow *f = flow_find(w, listener, client, h)
    cdef ssize_t sent
    counts.datagrams_in += 1
    counts.bytes_in += length
    if f != NULL and (f.backend < 0 or not f.pool.table.backends[f.backend].up):
        if f.backend < 0 or pool_has_up(f.pool):  # else it could only move to a down one
            flow_close(w, f)
            f = NULL
    if f == NULL:
        f = flow_open(w, listener, client, local, h)
        if f == NULL:
            return
    flow_touch(w, f)
    while True:
        sent = send(f.fd, data, length, MSG_DONTWAIT)
        if sent >= 0 or errno != EINTR:
            break
    if sent < 0:
        counts.dropped[UDP_DROP_REFUSED if errno == ECONNREFUSED else UDP_DROP_BACKEND_SEND] += 1
        return
    f.requests += 1
    f.pool.table.backends[f.backend].up_bytes += length
    w._changed(&f.pool.table.backends[f.backend])


cdef inline bint pool_has_up(Pool *pool) noexcept nogil:
    # Whether a new pick can find an up backend: the eligible set is the up ones, or every
    # primary when none is up (or in panic, when down ones are used anyway).
    return (pool.table.n_eligible > 0
            and pool.table.backends[pool.table.eligible[0]].up)


cdef Flow *flow_find(Worker w, Listener *listener, SockAddr *client, uint64_t h) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    cdef Flow *f = w.flow_buckets[h & w.flow_mask]
    while f != NULL:
        if f.hash == h and f.listener == listener and same_client(&f.client, client):
            return f
        f = f.chain
    return NULL


cdef Flow *flow_open(Worker w, Listener *listener, SockAddr *client, SockAddr *local,
                     uint64_t h) noexcept nogil:
    # Picks a backend through the pool's algorithm and connects a socket to it. Returns NULL
    # when that fails (the datagram's drop is counted). Called without the GIL; touches no
    # Python objects.
    cdef Frontend *fe = listener.frontend
    cdef Pool *pool = fe.pool
    cdef Flow *f
    cdef Flow **bucket
    cdef Backend *b
    cdef epoll_event ev
    cdef uint64_t key = 0
    cdef int index, fd
    if fe.nflows >= fe.max_flows and fe.oldest != NULL:
        fe.udp_counts.evicted += 1
        flow_close(w, fe.oldest)
    f = w.free_flows
    if f == NULL:
        fe.udp_counts.dropped[UDP_DROP_ERROR] += 1
        return NULL
    if pool.table.algo.needs & NEEDS_CLIENT_KEY:
        key = hash_sockaddr(<sockaddr_storage *>client, pool.hash_port)
    index = pool.table.algo.pick(&pool.table, key, NULL, 0)
    if index < 0:
        index = table_fallback(&pool.table, NULL, 0)
    if index < 0:
        fe.udp_counts.dropped[UDP_DROP_NO_BACKEND] += 1
        return NULL
    b = &pool.table.backends[index]
    fd = socket(b.addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        fe.udp_counts.dropped[UDP_DROP_ERROR] += 1
        return NULL
    ev.events = EPOLLIN
    ev.data.u64 = <uint64_t>f | TAG_WAKE
    if (connect(fd, <sockaddr *>&b.addr, b.addrlen) < 0
            or epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev) < 0):
        close(fd)
        fe.udp_counts.dropped[UDP_DROP_ERROR] += 1
        return NULL
    w.free_flows = f.chain
    f.client = client[0]
    f.local = local[0]
    f.listener = listener
    f.pool = pool
    f.fd = fd
    f.backend = index
    f.backend_id = b.id
    f.requests = 0
    f.responses = 0
    f.hash = h
    bucket = &w.flow_buckets[h & w.flow_mask]
    f.chain = bucket[0]
    bucket[0] = f
    f.older = fe.newest
    f.newer = NULL
    if fe.newest != NULL:
        fe.newest.newer = f
    else:
        fe.oldest = f
    fe.newest = f
    fe.nflows += 1
    w.nflows += 1
    fe.udp_counts.created += 1
    b.new_conns += 1
    backend_add_local(&pool.table, index, 1)
    w._count_changed(b)
    return f


cdef void flow_close(Worker w, Flow *f) noexcept nogil:
    # Called without the GIL; touches no Python objects.
    cdef Frontend *fe = f.listener.frontend
    cdef Flow **link = &w.flow_buckets[f.hash & w.flow_mask]
    while link[0] != f:
        link = &link[0].chain
    link[0] = f.chain
    if f.older != NULL:
        f.older.newer = f.newer
    else:
        fe.oldest = f.newer
    if f.newer != NULL:
        f.newer.older = f.older
    else:
        fe.newest = f.older
    close(f.fd)
    f.fd = -1
    if f.backend >= 0:
        backend_add_local(&f.pool.table, f.backend, -1)
        w._count_changed(&f.pool.table.backends[f.backend])
    fe.nflows -= 1
    w.nflows -= 1
    f.chain = w.free_flows
    w.free_flows = f


cdef void flow_touch(Worker w, Flow *f) noexcept nogil:
    # The flow carried a datagram: it becomes its frontend's newest.
    # Called without the GIL; touches no Python objects.
    cdef Frontend *fe = f.listener.frontend
    f.last_ms = w.now_ms
    if fe.newest == f:
        return
    if f.older != NULL:
        f.older.newer = f.newer
    else:
        fe.oldest = f.newer
    f.newer.older = f.older
    f.older = fe.newest
    f.newer = NULL
    fe.newest.newer = f
    fe.newest = f


cdef void flow_reply(Worker w, Flow *f) noexcept nogil:
    # The backend's socket of a flow is readable: its replies join the batch going out
    # through the client's listener. Called without the GIL; touches no Python objects.
    cdef UdpBatch *out = w.udp_out
    cdef Frontend *fe
    cdef Pool *pool = f.pool
    cdef msghdr *hdr
    cdef unsigned int want
    cdef uint64_t expected = <uint64_t>pool.udp_responses * f.requests
    cdef int n, i, k
    if f.fd < 0:
        return  # freed earlier in this batch
    fe = f.listener.frontend
    if pool.udp_responses and f.responses >= expected:
        flow_close(w, f)  # readable with no reply due: an error, or nothing was sent
        return
    while True:
        if out.n and out.listener != f.listener:
            udp_flush(w)
        if out.n == UDP_BATCH:
            udp_flush(w)
        out.listener = f.listener
        want = UDP_BATCH - out.n
        if pool.udp_responses and expected - f.responses < want:
            want = <unsigned int>(expected - f.responses)
        for i in range(out.n, out.n + <int>want):
            out.iov[i].iov_len = UDP_MAX
            hdr = &out.msgs[i].msg_hdr
            hdr.msg_name = NULL
            hdr.msg_namelen = 0
            hdr.msg_control = NULL
            hdr.msg_controllen = 0
            hdr.msg_flags = 0
        n = recvmmsg(f.fd, &out.msgs[out.n], want, MSG_DONTWAIT, NULL)
        if n < 0:
            if errno == ECONNREFUSED:
                fe.udp_counts.dropped[UDP_DROP_REFUSED] += 1
                continue  # the error is reported once; datagrams may follow it
            return
        for k in range(n):
            i = out.n + k
            hdr = &out.msgs[i].msg_hdr
            out.names[i] = f.client
            hdr.msg_name = &out.names[i]
            hdr.msg_namelen = sockaddr_len(&f.client)
            if f.listener.pktinfo and f.local.sa.sa_family:
                hdr.msg_control = out.control[i]
                hdr.msg_controllen = write_pktinfo(out.control[i], &f.local)
            out.iov[i].iov_len = out.msgs[i].msg_len
            fe.udp_counts.datagrams_out += 1
            fe.udp_counts.bytes_out += out.msgs[i].msg_len
            if f.backend >= 0:
                pool.table.backends[f.backend].down_bytes += out.msgs[i].msg_len
                w._changed(&pool.table.backends[f.backend])
        out.n += n
        f.responses += n
        if n:
            flow_touch(w, f)
        if pool.udp_responses and f.responses >= expected:
            flow_close(w, f)  # every datagram got its replies
            return
        if <unsigned int>n < want:
            return  # drained


cdef void udp_flush(Worker w) noexcept nogil:
    # Sends the queued replies through their listener. One that fails is dropped (counted)
    # and the rest still go. Called without the GIL; touches no Python objects.
    cdef UdpBatch *out = w.udp_out
    cdef int done = 0, n
    while done < out.n:
        n = sendmmsg(out.listener.fd, &out.msgs[done], out.n - done, MSG_DONTWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            out.listener.frontend.udp_counts.dropped[UDP_DROP_CLIENT_SEND] += 1
            n = 1
        done += n
    out.n = 0


cdef void expire_flows(Worker w) noexcept nogil:
    # Ends the flows idle for longer than their pool's udp-idle-timeout, oldest first.
    # Called without the GIL; touches no Python objects.
    cdef Frontend *fe
    cdef int i
    for i in range(w.nfrontends):
        fe = &w.frontends[i]
        while (fe.oldest != NULL and fe.pool.udp_idle_timeout_ms > 0
               and w.now_ms - fe.oldest.last_ms >= fe.pool.udp_idle_timeout_ms):
            flow_close(w, fe.oldest)


cdef void remap_flows(Worker w, Pool *pool, const int *remap) noexcept nogil:
    # A table swap: each flow of the pool follows its backend to its new index, or has none.
    # Called without the GIL; touches no Python objects.
    cdef Frontend *fe
    cdef Flow *f
    cdef int i
    for i in range(w.nfrontends):
        fe = &w.frontends[i]
        if fe.pool != pool:
            continue
        f = fe.oldest
        while f != NULL:
            if f.backend >= 0:
                f.backend = remap[f.backend]
                if f.backend >= 0:
                    pool.table.backends[f.backend].local_active += 1
            f = f.newer
