"""A worker process: runs the Cython data plane on its listening sockets, talks to the supervisor.

The supervisor forks, then calls :func:`run` in the child, which never returns. The data plane
forwards traffic without the GIL in slices of at most 50 ms (``Worker.poll``); between slices this
module applies the supervisor's messages and sends reports.

Messages are read and decoded on a second thread (:class:`ControlReader`), which also builds the
next backend table (a hash ring or a Maglev table takes tens of ms at 1,000 backends) while the
loop keeps forwarding; the loop then only swaps the built table in. The other workers' counts,
which come every millisecond, have a socket of their own that the loop reads itself: small
messages, and no hop through the thread (a wake-up and a pipe each way) for every one.
"""

from __future__ import annotations

import bisect
import collections
import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from fastlb import _dataplane
from fastlb.accesslog import AccessLog
from fastlb.errors import EXIT_BOOT_FAILED
from fastlb.model import Address, Config
from fastlb.protocol import messages as msg

log = logging.getLogger("fastlb.worker")

TICK_MS = 50  # longest slice without the GIL
# With count-driven algorithms and other workers, count changes go out this soon, and no
# sooner: the others pick by them. (Sent each time the others' counts came, as the loop wakes
# for them, a report would wake the others to report back, as fast as the round trip.)
REPORT_INTERVAL_MS = 1
# Everything else (bytes, connections, histograms) goes out this often: a report costs the
# supervisor per backend listed, and with 1,000 backends every connection may touch another.
STATS_INTERVAL = 1.0
COUNTS_INTERVAL = 0.05  # count changes and failures, when no pick waits on them
MAX_PENDING_OUT = 1 << 20  # stop queueing reports for a supervisor that does not read

SEND_PROXY = {None: 0, "v1": 1, "v2": 2}


def table_pools(table: msg.Table, only: set[int] | None = None) -> list[tuple]:
    """(pool id, rows) for set_table or prepare_table: every pool's, or those in only."""
    return [
        (pool.id, [(b.id, b.host, b.port, b.weight, b.up, b.backup) for b in pool.backends])
        for pool in table.pools
        if only is None or pool.id in only
    ]


CONTROL_CLOSED = object()  # queued by the reader when the supervisor's end closes
# How long the loop waits at most for the GIL while the reader decodes a table: 0.1 ms keeps a
# 1,000-backend flap every 100 ms within 1.4x of the keep-alive p99 at rest (0.5 ms: 2.7x).
SWITCH_INTERVAL_S = 0.0001


class ControlReader:
    """Reads and decodes the supervisor's messages on its own thread and builds each table's
    next state there (prepare_table), so that neither a large table's decoding nor its build
    holds up forwarding. It holds the table last received, to which a table-change applies: the
    loop gets the whole table either way. The loop watches ``ready_fd``, then takes the
    messages in order with :meth:`take`: (message, prepared tables or None), or CONTROL_CLOSED
    last."""

    def __init__(self, control: socket.socket, dataplane, table: msg.Table, names: dict):
        self.control = control
        self.dataplane = dataplane
        self.table = table
        self.names = names
        self.decoder = msg.Decoder()
        self.queue: collections.deque = collections.deque()
        self.ready_fd, self.ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self.run, name="control", daemon=True)

    def start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.thread.start()

    def run(self) -> None:
        while True:
            select.select([self.control], [], [])
            data = msg.receive(self.control)
            if data is None:
                continue
            if not data:
                self.put(CONTROL_CLOSED)
                return
            for message in self.decoder.feed(data):
                if isinstance(message, msg.TableChange):
                    self.put(self.apply_change(message))
                elif isinstance(message, msg.Table):
                    self.table = message
                    self.names = backend_names(message)
                    self.put((message, self.prepare(table_pools(message), self.names)))
                else:
                    self.put((message, None))

    def apply_change(self, change: msg.TableChange) -> tuple:
        """The whole table a change makes, with the changed pools prepared."""
        if change.base != self.table.version:
            return (
                msg.Invalid(f"a change to table {change.base}, holding {self.table.version}"),
                None,
            )
        try:
            table = msg.apply_change(self.table, change)
        except ValueError as exc:
            return msg.Invalid(str(exc)), None
        self.table = table
        self.names = names = dict(self.names)
        for pool_change in change.pools:
            for backend_id in pool_change.removed:
                names.pop(backend_id, None)
            for entry in pool_change.backends:
                names[entry.id] = str(Address(entry.host, entry.port))
        changed = {pool_change.id for pool_change in change.pools}
        return table, self.prepare(table_pools(table, changed), names)

    def prepare(self, pools: list[tuple], names: dict):
        """Pools' tables built for set_table, and the table's backends' names; None
        for a table that cannot be built (the loop then fails on it as before)."""
        try:
            prepared = [
                (pool_id, self.dataplane.prepare_table(pool_id, rows)) for pool_id, rows in pools
            ]
        except (ValueError, MemoryError):
            return None
        return prepared, names

    def put(self, item) -> None:
        self.queue.append(item)
        try:
            os.write(self.ready_w, b"\0")
        except BlockingIOError:
            pass  # the loop has wake-ups pending already

    def take(self) -> list:
        try:
            while os.read(self.ready_fd, 512):
                pass
        except BlockingIOError:
            pass
        items = []
        while self.queue:
            items.append(self.queue.popleft())
        return items


