# A worker's sum of the connections the other workers hold, from the counts messages the
# supervisor passes on as they came (up to one a millisecond from each, naming the backends
# whose counts changed). Summed and set in the tables in one pass of dict calls from C: the same
# steps in Python, a few µs a backend, grew with the number of backends a message names.


cdef class PeerCounts:
    """What each other worker holds by backend id (by_worker: pid -> {id: active}), and the
    sums over them (others: id -> active)."""

    def __cinit__(self):
        self.by_worker = {}
        self.others = {}

    def apply(self, dict workers, list gone, Worker worker=None):
        """Takes one counts message (its workers' changes and the pids of workers that
        exited); with a worker, sets the new sums of the backends it named in that worker's
        tables. Returns the named ids those tables lack (removed, or in a table on its way)."""
        cdef list unknown = []
        cdef dict held, changes
        cdef Py_ssize_t pos
        cdef PyObject *key
        cdef PyObject *value
        cdef PyObject *before
        cdef long active, was
        for pid in gone:
            held = self.by_worker.pop(pid, None)
            if held is None:
                continue
            pos = 0
            while PyDict_Next(held, &pos, &key, &value):
                active = PyLong_AsLong(<object>value)
                if active:
                    self._set(<object>key, self._sum(key) - active, worker, unknown)
        for pid, changes in workers.items():
            held = self.by_worker.get(pid)
            if held is None:
                held = self.by_worker[pid] = {}
            pos = 0
            while PyDict_Next(changes, &pos, &key, &value):
                active = PyLong_AsLong(<object>value)
                before = PyDict_GetItem(held, <object>key)
                was = PyLong_AsLong(<object>before) if before != NULL else 0
                if active != was:
                    PyDict_SetItem(held, <object>key, <object>value)
                # Set even when unchanged: a table without it may have come since.
                self._set(<object>key, self._sum(key) + active - was, worker, unknown)
        return unknown

    cdef long _sum(self, PyObject *backend_id) except? -1:
        cdef PyObject *total = PyDict_GetItem(self.others, <object>backend_id)
        return PyLong_AsLong(<object>total) if total != NULL else 0

    cdef int _set(self, object backend_id, long total, Worker worker, list unknown) except -1:
        PyDict_SetItem(self.others, backend_id, total)
        if worker is not None and not worker._set_others(backend_id, total):
            unknown.append(backend_id)
        return 0
