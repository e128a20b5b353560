# The table builder: a native thread that runs the slow builds (Algorithm.slow_build: a hash
# ring or a Maglev table, 3.5 and 25 ms at 1,000 backends; a health change reuses the last
# one, so these are weight changes, adds, removes and reloads) in the SCHED_IDLE class. Built on
# the control reader's thread at the loop's priority, the build competes for the CPU with the
# loop, the clients and the backends of a busy machine, and once it runs the scheduler lets it
# finish its slice before a woken loop gets the core. An idle-class thread is preempted at once
# by any other, and a core that runs only it counts as idle when a woken thread is placed.
# Measured with loadtests/table_stall.py, a Maglev table of 1,000 backends built anew every
# 100 ms: the p99 of keep-alive traffic 2.5x that at rest, against about 5x at nice 10 and
# 6.5x at the loop's priority. The cost: on a machine saturated for long a slow build gets
# little CPU and the change waits. The thread never takes the GIL; whoever asks for a build
# waits without it.

cdef void *builder_main(void *arg) noexcept nogil:
    cdef TableBuilder *tb = <TableBuilder *>arg
    cdef Table *job
    cdef int r
    cdef sched_param param
    param.sched_priority = 0
    sched_setscheduler(gettid(), SCHED_IDLE, &param)  # lowering needs no privilege
    pthread_mutex_lock(&tb.lock)
    while True:
        while tb.job == NULL and not tb.stopping:
            pthread_cond_wait(&tb.changed, &tb.lock)
        if tb.stopping:
            break
        job = tb.job
        pthread_mutex_unlock(&tb.lock)
        r = job.algo.build(job)
        pthread_mutex_lock(&tb.lock)
        tb.result = r
        tb.job = NULL
        pthread_cond_broadcast(&tb.changed)
    pthread_mutex_unlock(&tb.lock)
    return NULL


cdef void builder_init(TableBuilder *tb) noexcept nogil:
    memset(tb, 0, sizeof(TableBuilder))
    pthread_mutex_init(&tb.calls, NULL)
    pthread_mutex_init(&tb.lock, NULL)
    pthread_cond_init(&tb.changed, NULL)


cdef int builder_build(TableBuilder *tb, Table *table) noexcept nogil:
    # The algorithm's build, on the builder thread (started at the first); tb.calls is held.
    cdef int r
    if tb.pid != getpid():
        if pthread_create(&tb.thread, NULL, builder_main, tb) != 0:
            return table.algo.build(table)  # no thread to be had: build here
        tb.pid = getpid()
    pthread_mutex_lock(&tb.lock)
    tb.job = table
    pthread_cond_broadcast(&tb.changed)
    while tb.job != NULL:
        pthread_cond_wait(&tb.changed, &tb.lock)
    r = tb.result
    pthread_mutex_unlock(&tb.lock)
    return r


cdef int builder_refresh(TableBuilder *tb, Table *table, SharedState **built) noexcept nogil:
    """table_refresh(table) for a pool whose last slow build is built[0]: that state again when
    the base is the same (a health change), else a new one from the builder thread. Returns as
    table_refresh does."""
    cdef int r
    if not table.algo.slow_build:
        return table_refresh(table)
    if tb.pid != 0 and tb.pid != getpid():
        builder_init(tb)  # a forked child: the thread stayed in the parent
    pthread_mutex_lock(&tb.calls)
    r = table_select(table)
    if r == 0 and table.eligible_weight > 0 and built[0] != NULL and built[0].key == table.base_key:
        state_retain(built[0])
        table.state = built[0]
    elif r == 0:
        r = builder_build(tb, table)
        if r == 0 and table.state != NULL:
            state_release(built[0])
            built[0] = <SharedState *>table.state
            state_retain(built[0])
    pthread_mutex_unlock(&tb.calls)
    return r


cdef void builder_stop(TableBuilder *tb) noexcept nogil:
    if tb.pid == getpid():
        pthread_mutex_lock(&tb.lock)
        tb.stopping = True
        pthread_cond_broadcast(&tb.changed)
        pthread_mutex_unlock(&tb.lock)
        pthread_join(tb.thread, NULL)
    tb.pid = 0