def backend_names(table: msg.Table) -> dict[int, str]:
    return {b.id: str(Address(b.host, b.port)) for pool in table.pools for b in pool.backends}


def dataplane_specs(
    config: Config, pool_ids: list[int] | None = None
) -> tuple[list[dict], list[dict]]:
    """The pools and frontends of a config as the data plane takes them. Pool ids are the
    supervisor's (kept across reloads), by default their places in the config; frontend ids are
    their places in the config (they live as long as the workers do)."""
    pool_index = {pool.name: i for i, pool in enumerate(config.pools)}
    pools = [
        {
            "id": pool_ids[i] if pool_ids else i,
            "algorithm": pool.algorithm,
            "connect_timeout": pool.connect_timeout,
            "retries": pool.retries,
            "hash_key": pool.hash_key,
            "balance_factor": pool.hash_balance_factor,
            "send_proxy": SEND_PROXY[pool.send_proxy],
            "panic_threshold": pool.panic_threshold,
            "on_down": pool.on_down,
            "first_byte_timeout": pool.first_byte_timeout if pool.observe == "first-byte" else 0.0,
            "udp_idle_timeout": pool.udp_idle_timeout,
            "udp_responses": pool.udp_responses,
        }
        for i, pool in enumerate(config.pools)
    ]
    frontends = [
        {
            "id": i,
            "pool": pool_index[frontend.pool],
            "max_conn": frontend.max_conn,
            "idle_timeout": frontend.idle_timeout,
            "inspect_timeout": frontend.inspect_timeout,
            "trusted": [
                (
                    socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                    net.network_address.packed,
                    net.prefixlen,
                )
                for net in frontend.accept_proxy
            ],
            "sni": [(route.pattern, pool_index[route.pool]) for route in frontend.sni],
            "sni_required": frontend.sni_required,
            "udp": frontend.protocol == "udp",
            "max_flows": frontend.max_flows,
        }
        for i, frontend in enumerate(config.frontends)
    ]
    return pools, frontends


def counts_matter(config: Config) -> bool:
    """Whether some pool picks by every worker's counts, and there are other workers: then
    count changes are reported at once."""
    return config.workers > 1 and any(
        "global-counts" in _dataplane.algorithm_needs(pool.algorithm)
        or pool.hash_balance_factor > 0
        for pool in config.pools
    )


class WorkerProcess:
    def __init__(
        self,
        worker_id: int,
        listeners: list[tuple[int, socket.socket]],
        control: socket.socket,
        config: Config,
        table: msg.Table,
        pool_ids: list[int] | None = None,
        counts: socket.socket | None = None,
    ):
        self.worker_id = worker_id
        self.orphan_timeout = config.orphan_timeout
        self.drain_timeout = config.drain_timeout
        self.orphaned_at: float | None = None  # when the supervisor went away
        self.drain_started = 0.0
        self.control = control
        self.outgoing = bytearray()
        self.draining = False
        self.control_open = True
        self.stop_signal = False
        self.reopen_signal = False
        self.log_dropped = 0  # access log records lost, not reported yet
        self.coalesced_reported = 0  # the data plane's timed waits as of the last stats
        self.count_staleness = [0] * (len(msg.STALENESS_BOUNDS_MS) + 1)  # not reported yet
        self.peers = _dataplane.PeerCounts()
        # Backends the others' counts named before a table with them came: set when one does.
        self.counts_ahead: set[int] = set()
        self.counts_urgent = counts_matter(config)
        self.counts_interval = REPORT_INTERVAL_MS / 1000 if self.counts_urgent else COUNTS_INTERVAL
        self.next_counts = 0.0
        self.backend_names: dict[int, str] = {}
        self.access_log = (
            AccessLog(
                config.access_log,
                config.access_log_format,
                [frontend.name for frontend in config.frontends],
                {pool_ids[i] if pool_ids else i: pool.name for i, pool in enumerate(config.pools)},
                journald="JOURNAL_STREAM" in os.environ,
            )
            if config.access_log
            else None
        )
        pools, frontends = dataplane_specs(config, pool_ids)
        self.dataplane = _dataplane.Worker(
            pools,
            frontends,
            [(sock.fileno(), frontend) for frontend, sock in listeners],
            buffer_size=config.buffer_size,
            splice=config.splice,
            coalesce_us=config.coalesce_us,
            report_interval_ms=REPORT_INTERVAL_MS if self.counts_urgent else 0,
            access_log=self.access_log is not None,
        )
        # The data plane owns the descriptors from here on (it closes them when draining).
        for _, sock in listeners:
            sock.detach()
        self.set_table(table)
        control.setblocking(False)
        self.reader = ControlReader(control, self.dataplane, table, self.backend_names)
        self.dataplane.watch(self.reader.ready_fd)
        self.counts = counts
        self.counts_decoder = msg.Decoder()
        if counts is not None:
            counts.setblocking(False)
            self.dataplane.watch(counts.fileno())
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.dataplane.watch(wake_r)

    def serve(self) -> bool:
        """Serves until drained; False when an orphan's drain ran out of time."""
        self.reader.start()
        self.send(msg.Hello(worker=self.worker_id, pid=os.getpid()))
        self.flush()  # the supervisor counts us ready (READY=1, /stats) on this message
        next_stats = time.monotonic() + STATS_INTERVAL
        while True:
            if self.dataplane.poll(TICK_MS):
                self.read_wakeups()
                self.read_counts()
                self.read_control()
            if self.access_log is not None:
                self.write_access_log()
            finished = self.draining and self.dataplane.active == 0
            now = time.monotonic()
            stats = finished or now >= next_stats
            if stats:
                next_stats = now + STATS_INTERVAL
            self.report(stats, now)
            self.flush()
            if self.stop_signal and not self.draining:
                self.drain()
            if finished:
                return True
            if self.orphaned_at is not None and not self.control_open:
                # Nobody will kill us at the drain timeout: keep it ourselves.
                if not self.draining and now - self.orphaned_at >= self.orphan_timeout:
                    log.warning(
                        "worker %d: no new supervisor after %gs: draining",
                        self.worker_id,
                        self.orphan_timeout,
                    )
                    self.drain()
                if self.draining and now - self.drain_started >= self.drain_timeout:
                    return False

    def report(self, stats: bool, now: float) -> None:
        """Sends what changed: everything when stats, else only counts and failures, at most
        every REPORT_INTERVAL_MS when picks use every worker's counts, else every
        COUNTS_INTERVAL (the supervisor's totals, which ctl's remove waits on, stay that
        fresh)."""
        if not stats and now < self.next_counts:
            return
        self.next_counts = now + self.counts_interval
        report = self.dataplane.report(stats)
        staleness = stats and any(self.count_staleness)
        udp = self.dataplane.report_udp() if stats else []  # UDP counters go with the stats
        coalesced = self.dataplane.coalesced - self.coalesced_reported if stats else 0
        if (
            report is None
            and not (stats and self.log_dropped)
            and not staleness
            and not udp
            and not coalesced
        ):
            return
        version, backends, frontends, counts = report or (self.table_version, [], [], {})
        self.send(
            msg.Report(
                table=version,
                backends=msg.BackendStats.of(backends),
                frontends=[msg.FrontendReport(*row) for row in frontends],
                counts=counts,
                log_dropped=self.log_dropped if stats else 0,
                counts_since_us=self.dataplane.counts_since_us if report else 0,
                count_staleness=list(self.count_staleness) if staleness else [],
                udp=[msg.UdpReport(*row) for row in udp],
                coalesced=coalesced,
            )
        )
        if stats:
            self.log_dropped = 0
            self.coalesced_reported += coalesced
            if staleness:
                self.count_staleness = [0] * len(self.count_staleness)

    def drain(self) -> None:
        self.draining = True
        self.drain_started = time.monotonic()
        self.dataplane.drain()

    def write_access_log(self) -> None:
        if self.reopen_signal:
            self.reopen_signal = False
            try:
                self.access_log.reopen()
            except OSError as exc:
                log.error("worker %d: cannot reopen the access log: %s", self.worker_id, exc)
        records, dropped = self.dataplane.take_log()
        self.log_dropped += dropped
        if records:
            self.log_dropped += self.access_log.write(records, self.backend_names)

    def set_table(self, table: msg.Table, prepared: tuple | None = None) -> None:
        """Swap in a table: prepared is what ControlReader.prepare built for it, if anything."""
        pools, names = prepared or (table_pools(table), backend_names(table))
        self.dataplane.set_table(table.version, pools)
        self.backend_names = names
        self.table_version = table.version
        if self.counts_ahead:
            others = self.peers.others
            self.dataplane.set_others({i: others.get(i, 0) for i in self.counts_ahead})
            self.counts_ahead = set()

    def read_counts(self) -> None:
        """Applies what came on the counts socket; closes it at its end (the supervisor is
        gone, as the control socket tells), which also takes it out of the loop's watch."""
        if self.counts is None:
            return
        while True:
            data = msg.receive(self.counts)
            if data is None:
                return
            if not data:
                self.counts.close()
                self.counts = None
                return
            for message in self.counts_decoder.feed(data):
                self.apply(message)

    def apply_counts(self, counts: msg.Counts) -> None:
        # What the tables lack: removed, or in a table still on its way.
        self.counts_ahead.update(self.peers.apply(counts.workers, counts.gone, self.dataplane))
        if counts.counts_since_us:
            took_ms = (time.monotonic_ns() // 1000 - counts.counts_since_us) / 1000
            self.count_staleness[bisect.bisect_left(msg.STALENESS_BOUNDS_MS, took_ms)] += 1

    def read_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def read_control(self) -> None:
        for item in self.reader.take():
            if item is CONTROL_CLOSED:
                # The supervisor is gone (killed, or it executed a new fastlb). Serve on until
                # a successor's workers accept and tell us to drain (SIGTERM), or the orphan
                # timeout passes.
                self.control_open = False
                self.orphaned_at = time.monotonic()
                if not self.draining:
                    log.warning(
                        "worker %d: the supervisor is gone; serving on for up to %gs",
                        self.worker_id,
                        self.orphan_timeout,
                    )
                return
            message, prepared = item
            if prepared is not None:
                self.set_table(message, prepared)
            else:
                self.apply(message)

    def apply(self, message) -> None:
        if isinstance(message, msg.Table):
            self.set_table(message)
        elif isinstance(message, msg.Counts):
            self.apply_counts(message)
        elif isinstance(message, msg.Drain):
            self.drain()
        elif isinstance(message, msg.KillSessions):
            for backend_id in message.backends:
                self.dataplane.close_backend(backend_id)
        elif isinstance(message, msg.Invalid):
            log.warning("worker %d: ignoring a bad message: %s", self.worker_id, message.reason)
        else:
            log.warning("worker %d: ignoring unexpected %s", self.worker_id, type(message).__name__)

    def send(self, message) -> None:
        if len(self.outgoing) < MAX_PENDING_OUT:
            self.outgoing += msg.encode(message)

    def flush(self) -> None:
        if not self.outgoing or not self.control_open:
            return
        if not msg.send_pending(self.control, self.outgoing):
            self.outgoing.clear()


def _on_signal(process: WorkerProcess):
    def handler(signum, frame):
        # Acted on by the loop; nothing else happens in a handler.
        if signum == signal.SIGUSR1:
            process.reopen_signal = True
        else:
            process.stop_signal = True

    return handler


def pin_to_cpu(worker_id: int, config: Config) -> None:
    """--cpu-affinity: before the data plane allocates its buffers, so that they come from the
    memory next to that CPU. A CPU gone offline since the config was read leaves the worker
    where the kernel puts it, as nginx does."""
    cpu = config.worker_cpu(worker_id)
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.error("worker %d cannot run on CPU %d only: %s; not pinned", worker_id, cpu, exc)


def run(
    worker_id: int,
    listeners: list[tuple[int, socket.socket]],
    control: socket.socket,
    config: Config,
    table: msg.Table,
    pool_ids: list[int] | None = None,
    counts: socket.socket | None = None,
) -> None:
    """Child entry point after fork: serve until drained, then exit. Never returns. counts is
    the counts socket (without one, counts may come on the control socket)."""
    code = 0
    try:
        # Ctrl-C reaches the whole process group: the supervisor alone decides what it means.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the handler below is in place
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pin_to_cpu(worker_id, config)
        try:
            process = WorkerProcess(worker_id, listeners, control, config, table, pool_ids, counts)
        except (OSError, ValueError, MemoryError) as exc:
            log.error("worker %d cannot start: %s", worker_id, exc)
            code = EXIT_BOOT_FAILED
            return
        signal.signal(signal.SIGTERM, _on_signal(process))
        signal.signal(signal.SIGUSR1, _on_signal(process))
        # What the worker holds for its life (the supervisor's state from before the fork, the
        # table) is left out of garbage collection: each report made the collector walk it.
        gc.freeze()
        started = time.monotonic()
        if not process.serve():
            log.warning(
                "worker %d: drain timeout, closing %d connections",
                worker_id,
                process.dataplane.active,
            )
            return
        log.debug("worker %d drained after %.1fs", worker_id, time.monotonic() - started)
        buffers, pipes = process.dataplane.held
        if buffers or pipes:
            log.error(
                "worker %d leaked %d buffers and %d pipes: held with no connection open",
                worker_id,
                buffers,
                pipes,
            )
            code = 1
    except BaseException:
        log.exception("worker %d crashed", worker_id)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)
