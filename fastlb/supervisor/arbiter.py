"""The supervisor's main loop: keeps the workers running and tells them which backends are up.

Shaped like gunicorn's Arbiter. Signal handlers only queue the signal; ``signal.set_wakeup_fd``
makes it wake the one ``selectors`` loop, which also watches the workers' control sockets, the
health checks and the stats server. Each turn of the loop (:meth:`Arbiter.run`):

1. waits for I/O and handles it (worker messages, health checks, stats requests);
2. handles the queued signals by name: ``handle_term``, ``handle_int``, ``handle_hup``,
   ``handle_chld`` (which reaps dead workers);
3. does the housekeeping: spawns missing workers, starts due health checks, sends a new
   backend table if health changed, and passes on the count changes the workers reported to
   the other workers.

The live state is ``self.workers``, ``{pid: WorkerHandle}``, ``self.pools`` (one
:class:`PoolState` per pool, its place being its id) and ``self.backends``, ``{backend id:
BackendState}``. Backend ids are given once per (pool, address) and kept across reloads.

Exit codes: 0 after a drain, 1 when stopped at once by a second signal, 3 when a worker could
not boot (respawning it would only loop).
"""

from __future__ import annotations

import fcntl
import gc
import heapq
import logging
import operator
import os
import random
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import psutil

from fastlb import __version__
from fastlb import worker as worker_process
from fastlb.accesslog import END_REASONS
from fastlb.control import commands
from fastlb.control.server import ControlServer, load_state, save_state
from fastlb.errors import EXIT_BOOT_FAILED, EXIT_FORCED, EXIT_OK, FastlbError
from fastlb.health.probes import Checker, CheckResult
from fastlb.health.state import (
    Damping,
    FailureRun,
    HealthState,
    History,
    effective_weight,
    in_panic,
)
from fastlb.metrics import StatsServer
from fastlb.model import Address, BackendSpec, Config, FrontendSpec, PoolSpec
from fastlb.protocol import messages as msg
from fastlb.supervisor import systemd
from fastlb.supervisor.generation import ACTIVE, DRAINING, PENDING, Generation
from fastlb.supervisor.sockets import LISTEN_FDS_START, Sockets

log = logging.getLogger("fastlb.supervisor")

MAX_SLEEP = 1.0  # the loop runs its housekeeping at least this often
BUSY_RETRY = 0.01  # a check due while the previous one is still running waits this long
QUICK_DEATH = 1.0  # a worker that dies sooner than this after starting is crash-looping
RESPAWN_DELAY = 0.1  # delay before the second quick respawn; it doubles each time after
MAX_RESPAWN_DELAY = 5.0
MAX_PENDING = 1 << 20  # past this many unsent bytes to a worker, counts are dropped
HISTOGRAM_BUCKETS = len(msg.CONNECT_BOUNDS_MS) + 1  # the bounds, then +Inf
RAMP_STEP = 0.5  # while a backend ramps up its weight (slow start), tables go out this often
# Pools whose weights change by fractions (slow start, agent percentages) send weights x this.
WEIGHT_SCALE = 100
# A stop signal this soon after the one that started the drain is the same request: timeout(1)
# and some process managers signal both the process and its process group.
REPEAT_WINDOW = 0.5
PREDECESSORS_ENV = "FASTLB_PREDECESSORS"  # an upgrade names the workers it leaves behind
READY_TIMEOUT = 10.0  # a reload whose workers have not all said hello by then failed

SIGNALS = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGHUP: "hup",
    signal.SIGUSR1: "usr1",
    signal.SIGUSR2: "usr2",
    signal.SIGCHLD: "chld",
}
GAVE_UP_LOG_INTERVAL = 10.0  # seconds between two lines about clients that every backend failed
# A removed backend goes once no worker holds a connection to it this long after its drain went
# out: time for every worker to swap that table in and report (each reports within 50 ms).
REMOVE_SETTLE = 0.5


@dataclass
class WorkerHandle:
    """The supervisor's side of one worker process."""

    worker_id: int  # its slot in its generation
    pid: int
    control: socket.socket
    counts: socket.socket  # the counts socket: counts messages alone, to the worker
    started: float
    generation: Generation
    decoder: msg.Decoder = field(default_factory=msg.Decoder)
    outgoing: bytearray = field(default_factory=bytearray)
    events: int = selectors.EVENT_READ
    counts_outgoing: bytearray = field(default_factory=bytearray)
    counts_waiting: bool = False  # the counts socket is in the selector, for writing
    connected: bool = True  # the control socket is open
    ready: bool = False  # it said hello: it is accepting
    active: dict[int, int] = field(default_factory=dict)  # backend id -> its open connections
    frontend_active: dict[str, int] = field(default_factory=dict)  # frontend -> connections
    counts_whole: bool = False  # its next counts carry every other worker's whole map
    coalesced_waits: int = 0  # timed waits of its loop (--coalesce-us)
    table_sent: msg.Table | None = None  # the last table it was sent (changes apply to it)


@dataclass
class BackendState:
    """What the supervisor knows of one backend: health and totals over all workers."""

    id: int
    pool: int  # its pool's id
    spec: BackendSpec
    health: HealthState
    failures: FailureRun
    damping: Damping
    history: History
    next_check: float = 0.0
    admin: str | None = None  # "drain" or "maint", as its agent said
    operator: str | None = None  # "drain" or "disable", as fastlb ctl said: wins over admin
    runtime_weight: int | None = None  # set by fastlb ctl weight
    added: bool = False  # by fastlb ctl add, not in the config
    removing_since: float | None = None  # fastlb ctl remove: when its drain went out
    agent_weight: int | None = None  # percent of its weight, as its agent said
    ramp_from: float | None = None  # slow start: when it came back
    transitions: int = 0  # changes of state since start
    connect_ms: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    connect_ms_sum: int = 0
    duration_ms: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    duration_ms_sum: int = 0
    connections: int = 0
    failed: int = 0
    up_bytes: int = 0
    down_bytes: int = 0

    @property
    def up(self) -> bool:
        return self.health.up

    @property
    def in_use(self) -> bool:
        """Up, not put in maintenance by its agent, and left in service by the operator."""
        return self.health.up and self.admin != "maint" and self.in_service

    @property
    def in_service(self) -> bool:
        """Not drained, disabled or being removed by the operator."""
        return self.operator is None and self.removing_since is None

    @property
    def state(self) -> str:
        if not self.health.up:
            return "down"
        return self.admin or "up"


@dataclass
class PoolState:
    id: int  # given once per pool name, kept across reloads
    spec: PoolSpec
    backends: list[BackendState]  # in the order of the config


@dataclass
class FrontendState:
    id: int
    spec: FrontendSpec
    connections: int = 0
    ended: list[int] = field(default_factory=lambda: [0] * len(END_REASONS))  # by reason
    gave_up_logged: int = 0  # gave_up as of the last line about it
    gave_up_logged_at: float = 0.0
    udp: dict[str, int] = field(default_factory=dict)  # UDP frontends: UdpReport's counters
    udp_dropped: list[int] = field(default_factory=lambda: [0] * len(msg.UDP_DROP_REASONS))

    @property
    def rejected(self) -> int:
        """Closed before a pick: no valid PROXY header from a trusted sender, no SNI route."""
        return self.ended[END_REASONS.index("rejected")]

    @property
    def gave_up(self) -> int:
        """Closed because every backend tried failed."""
        return self.ended[END_REASONS.index("connect-failed")]

    def add_udp(self, entry: msg.UdpReport) -> None:
        for key in UDP_COUNTERS:
            self.udp[key] = self.udp.get(key, 0) + getattr(entry, key)
        _add(self.udp_dropped, entry.dropped)

    def udp_stats(self) -> dict:
        """The /stats entry of a UDP frontend's traffic."""
        stats = {key: self.udp.get(key, 0) for key in UDP_COUNTERS}
        stats["dropped"] = dict(zip(msg.UDP_DROP_REASONS, self.udp_dropped, strict=True))
        return stats


# The counters of a UDP frontend, as UdpReport names them.
UDP_COUNTERS = ("created", "evicted", "datagrams_in", "bytes_in", "datagrams_out", "bytes_out")


class Arbiter:
    def __init__(
        self,
        config: Config,
        sockets: Sockets,
        stats_socket: socket.socket | None = None,
        on_ready: Callable[[], None] | None = None,
        reload: Callable[[], Config] | None = None,
        control_socket: socket.socket | None = None,
    ):
        self.config = config
        self.latest_config = config  # the file as last read: what runtime changes apply to
        self.runtime, state_warning = (
            load_state(config.state_file) if config.state_file else (commands.Runtime(), None)
        )
        if state_warning:
            log.warning("%s", state_warning)
        for note in self.runtime.reconcile(config, starting=True):
            log.info("state file: %s", note)
        self.state_changed = True  # the file is written again as the config left it
        self.reload_config = reload  # SIGHUP: the config read anew (the --config file)
        self.sockets = sockets  # the listening sockets, kept across generations
        self.on_ready = on_ready
        self.workers: dict[int, WorkerHandle] = {}
        self.backend_ids: dict[tuple[str, Address], int] = {}
        self.backends: dict[int, BackendState] = {}
        self.backends_started = False  # backends there at start do not ramp up (slow start)
        self.pool_ids: dict[str, int] = {}  # pool name -> id, given once
        self.pools: list[PoolState] = []  # the config's, in its order
        self.pool_by_id: dict[int, PoolState] = {}
        # The backends whose entries changed since the last table (None: any may have): the next
        # table is the last one with those entries made anew, not every backend's.
        self.table_dirty: set[int] | None = None
        # Each generation's last table, and where each backend id sits in it (pool, index).
        self.table_cache: dict[int, tuple[msg.Table, dict[int, tuple[int, int]]]] = {}
        self.removing: list[BackendState] = []  # being removed by ctl (sync_runtime finds them)
        self.set_pools(config)
        self.sync_runtime()
        self.backends_started = True
        self.frontends = [FrontendState(i, spec) for i, spec in enumerate(config.frontends)]
        self.table_version = 1
        self.table_changed = False
        self.next_ramp = 0.0  # when ramping weights next go out
        self.access_log_dropped = 0  # records the workers' access logs lost
        self.worker_restarts = 0  # workers that died and were replaced (not drained)
        self.reloads = {"applied": 0, "failed": 0}
        self.counts_changed = False  # every worker is sent the others' whole maps
        # What each worker's reports changed since the last publish, by its pid; and the pids
        # of the workers that exited since: both passed on to the other workers as they are.
        self.counts_pending: dict[int, dict[int, int]] = {}
        self.counts_gone: list[int] = []
        self.counts_since_us = 0  # the oldest change behind them (Report.counts_since_us)
        # Counts applied by the workers, by how long after the change (STALENESS_BOUNDS_MS).
        self.count_staleness = [0] * (len(msg.STALENESS_BOUNDS_MS) + 1)
        # When each backend that wants checks is due: (next_check, id), rebuilt after a table
        # change (None until then); entries whose time is no longer the backend's are stale.
        self.check_queue: list[tuple[float, int]] | None = None
        self.any_ramping: bool | None = None  # ramping(), until the next table change
        self.signal_queue: list[int] = []
        self.saved_handlers: dict[int, object] = {}  # restored on the way out
        self.saved_wakeup_fd = -1
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, lambda mask: self.read_wakeups())
        self.checker = Checker(self.selector, self.on_check)
        self.stats = (
            StatsServer(stats_socket, self.selector, self.snapshot) if stats_socket else None
        )
        self.control = (
            ControlServer(control_socket, self.selector, self.control_request)
            if control_socket
            else None
        )
        self.respawn_at: dict[int, float] = {}  # worker id -> when it may be spawned again
        self.crashes: dict[int, int] = {}  # worker id -> quick deaths in a row
        self.draining = False
        self.drain_started = 0.0
        self.drain_deadline = 0.0
        self.exit_code: int | None = None  # set: the loop ends with it
        self.drain_exit_code = EXIT_OK
        self.announced_ready = False
        self.address = _addresses(config)
        self.generations: list[Generation] = []
        self.generation = self.start_generation(config)  # the newest
        self.predecessors: set[int] = set()  # workers of a fastlb before us, told to drain
        # The workers of the supervisor this process was before an upgrade: our children now.
        self.handed_over = {int(pid) for pid in os.environ.pop(PREDECESSORS_ENV, "").split()}

    # ---- the main loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.init_signals()
        for frontend in self.config.frontends:
            pool = self.config.pool(frontend.pool)
            log.info(
                "frontend %s listening on %s (pool %s, %s over %d backends%s) with %d workers",
                frontend.name,
                ", ".join(str(address) for address in frontend.listen),
                pool.name,
                pool.algorithm,
                len(pool.backends),
                f"; SNI routes to {', '.join(frontend.pools()[1:])}" if frontend.sni else "",
                self.config.workers,
            )
        if self.stats:
            host, port = self.stats.sock.getsockname()[:2]
            log.info("stats on http://%s/stats and /metrics", _host_port(host, port))
        if self.control:
            log.info("control socket on %s", self.control.path)
        self.warn_unusable_pools()
        # The state built so far (every backend's) lives as long as the process: left out of
        # garbage collection, which the reports' many short-lived objects would run over it.
        gc.freeze()
        try:
            while self.exit_code is None:
                self.sleep()
                while self.signal_queue:
                    name = SIGNALS[self.signal_queue.pop(0)]
                    getattr(self, f"handle_{name}")()
                self.housekeeping()
            return self.exit_code
        finally:
            self.shutdown()

    def sleep(self) -> None:
        """Waits for I/O (a signal counts) or the next deadline, and handles what came."""
        deadlines = [self.checker.next_deadline(), time.monotonic() + MAX_SLEEP]
        if self.stats:
            deadlines.append(self.stats.next_deadline())
        if self.control:
            deadlines.append(self.control.next_deadline())
        if self.draining:
            deadlines.append(self.drain_deadline)
        else:
            queue = self.checks_queued()
            if queue:
                deadlines.append(queue[0][0])
            missing = self.missing_worker_ids()
            deadlines += [self.respawn_at.get(worker_id, 0.0) for worker_id in missing]
            if self.ramping():
                deadlines.append(self.next_ramp)
            deadlines += [backend.removing_since + REMOVE_SETTLE for backend in self.removing]
        timeout = max(0.0, min(d for d in deadlines if d is not None) - time.monotonic())
        stats_events = []
        for key, mask in self.selector.select(timeout):
            if self.stats and self.stats.owns(key.fileobj):
                stats_events.append((key, mask))
            else:
                key.data(mask)
        if stats_events:
            # Answer after the counts this turn's reports changed have gone out, so /stats
            # never shows the workers counts they have not been sent.
            self.publish()
            for key, mask in stats_events:
                key.data(mask)

    def housekeeping(self) -> None:
        if self.exit_code is not None:
            return
        now = time.monotonic()
        self.checker.expire(now)
        if self.stats:
            self.stats.expire(now)
        if self.control:
            self.control.expire(now)
        if self.draining:
            if not self.workers:
                log.info("all workers have exited")
                self.exit_code = self.drain_exit_code
            elif now >= self.drain_deadline:
                log.warning(
                    "drain timeout: killing %d workers with open connections", len(self.workers)
                )
                self.kill_workers(signal.SIGKILL)
                self.exit_code = self.drain_exit_code
        else:
            self.advance_generations(now)
            self.spawn_workers()
            self.run_checks(now)
            self.log_gave_up(now)
            if now >= self.next_ramp and self.ramping():
                self.entries_changed(b for b in self.backends.values() if b.ramp_from is not None)
                self.next_ramp = now + RAMP_STEP
            self.finish_removals(now)
        self.reap_predecessors()
        self.publish()
        self.journal()

    def log_gave_up(self, now: float) -> None:
        """At most one line per frontend every GAVE_UP_LOG_INTERVAL about clients that were
        closed because every backend they tried failed."""
        for frontend in self.frontends:
            unlogged = frontend.gave_up - frontend.gave_up_logged
            if unlogged and now - frontend.gave_up_logged_at >= GAVE_UP_LOG_INTERVAL:
                log.warning(
                    "frontend %s: %d clients closed, every backend tried failed (pool %s)",
                    frontend.spec.name,
                    unlogged,
                    frontend.spec.pool,
                )
                frontend.gave_up_logged = frontend.gave_up
                frontend.gave_up_logged_at = now

    def announce_ready(self) -> None:
        self.announced_ready = True
        log.info("ready: %d workers accepting on %s", self.config.workers, self.address)
        systemd.notify("READY=1")
        if self.on_ready:
            self.on_ready()

    # ---- signals -------------------------------------------------------------------------------

    def init_signals(self) -> None:
        self.saved_wakeup_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in SIGNALS:
            self.saved_handlers[signum] = signal.signal(signum, self.signal_received)

    def signal_received(self, signum, frame) -> None:
        self.signal_queue.append(signum)  # nothing else here: the main loop acts on it

    def read_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def handle_term(self) -> None:
        if self.draining:
            if time.monotonic() - self.drain_started < REPEAT_WINDOW:
                return
            log.warning("second stop signal: killing the workers now")
            self.kill_workers(signal.SIGKILL)
            self.exit_code = EXIT_FORCED
        else:
            self.drain(EXIT_OK)

    handle_int = handle_term

    def handle_hup(self) -> None:
        self.reload()

    def handle_usr2(self) -> None:
        self.upgrade()

    # ---- reloads and upgrades -----------------------------------------------------------------

    def reload(self) -> str | None:
        """Re-reads the config. Valid: binds the new addresses, starts a new generation of
        workers with it and returns None; the generations before it drain once all of its
        workers said hello. Not valid: the running settings stay; returns why, one line."""
        if self.reload_config is None:
            log.warning("reload: nothing to reload (no --config file)")
            return "nothing to reload: fastlb runs without --config"
        if self.draining:
            return "stopping: no reload"
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = self.sockets.prepare(self.keep_any_ports(self.reload_config()))
        except FastlbError as exc:
            log.error("reload failed, the running settings stay: %s", exc)
            self.reloads["failed"] += 1
            systemd.notify(f"READY=1\nSTATUS=reload refused: {exc}")
            return str(exc)
        self.reloads["applied"] += 1
        for name in ("stats", "control", "state_file"):
            if getattr(new, name) != getattr(self.config, name):
                log.warning("reload: %s changed; restart fastlb to apply", name.replace("_", "-"))
                new = replace(new, **{name: getattr(self.config, name)})
        self.latest_config = new
        for note in self.runtime.reconcile(new):
            log.info("reload: %s", note)
        self.state_changed = True
        self.apply_config(new)  # the pools' backends as the runtime changes leave them
        self.sync_runtime()
        self.warn_unusable_pools()
        for address in self.sockets.retire_unused(new):
            log.info("reload: %s retires: no new clients, the queued ones are accepted", address)
        self.generation = self.start_generation(new)
        log.info(
            "reload: generation %d starting %d workers (%s)",
            self.generation.number,
            new.workers,
            self.address,
        )
        return None

    def keep_any_ports(self, config: Config) -> Config:
        """A listen address with port 0 ("any") keeps the port it got, for the same frontend
        at the same place, rather than a new one on every reload."""
        running = {frontend.name: frontend.listen for frontend in self.config.frontends}
        frontends = []
        for frontend in config.frontends:
            was = running.get(frontend.name, ())
            listen = tuple(
                was[i]
                if address.port == 0 and i < len(was) and was[i].host == address.host
                else address
                for i, address in enumerate(frontend.listen)
            )
            frontends.append(replace(frontend, listen=listen))
        return replace(config, frontends=tuple(frontends))

    def apply_config(self, config: Config) -> None:
        """Makes ``config`` the running one: pools and frontends (state kept by name), tables."""
        self.config = config
        self.set_pools(config)
        old = {frontend.spec.name: frontend for frontend in self.frontends}
        self.frontends = []
        for i, spec in enumerate(config.frontends):
            frontend = old.get(spec.name) or FrontendState(i, spec)
            frontend.id, frontend.spec = i, spec
            self.frontends.append(frontend)
        self.address = _addresses(config)
        logging.getLogger().setLevel(config.log_level.upper())
        self.all_entries_changed()
        self.counts_changed = True

    def set_pools(self, config: Config) -> None:
        """The pools of ``config``; one that stays keeps its id and the state of its backends."""
        pools = []
        for spec in config.pools:
            spec = replace(spec, backends=self.runtime.specs(spec))  # ctl's adds and removals
            pool_id = self.pool_ids.setdefault(spec.name, len(self.pool_ids))
            pool = self.pool_by_id.get(pool_id)
            if pool is None:
                pool = PoolState(
                    pool_id, spec, [self.backend_state(pool_id, spec, b) for b in spec.backends]
                )
            else:
                pool.spec = spec
                self.replace_backends(pool, spec.backends)
            pools.append(pool)
        kept = {pool.id for pool in pools}
        for pool in self.pools:
            if pool.id not in kept:
                log.info("reload: pool %s removed", pool.spec.name)
                for backend in pool.backends:
                    self.checker.cancel(backend.id)
                    self.backends.pop(backend.id, None)
        self.pools = pools
        self.pool_by_id = {pool.id: pool for pool in pools}

    def start_generation(self, config: Config) -> Generation:
        now = time.monotonic()
        number = self.generations[-1].number + 1 if self.generations else 1
        pool_ids = [self.pool_ids[pool.name] for pool in config.pools]
        generation = Generation(
            number,
            config,
            pool_ids,
            now,
            now + READY_TIMEOUT,
            counts_matter=worker_process.counts_matter(config),
        )
        self.generations.append(generation)
        return generation

    def advance_generations(self, now: float) -> None:
        """Activates the newest generation once all its workers said hello (the ones before it
        then drain), ends a reload whose workers do not start, retires drained generations."""
        newest = self.generation
        if newest.state == PENDING:
            ready = all(
                slot in newest.workers and self.workers[newest.workers[slot]].ready
                for slot in range(newest.size)
            )
            # A retiring address's queue is accepted by the generations still polling it.
            if ready and (self.sockets.retiring_queued() == 0 or now >= newest.ready_deadline):
                self.activate(newest, now)
            elif not ready and now >= newest.ready_deadline and len(self.generations) > 1:
                self.abort(newest, f"its workers did not all start within {READY_TIMEOUT:g}s")
        for generation in list(self.generations):
            if generation.state != DRAINING:
                continue
            if not generation.workers:
                self.generations.remove(generation)
                log.info("generation %d has drained", generation.number)
            elif now >= generation.drain_deadline:
                log.warning(
                    "generation %d: drain timeout, killing %d workers with open connections",
                    generation.number,
                    len(generation.workers),
                )
                for pid in generation.workers.values():
                    self.kill_worker(self.workers[pid], signal.SIGKILL)

    def activate(self, generation: Generation, now: float) -> None:
        generation.state = ACTIVE
        for older in self.generations:
            if older is not generation and older.state != DRAINING:
                self.drain_generation(older, now)
        self.sockets.steer_all(generation.config)
        for address in self.sockets.close_retired():
            log.info("reload: stopped listening on %s", address)
        if not self.announced_ready:
            self.announce_ready()
            self.find_predecessors()
            return
        status = f"generation {generation.number}: {generation.size} workers on {self.address}"
        log.info("reload done: %s", status)
        systemd.notify(f"READY=1\nSTATUS={status}")

    def drain_generation(self, generation: Generation, now: float) -> None:
        """The generation stops polling the listeners (which stay open here) and finishes its
        connections; they count in the totals until they close."""
        generation.state = DRAINING
        generation.drain_deadline = now + self.config.drain_timeout
        for pid in generation.workers.values():
            worker = self.workers[pid]
            if worker.connected:
                self.send(worker, msg.Drain())
            else:
                self.kill_worker(worker, signal.SIGTERM)

    def abort(self, generation: Generation, why: str) -> None:
        """A reload whose generation cannot start: it drains, the one before it stays."""
        log.error("reload failed, the running settings stay: %s", why)
        self.reloads["failed"] += 1
        self.reloads["applied"] -= 1
        self.drain_generation(generation, time.monotonic())
        previous = next(g for g in reversed(self.generations) if g.state != DRAINING)
        self.generation = previous
        self.sockets.prepare(previous.config)  # addresses it retired come back
        self.apply_config(previous.config)
        systemd.notify(f"READY=1\nSTATUS=reload failed: {why}")

    def upgrade(self) -> str | None:
        """Execs the installed fastlb in place (the same pid, so systemd keeps following it),
        handing it the listening sockets as LISTEN_FDS. The workers are left serving: the new
        supervisor tells them to drain once its own workers accept. Returns why not, if not."""
        if self.draining:
            return "stopping: no upgrade"
        if self.reload_config is not None:
            try:
                self.reload_config()
            except FastlbError as exc:
                log.error("upgrade refused: %s", exc)
                return str(exc)
        handover = self.sockets.handover()
        log.info("upgrade: executing %s with %d listening sockets", sys.executable, len(handover))
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        env = dict(os.environ)
        env.update(
            LISTEN_FDS=str(len(handover)),
            LISTEN_PID=str(os.getpid()),
            LISTEN_FDNAMES=":".join(name for _, name in handover),
        )
        env[PREDECESSORS_ENV] = " ".join(str(pid) for pid in self.workers)
        for handler in logging.getLogger().handlers:
            handler.flush()
        # First out of the way of 3..3+n, then into place; every other descriptor closes on exec.
        base = LISTEN_FDS_START + len(handover)
        moved = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, base) for sock, _ in handover]
        for i, fd in enumerate(moved):
            os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        signal.set_wakeup_fd(-1)
        try:
            os.execve(sys.executable, sys.orig_argv, env)
        except OSError as exc:
            # Our descriptors are gone: the workers serve on as orphans until a successor.
            log.critical("upgrade: cannot execute %s: %s", sys.executable, exc)
            os._exit(EXIT_FORCED)

    def find_predecessors(self) -> None:
        """Workers of an earlier fastlb on our sockets (left by a killed supervisor, or by the
        one we replaced in an upgrade) are told to drain, now that ours accept. Our other
        children (the backends of fastlb demo) are not theirs."""
        inodes = {os.fstat(sock.fileno()).st_ino for sock in self.sockets.all()}
        ours = {os.getpid(), 1, *self.workers}
        for pid in psutil.pids():
            if pid in ours or not _holds_socket(pid, inodes):
                continue
            try:
                process = psutil.Process(pid)
                if process.ppid() == os.getpid() and pid not in self.handed_over:
                    continue
                if not any("fastlb" in part for part in process.cmdline()):
                    continue
                os.kill(pid, signal.SIGTERM)
            except (psutil.Error, OSError):
                continue
            self.predecessors.add(pid)
        if self.predecessors:
            log.info(
                "told %d workers of the previous fastlb to drain: %s",
                len(self.predecessors),
                " ".join(map(str, sorted(self.predecessors))),
            )

    def reap_predecessors(self) -> None:
        # After an upgrade they are our children; else someone else reaps them.
        for pid in list(self.predecessors):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid if not psutil.pid_exists(pid) else 0
            if done:
                self.predecessors.discard(pid)

    def handle_usr1(self) -> None:
        """The access log is reopened by each worker (logrotate moved it away)."""
        for worker in self.workers.values():
            self.kill_worker(worker, signal.SIGUSR1)

    def handle_chld(self) -> None:
        # Only then: a waitpid per worker on every turn was a third of the loop's system calls.
        self.reap_workers()

    # ---- the worker set ------------------------------------------------------------------------

    def missing_worker_ids(self) -> list[int]:
        """The slots of the newest generation without a worker."""
        return self.generation.missing_slots()

    def spawn_workers(self) -> None:
        now = time.monotonic()
        for worker_id in self.missing_worker_ids():
            if now >= self.respawn_at.get(worker_id, 0.0):
                self.spawn_worker(worker_id)

    def spawn_worker(self, worker_id: int) -> None:
        generation = self.generation
        table = self.table(generation)
        listeners = self.sockets.slot_listeners(generation.config, worker_id)
        pairs = []
        try:
            for _ in range(2):  # the control socket, the counts socket
                pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
            pid = os.fork()
        except OSError as exc:
            for pair in pairs:
                for end in pair:
                    end.close()
            self.spawn_failed(worker_id, exc)
            return
        (parent_end, child_end), (counts_end, child_counts_end) = pairs
        if pid == 0:
            try:
                parent_end.close()
                counts_end.close()
                self.close_after_fork(keep=[sock for _, sock in listeners])
                worker_process.run(
                    worker_id,
                    listeners,
                    child_end,
                    generation.config,
                    table,
                    pool_ids=generation.pool_ids,
                    counts=child_counts_end,
                )
            finally:
                os._exit(EXIT_FORCED)
        child_end.close()
        child_counts_end.close()
        parent_end.setblocking(False)
        counts_end.setblocking(False)
        worker = WorkerHandle(
            worker_id, pid, parent_end, counts_end, time.monotonic(), generation, table_sent=table
        )
        self.workers[pid] = worker
        generation.workers[worker_id] = pid
        self.selector.register(
            parent_end, worker.events, lambda mask: self.on_worker_io(worker, mask)
        )
        log.debug("worker %d started (pid %d)", worker_id, pid)

    def spawn_failed(self, worker_id: int, exc: OSError) -> None:
        # Out of processes or descriptors: the system may recover, so try again later.
        log.error(
            "cannot start worker %d: %s; trying again in %gs", worker_id, exc, MAX_RESPAWN_DELAY
        )
        self.respawn_at[worker_id] = time.monotonic() + MAX_RESPAWN_DELAY

    def close_after_fork(self, keep: list[socket.socket]) -> None:
        """In the new worker: closes what belongs to the supervisor and the other workers.

        The selector's epoll instance is shared with the supervisor, so it is closed without
        unregistering anything."""
        signal.set_wakeup_fd(-1)
        os.close(self.wake_r)
        os.close(self.wake_w)
        for sock in self.sockets.all():
            if not any(sock is kept for kept in keep):
                sock.close()
        for worker in self.workers.values():
            worker.control.close()
            worker.counts.close()
        self.checker.close_after_fork()
        if self.stats:
            self.stats.close_after_fork()
        if self.control:
            self.control.close_after_fork()
        self.selector.close()

    def reap_workers(self) -> None:
        # Reap our workers by PID only: an embedding program (fastlb demo) has other children.
        for worker in list(self.workers.values()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid:
                self.worker_exited(worker, os.waitstatus_to_exitcode(status))

    def worker_exited(self, worker: WorkerHandle, code: int) -> None:
        del self.workers[worker.pid]
        generation = worker.generation
        if generation.workers.get(worker.worker_id) == worker.pid:
            del generation.workers[worker.worker_id]
        self.disconnect(worker)
        how = _how_it_ended(code)
        if self.draining or generation.state == DRAINING:
            log.info("worker %d (pid %d) %s", worker.worker_id, worker.pid, how)
            return
        if generation is not self.generation:
            log.warning("worker %d (pid %d) %s", worker.worker_id, worker.pid, how)
            return  # replaced by the reload under way
        self.worker_restarts += 1
        if code == EXIT_BOOT_FAILED and len(self.generations) > 1:
            self.abort(generation, f"worker {worker.worker_id} could not start")
            return
        if code == EXIT_BOOT_FAILED:
            log.error("worker %d could not start: stopping", worker.worker_id)
            self.drain(EXIT_BOOT_FAILED)
            return
        crashes = self.crashes.get(worker.worker_id, 0)
        if time.monotonic() - worker.started >= QUICK_DEATH:
            crashes = 0
        delay = 0.0 if crashes == 0 else min(MAX_RESPAWN_DELAY, RESPAWN_DELAY * 2 ** (crashes - 1))
        self.crashes[worker.worker_id] = crashes + 1
        self.respawn_at[worker.worker_id] = time.monotonic() + delay
        if delay:
            log.warning(
                "worker %d (pid %d) %s again; restarting it in %.1fs",
                worker.worker_id,
                worker.pid,
                how,
                delay,
            )
        else:
            log.warning("worker %d (pid %d) %s; restarting it", worker.worker_id, worker.pid, how)

    def kill_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            self.kill_worker(worker, signum)

    def kill_worker(self, worker: WorkerHandle, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass

    def drain(self, exit_code: int) -> None:
        """Stops accepting, asks every worker to finish its connections, and ends the loop with
        ``exit_code`` when they all have (or at the drain timeout)."""
        self.draining = True
        self.drain_exit_code = exit_code
        self.drain_started = time.monotonic()
        self.drain_deadline = self.drain_started + self.config.drain_timeout
        systemd.notify("STOPPING=1")
        log.info(
            "draining: accepting no more connections, waiting up to %gs for open ones",
            self.config.drain_timeout,
        )
        self.close_listeners()
        for worker in self.workers.values():
            if worker.connected:
                self.send(worker, msg.Drain())
            else:
                self.kill_worker(worker, signal.SIGTERM)

    def close_listeners(self) -> None:
        self.sockets.close()

    def shutdown(self) -> None:
        """Leaves nothing behind: kills and reaps the workers still running, closes sockets."""
        self.kill_workers(signal.SIGKILL)
        for worker in list(self.workers.values()):
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
            self.disconnect(worker)
        self.workers.clear()
        self.checker.close()
        if self.stats:
            self.stats.close()
        if self.control:
            self.control.close()
        self.journal()
        self.close_listeners()
        self.selector.close()
        for signum, handler in self.saved_handlers.items():
            # The exit is decided: a stop signal from here on (a process manager repeating
            # itself) must not turn it into a death by signal.
            stop = signum in (signal.SIGTERM, signal.SIGINT)
            signal.signal(signum, signal.SIG_IGN if stop else handler)
        signal.set_wakeup_fd(self.saved_wakeup_fd)
        os.close(self.wake_r)
        os.close(self.wake_w)

    # ---- messages ------------------------------------------------------------------------------

    def on_worker_io(self, worker: WorkerHandle, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self.read_messages(worker)
        if worker.connected and mask & selectors.EVENT_WRITE:
            self.flush(worker)

    def read_messages(self, worker: WorkerHandle) -> None:
        data = msg.receive(worker.control)
        if data is None:
            return
        if not data:
            # The worker closed its end: it is exiting or dead. Make sure, then reap it.
            self.disconnect(worker)
            self.kill_worker(worker, signal.SIGKILL)
            return
        for message in worker.decoder.feed(data):
            self.handle_message(worker, message)

    def handle_message(self, worker: WorkerHandle, message: msg.Message | msg.Invalid) -> None:
        match message:
            case msg.Report():
                self.handle_report(worker, message)
            case msg.Hello():
                self.handle_hello(worker, message)
            case msg.Invalid(reason=reason):
                log.warning("worker %d: ignoring a bad message: %s", worker.worker_id, reason)
            case _:
                log.warning(
                    "worker %d: ignoring unexpected %s", worker.worker_id, type(message).__name__
                )

    def handle_hello(self, worker: WorkerHandle, hello: msg.Hello) -> None:
        if hello.v != msg.PROTOCOL_VERSION:
            log.warning(
                "worker %d speaks protocol %d, not %d",
                worker.worker_id,
                hello.v,
                msg.PROTOCOL_VERSION,
            )
        worker.ready = True
        worker.counts_whole = worker.generation.counts_matter  # its first counts: all
        log.info("worker %d (pid %d) is accepting", worker.worker_id, worker.pid)

    def handle_report(self, worker: WorkerHandle, report: msg.Report) -> None:
        # Failures count against the table they were seen with only: a report against an
        # older one may predate the last change.
        current = report.table == self.table_version
        failing = []
        for (
            backend_id,
            active,
            new,
            up_bytes,
            down_bytes,
            failed,
            succeeded,
            streak,
            connect_ms,
            connect_ms_sum,
            duration_ms,
            duration_ms_sum,
        ) in report.backends.rows():  # a row per backend every second: kept to one pass
            backend = self.backends.get(backend_id)
            if backend is None:
                continue  # removed by a reload: its connections count nowhere now
            backend.connections += new
            backend.failed += failed
            backend.up_bytes += up_bytes
            backend.down_bytes += down_bytes
            if connect_ms:
                _add(backend.connect_ms, connect_ms)
                backend.connect_ms_sum += connect_ms_sum
            if duration_ms:
                _add(backend.duration_ms, duration_ms)
                backend.duration_ms_sum += duration_ms_sum
            self.set_active(worker, backend_id, active)
            if current and backend.failures.report(failed, succeeded, streak):
                failing.append(backend)
        if report.counts:
            # One entry per count change: taken whole, with no per-entry step here. Ids no
            # longer in the tables are passed on too, and the workers' tables lack them.
            worker.active.update(report.counts)
            pending = self.counts_pending.get(worker.pid)
            if pending is None:
                self.counts_pending[worker.pid] = report.counts
            else:
                pending.update(report.counts)
        if report.frontends or report.udp:  # once a second (most reports are counts alone)
            self.add_frontend_stats(worker, report)
        self.access_log_dropped += report.log_dropped
        worker.coalesced_waits += report.coalesced
        if report.count_staleness:
            _add(self.count_staleness, report.count_staleness)
        if report.counts_since_us and (
            not self.counts_since_us or report.counts_since_us < self.counts_since_us
        ):
            self.counts_since_us = report.counts_since_us
        for backend in failing:
            if backend.up:
                self.mark_down(backend, f"{backend.failures.count} connects failed in a row")

    def add_frontend_stats(self, worker: WorkerHandle, report: msg.Report) -> None:
        specs = worker.generation.config.frontends
        by_name = {frontend.spec.name: frontend for frontend in self.frontends}
        for entry in report.frontends:
            if 0 <= entry.id < len(specs):
                name = specs[entry.id].name
                worker.frontend_active[name] = entry.active
                frontend = by_name.get(name)
                if frontend is not None:  # else removed by a reload
                    frontend.connections += entry.accepted
                    _add(frontend.ended, entry.ended)
        for entry in report.udp:
            if 0 <= entry.id < len(specs):
                name = specs[entry.id].name
                worker.frontend_active[name] = entry.flows
                frontend = by_name.get(name)
                if frontend is not None:
                    frontend.add_udp(entry)

    def send(self, worker: WorkerHandle, message: msg.Message) -> None:
        if not worker.connected:
            return
        if isinstance(message, msg.Counts):
            self.send_counts(worker, message)
        else:
            self.send_encoded(worker, msg.encode(message))

    def send_counts(self, worker: WorkerHandle, counts: msg.Counts) -> None:
        if len(worker.counts_outgoing) > MAX_PENDING:
            worker.counts_whole = True  # the worker is not reading: whole maps when it does
            return
        worker.counts_outgoing += msg.encode(counts)
        self.flush_counts(worker)

    def flush_counts(self, worker: WorkerHandle) -> None:
        if not msg.send_pending(worker.counts, worker.counts_outgoing):
            # The worker is gone; its control socket tells, and disconnect follows.
            worker.counts_outgoing.clear()
        waiting = bool(worker.counts_outgoing)
        if waiting != worker.counts_waiting:
            worker.counts_waiting = waiting
            if waiting:
                self.selector.register(
                    worker.counts, selectors.EVENT_WRITE, lambda mask: self.flush_counts(worker)
                )
            else:
                self.selector.unregister(worker.counts)

    def send_encoded(self, worker: WorkerHandle, data: bytes) -> None:
        if worker.connected:
            worker.outgoing += data
            self.flush(worker)

    def flush(self, worker: WorkerHandle) -> None:
        if worker.outgoing and not msg.send_pending(worker.control, worker.outgoing):
            self.disconnect(worker)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if worker.outgoing else 0)
        if events != worker.events:
            worker.events = events
            self.selector.modify(worker.control, events, self.selector.get_key(worker.control).data)

    def set_active(self, worker: WorkerHandle, backend_id: int, count: int) -> None:
        """A worker's open connections to a backend (that is in self.backends)."""
        if worker.active.get(backend_id, 0) != count:
            worker.active[backend_id] = count
            self.counts_pending.setdefault(worker.pid, {})[backend_id] = count

    def disconnect(self, worker: WorkerHandle) -> None:
        """Closes the control socket of a worker that exited or is about to."""
        if not worker.connected:
            return
        worker.connected = False
        worker.ready = False
        self.selector.unregister(worker.control)
        worker.control.close()
        worker.outgoing.clear()
        if worker.counts_waiting:
            self.selector.unregister(worker.counts)
        worker.counts.close()
        worker.counts_outgoing.clear()
        self.counts_pending.pop(worker.pid, None)
        if any(worker.active.values()):
            self.counts_gone.append(worker.pid)
        worker.active = {}
        worker.frontend_active = {}

    def publish(self) -> None:
        """Sends the workers what changed during this turn: the table, then the counts."""
        if self.table_changed:
            self.table_changed = False
            dirty, self.table_dirty = self.table_dirty, set()
            now = time.monotonic()
            self.table_version += 1
            if dirty is None:
                self.counts_changed = True  # backends came or went: counts are sent afresh
            tables = {}  # a generation's workers know only its pools
            # What each worker is sent, by its generation and the table it holds: the change
            # from that table (a flap of one of 1,000 backends is one entry), else the table.
            sent = {}
            # Health, weights or the backends changed: what checks and ramps is found anew, for
            # the changed backends only where it is known which (the queue skips stale entries).
            if dirty is None or self.check_queue is None:
                self.check_queue = None
            else:
                for backend_id in dirty:
                    backend = self.backends.get(backend_id)
                    if backend is not None and self.wants_check(backend):
                        heapq.heappush(self.check_queue, (backend.next_check, backend_id))
            self.any_ramping = None
            for worker in self.workers.values():
                generation = worker.generation
                if generation.state == DRAINING:
                    continue
                table = tables.get(generation.number)
                if table is None:
                    table = tables[generation.number] = self.generation_table(
                        generation, dirty, now
                    )
                key = (generation.number, id(worker.table_sent))
                if key not in sent:
                    change = worker.table_sent and msg.table_change(worker.table_sent, table)
                    sent[key] = (worker.table_sent, msg.encode(change or table))
                self.send_encoded(worker, sent[key][1])
                worker.table_sent = table
            for number in [n for n in self.table_cache if n not in tables]:
                del self.table_cache[number]  # a generation that drains gets no more tables
        self.publish_counts()

    def publish_counts(self) -> None:
        """Passes each worker's count changes on to the other workers, as they came: the sums
        are theirs to make (_dataplane.PeerCounts)."""
        whole = self.counts_changed
        if not (
            self.counts_pending
            or self.counts_gone
            or whole
            or any(worker.counts_whole for worker in self.workers.values())
        ):
            return
        pending, self.counts_pending = self.counts_pending, {}
        gone, self.counts_gone = self.counts_gone, []
        since, self.counts_since_us = self.counts_since_us, 0
        self.counts_changed = False
        for worker in self.workers.values():
            if not worker.generation.counts_matter:
                continue  # its picks do not read the others' counts
            if whole or worker.counts_whole:
                worker.counts_whole = False
                workers = {
                    other.pid: other.active
                    for other in self.workers.values()
                    if other is not worker and other.active
                }
            else:
                workers = {pid: counts for pid, counts in pending.items() if pid != worker.pid}
            if workers or gone:
                self.send(
                    worker,
                    msg.Counts(self.table_version, workers, gone, counts_since_us=since),
                )

    def entries_changed(self, backends) -> None:
        """Those backends' table entries go out with this turn's table."""
        self.table_changed = True
        if self.table_dirty is not None:
            self.table_dirty.update(backend.id for backend in backends)

    def all_entries_changed(self) -> None:
        """The backends themselves changed (a reload, a new list): a whole table goes out."""
        self.table_changed = True
        self.table_dirty = None

    def table(self, generation: Generation) -> msg.Table:
        """The backends of the pools ``generation`` knows."""
        now = time.monotonic()
        known = set(generation.pool_ids)
        return msg.Table(
            version=self.table_version,
            pools=[
                msg.PoolTable(pool.id, [self.entry(backend, now) for backend in pool.backends])
                for pool in self.pools
                if pool.id in known
            ],
        )

    def entry(self, backend: BackendState, now: float) -> msg.BackendEntry:
        return msg.BackendEntry(
            backend.id,
            backend.spec.address.host,
            backend.spec.address.port,
            self.effective_weight(backend, now),
            backend.in_use,
            backend.spec.backup,
        )

    def generation_table(self, generation: Generation, dirty: set[int] | None, now: float):
        """This turn's table for a generation: its last one with the dirty backends' entries
        made anew (a flap of one of 1,000 backends costs one entry), or a whole new one."""
        cached = self.table_cache.get(generation.number)
        if dirty is None or cached is None:
            table = self.table(generation)
            places = {
                entry.id: (p, k)
                for p, pool in enumerate(table.pools)
                for k, entry in enumerate(pool.backends)
            }
        else:
            last, places = cached
            pools = list(last.pools)
            for backend_id in dirty:
                place, backend = places.get(backend_id), self.backends.get(backend_id)
                if place is None or backend is None:
                    continue  # not in this generation's pools
                p, k = place
                if pools[p] is last.pools[p]:
                    pools[p] = msg.PoolTable(last.pools[p].id, list(last.pools[p].backends))
                pools[p].backends[k] = self.entry(backend, now)
            table = msg.Table(self.table_version, pools)
        self.table_cache[generation.number] = (table, places)
        return table

    def active_totals(self) -> dict[int, int]:
        """Open connections by backend id, all workers together (summed when asked: the
        reports that change them come up to once a millisecond per worker)."""
        totals = dict.fromkeys(self.backends, 0)
        for worker in self.workers.values():
            for backend_id, count in worker.active.items():
                if count and backend_id in totals:
                    totals[backend_id] += count
        return totals

    # ---- health ---------------------------------------------------------------------------------

    def backend_state(self, pool_id: int, pool: PoolSpec, spec: BackendSpec) -> BackendState:
        """The state of a backend of a pool: kept (with its new weight and role) when the pool
        already has one at that address, else a new one with a new id. A backend added after
        start ramps up its weight like one that came back (slow start)."""
        key = (pool.name, spec.address)
        backend_id = self.backend_ids.get(key)
        if backend_id is not None and backend_id in self.backends:
            backend = replace(self.backends[backend_id], spec=spec)
        else:
            if backend_id is None:
                backend_id = self.backend_ids[key] = len(self.backend_ids)
            check = pool.check
            now = time.monotonic()
            # Down when last seen down (the state file): no traffic before its checks pass.
            up = self.runtime.get(pool.name, spec.address).health != "down"
            backend = BackendState(
                backend_id,
                pool_id,
                spec,
                HealthState(check.rise, check.fall, up=up),
                FailureRun(check.fall),
                Damping(check.flap_window, check.flap_base, check.flap_max),
                History("up" if up else "down", time.time()),
                ramp_from=now if pool.slow_start and self.backends_started and up else None,
            )
        self.backends[backend_id] = backend
        return backend

    def replace_backends(
        self, pool: PoolState, specs: tuple[BackendSpec, ...], why: str = "reload"
    ) -> None:
        """Swaps in a new backend list for one pool. Workers keep each open connection on its
        backend; a backend that stays keeps its id, health and counters."""
        if tuple(backend.spec for backend in pool.backends) == tuple(specs):
            log.info("%s: the backends of pool %s are unchanged", why, pool.spec.name)
            return
        old = {backend.spec.address: backend for backend in pool.backends}
        for backend in pool.backends:
            self.checker.cancel(backend.id)
        pool.backends = [self.backend_state(pool.id, pool.spec, spec) for spec in specs]
        pool.spec = replace(pool.spec, backends=tuple(specs))
        kept = {backend.id for backend in pool.backends}
        for backend in old.values():
            if backend.id not in kept:
                del self.backends[backend.id]
                for worker in self.workers.values():
                    worker.active.pop(backend.id, None)
        self.all_entries_changed()
        self.counts_changed = True
        stayed = sum(1 for spec in specs if spec.address in old)
        log.info(
            "%s: pool %s has %d backends (%d kept, %d added, %d removed)",
            why,
            pool.spec.name,
            len(specs),
            stayed,
            len(specs) - stayed,
            len(old) - stayed,
        )

    def pool_spec(self, backend: BackendState) -> PoolSpec:
        return self.pool_by_id[backend.pool].spec

    def weight_scale(self, pool: PoolSpec) -> int:
        return WEIGHT_SCALE if pool.slow_start or pool.check.type == "agent" else 1

    def effective_weight(self, backend: BackendState, now: float) -> int:
        """The weight the workers use, in units of 1 / weight_scale: the configured one, times
        its agent's percentage, ramped up while slow start lasts; 0 while its agent or the
        operator drains it. The operator's runtime weight stands for the configured one."""
        if backend.admin == "drain" or not backend.in_service:
            return 0
        configured = (
            backend.spec.weight if backend.runtime_weight is None else backend.runtime_weight
        )
        weight = configured * self.weight_scale(self.pool_spec(backend))
        if backend.agent_weight is not None:
            weight = weight * backend.agent_weight // 100
        slow_start = self.pool_spec(backend).slow_start
        if backend.ramp_from is not None:
            elapsed = now - backend.ramp_from
            if not slow_start or elapsed >= slow_start:
                backend.ramp_from = None
            else:
                weight = effective_weight(weight, elapsed, slow_start)
        return weight

    def in_panic(self, pool: PoolState) -> bool:
        """Whether the workers spread this pool's traffic over every primary (as the data plane
        decides it, from the same table)."""
        primaries = [backend for backend in pool.backends if not backend.spec.backup]
        up = sum(1 for backend in primaries if backend.in_use)
        return up > 0 and in_panic(up, len(primaries), pool.spec.panic_threshold)

    def ramping(self) -> bool:
        if self.any_ramping is None:
            self.any_ramping = any(b.ramp_from is not None for b in self.backends.values())
        return self.any_ramping

    def wants_check(self, backend: BackendState) -> bool:
        if backend.operator == "disable":
            return False  # maintenance: no checks either
        return self.pool_spec(backend).check.active or not backend.up

    def check_interval(self, backend: BackendState) -> float:
        """The time to the next check: fast while a change of state is pending, the down
        interval while down, plus up to the jitter at random."""
        check = self.pool_spec(backend).check
        health = backend.health
        top = health.rise + health.fall - 1
        pending = (health.up and health.health < top) or (not health.up and health.health > 0)
        if pending:
            interval = check.fast_interval or check.interval
        elif not health.up:
            interval = check.down_interval or check.interval
        else:
            interval = check.interval
        return interval + (random.uniform(0, check.jitter) if check.jitter else 0.0)

    def checks_queued(self) -> list[tuple[float, int]]:
        """The backends that want checks, earliest due first (a heap)."""
        if self.check_queue is None:
            self.check_queue = [
                (backend.next_check, backend.id)
                for backend in self.backends.values()
                if self.wants_check(backend)
            ]
            heapq.heapify(self.check_queue)
        return self.check_queue

    def run_checks(self, now: float) -> None:
        """Starts the checks that are due; touches only those."""
        queue = self.checks_queued()
        busy = []
        while queue and queue[0][0] <= now:
            due, backend_id = heapq.heappop(queue)
            backend = self.backends.get(backend_id)
            if backend is None or backend.next_check != due or not self.wants_check(backend):
                continue  # removed, rescheduled, or no longer checked
            if self.checker.busy(backend_id):
                backend.next_check = now + BUSY_RETRY
                busy.append((backend.next_check, backend_id))
                continue
            pool = self.pool_spec(backend)
            backend.next_check = now + self.check_interval(backend)
            heapq.heappush(queue, (backend.next_check, backend_id))
            self.checker.check(
                backend.id,
                backend.spec.address,
                pool.check,
                pool.send_proxy,
                udp=pool.protocol == "udp",
            )
        for entry in busy:
            heapq.heappush(queue, entry)

    def on_check(self, backend_id: int, result: CheckResult) -> None:
        backend = self.backends.get(backend_id)
        if backend is None:
            return
        now = time.monotonic()
        backend.history.checked(time.time(), result.ok, result.reason, result.duration)
        self.apply_agent(backend, result)
        if not backend.up and not backend.damping.may_rise(now):
            return  # flap damping: held down whatever the checks say
        transition = backend.health.observe(result.ok)
        if transition == "down":
            check = self.pool_spec(backend).check
            self.mark_down(backend, f"{check.fall} checks failed in a row ({result.reason})")
        elif transition == "up":
            self.mark_up(backend, f"{self.pool_spec(backend).check.rise} checks passed in a row")

    def apply_agent(self, backend: BackendState, result: CheckResult) -> None:
        """What an agent check said beyond up or down: drain, maint, ready, a weight."""
        admin = backend.admin
        if result.agent_state in ("drain", "maint"):
            admin = result.agent_state
        elif result.agent_state in ("up", "ready"):
            admin = None
        if admin != backend.admin:
            backend.admin = admin
            self.entries_changed([backend])
            self.record(backend, f"agent: {result.reason}")
            log.info(
                "backend %s is %s: its agent said so (pool %s)",
                backend.spec.address,
                backend.state,
                self.pool_spec(backend).name,
            )
        if result.agent_weight is not None and result.agent_weight != backend.agent_weight:
            backend.agent_weight = result.agent_weight
            self.entries_changed([backend])

    def record(self, backend: BackendState, why: str) -> None:
        if backend.history.transition(time.time(), backend.state, why):
            backend.transitions += 1

    def mark_down(self, backend: BackendState, why: str) -> None:
        pool = self.pool_spec(backend)
        now = time.monotonic()
        backend.health = HealthState(pool.check.rise, pool.check.fall, up=False)
        backend.failures.reset()
        backend.ramp_from = None
        hold = backend.damping.on_fall(now)
        backend.next_check = now + self.check_interval(backend)
        if self.check_queue is not None:
            heapq.heappush(self.check_queue, (backend.next_check, backend.id))
        self.entries_changed([backend])
        if hold:
            why += f"; held down {hold:g}s for flapping"
        self.record(backend, why)
        self.journal_health(backend)
        log.warning("backend %s is down: %s (pool %s)", backend.spec.address, why, pool.name)

    def mark_up(self, backend: BackendState, why: str) -> None:
        pool = self.pool_spec(backend)
        now = time.monotonic()
        backend.failures.reset()
        backend.damping.on_rise(now)
        if pool.slow_start:
            backend.ramp_from = now
            self.next_ramp = now  # the first lowered weight goes out with this table
        self.entries_changed([backend])
        self.record(backend, why)
        self.journal_health(backend)
        log.info("backend %s is up: %s (pool %s)", backend.spec.address, why, pool.name)

    # ---- runtime control (fastlb ctl) and the state file ---------------------------------------

    def control_request(self, request: object) -> dict:
        """The reply to one request on the control socket; CommandError: a refused one."""
        command = commands.parse(request)
        if command.verb == "show":
            return {"ok": True, "data": self.show(command.pool)}
        if command.verb == "reload":
            error = self.reload()
            if error:
                raise commands.CommandError(f"reload refused, the running settings stay: {error}")
            return self.control_reply("reloaded")
        if self.draining:
            raise commands.CommandError("fastlb is stopping")
        present = {
            pool.spec.name: {backend.spec.address: backend.spec for backend in pool.backends}
            for pool in self.pools
        }
        if command.verb == "kill-sessions":
            backend = self.find_backend(command.pool, command.address)
            count = self.active_totals()[backend.id]
            self.kill_sessions(backend)
            where = f"{command.pool}/{command.address}"
            log.info("ctl: resetting the %d connections of %s", count, where)
            return self.control_reply(f"{where}: resetting its {count} open connections")
        message = self.runtime.apply(command, present)
        log.info("ctl: %s", message)
        self.state_changed = True
        pool = next(pool for pool in self.pools if pool.spec.name == command.pool)
        specs = self.runtime_specs(pool)
        if specs != tuple(backend.spec for backend in pool.backends):
            self.replace_backends(pool, specs, why=f"ctl {command.verb}")
        self.sync_runtime()
        return self.control_reply(message)

    def control_reply(self, message: str) -> dict:
        return {"ok": True, "message": message, "warnings": self.warn_unusable_pools()}

    def find_backend(self, pool_name: str, address: Address) -> BackendState:
        for pool in self.pools:
            if pool.spec.name == pool_name:
                for backend in pool.backends:
                    if backend.spec.address == address:
                        return backend
                raise commands.CommandError(f"no backend {address} in pool {pool_name}")
        names = ", ".join(pool.spec.name for pool in self.pools)
        raise commands.CommandError(f"no pool {pool_name!r} (pools: {names})")

    def kill_sessions(self, backend: BackendState) -> None:
        """Every worker resets its connections to the backend now, as on-down close does."""
        for worker in self.workers.values():
            self.send(worker, msg.KillSessions(backends=[backend.id]))

    def runtime_specs(self, pool: PoolState) -> tuple[BackendSpec, ...]:
        """A pool's backends: the config's as last read, with the operator's changes."""
        try:
            listed = self.latest_config.pool(pool.spec.name)
        except KeyError:  # a pool a reload dropped keeps running as it was
            listed = replace(
                pool.spec, backends=tuple(b.spec for b in pool.backends if not b.added)
            )
        return self.runtime.specs(listed)

    def sync_runtime(self) -> None:
        """Gives every backend the operator's state held in ``self.runtime``."""
        now = time.monotonic()
        # Not found anew each turn: the loop turns once per report, and there may be 1,000s.
        self.removing = []
        for pool in self.pools:
            for backend in pool.backends:
                override = self.runtime.get(pool.spec.name, backend.spec.address)
                removing = override.removed == "pending"
                before = (backend.operator, backend.runtime_weight, backend.removing_since)
                if override.admin == "disable" and backend.operator != "disable":
                    self.checker.cancel(backend.id)
                backend.operator = override.admin
                backend.runtime_weight = override.weight
                backend.added = override.added is not None
                if not removing:
                    backend.removing_since = None
                elif backend.removing_since is None:
                    backend.removing_since = now  # its drain goes out with this turn's table
                if backend.removing_since is not None:
                    self.removing.append(backend)
                if before != (backend.operator, backend.runtime_weight, backend.removing_since):
                    self.entries_changed([backend])

    def finish_removals(self, now: float) -> None:
        """Forgets the removed backends that no worker holds a connection to any more."""
        due = [b for b in self.removing if now - b.removing_since >= REMOVE_SETTLE]
        if not due:
            return
        totals = self.active_totals()
        done = [backend for backend in due if totals[backend.id] == 0]
        for backend in done:
            name = self.pool_by_id[backend.pool].spec.name
            self.runtime.removal_done(name, backend.spec.address)
            log.info("backend %s removed from pool %s", backend.spec.address, name)
        for pool_id in sorted({backend.pool for backend in done}):
            pool = self.pool_by_id[pool_id]
            self.replace_backends(pool, self.runtime_specs(pool), why="ctl remove")
        if done:
            self.state_changed = True
            self.sync_runtime()

    def warn_unusable_pools(self) -> list[str]:
        """Logs, and returns, a line for each pool that no backend can take a connection in."""
        problems = list(commands.unusable_pools(self.pool_weights()).values())
        for problem in problems:
            log.warning("%s", problem)
        return problems

    def pool_weights(self) -> list[tuple[str, list[tuple[int, bool]]]]:
        """Each pool's backends as (weight, left in service by the operator)."""
        return [
            (
                pool.spec.name,
                [
                    (
                        b.spec.weight if b.runtime_weight is None else b.runtime_weight,
                        b.in_service,
                    )
                    for b in pool.backends
                ],
            )
            for pool in self.pools
        ]

    def journal_health(self, backend: BackendState) -> None:
        if self.runtime.set_health(self.pool_spec(backend).name, backend.spec.address, backend.up):
            self.state_changed = True

    def journal(self) -> None:
        """Writes the state file if the runtime state changed (at most once a turn)."""
        if not self.state_changed:
            return
        self.state_changed = False
        if self.config.state_file:
            try:
                save_state(self.config.state_file, self.runtime)
            except OSError as exc:
                log.error(
                    "cannot write the state file %s: %s",
                    self.config.state_file,
                    exc.strerror or exc,
                )

    def show(self, pool_name: str | None) -> dict:
        """What fastlb ctl show prints: frontends, pools and their backends."""
        pools = [pool for pool in self.pools if pool_name in (None, pool.spec.name)]
        if not pools:
            names = ", ".join(pool.spec.name for pool in self.pools)
            raise commands.CommandError(f"no pool {pool_name!r} (pools: {names})")
        now = time.monotonic()
        totals = self.active_totals()
        frontend_active = self.frontend_active()
        unusable = commands.unusable_pools(self.pool_weights())
        return {
            "frontends": [
                {
                    "name": frontend.spec.name,
                    "listen": [str(address) for address in frontend.spec.listen],
                    "pools": frontend.spec.pools(),
                    "active": frontend_active[frontend.spec.name],
                    "connections": frontend.connections,
                }
                for frontend in self.frontends
                if pool_name is None or pool_name in frontend.spec.pools()
            ],
            "pools": [
                {
                    "name": pool.spec.name,
                    "algorithm": pool.spec.algorithm,
                    "usable": pool.spec.name not in unusable,
                    "backends": [self.show_backend(b, totals, now) for b in pool.backends],
                }
                for pool in pools
            ],
        }

    def show_backend(self, backend: BackendState, totals: dict[int, int], now: float) -> dict:
        if backend.removing_since is not None:
            state = "removing"
        elif backend.operator:
            state = "disabled" if backend.operator == "disable" else "draining"
        else:
            state = backend.state  # up, down, or what its agent said (drain, maint)
        scale = self.weight_scale(self.pool_spec(backend))
        return {
            "address": str(backend.spec.address),
            "state": state,
            "health": "up" if backend.up else "down",
            "admin": backend.operator,
            "agent": backend.admin,
            "added": backend.added,
            "backup": backend.spec.backup,
            "weight": backend.spec.weight,
            "runtime_weight": backend.runtime_weight,
            "effective_weight": round(self.effective_weight(backend, now) / scale, 2),
            "active": totals[backend.id],
            "connections": backend.connections,
            "failed": backend.failed,
        }

    # ---- stats ----------------------------------------------------------------------------------

    def frontend_active(self) -> dict[str, int]:
        """Open connections (UDP: flows) by frontend name, every generation's workers together."""
        active = dict.fromkeys((frontend.spec.name for frontend in self.frontends), 0)
        for worker in self.workers.values():
            for name, count in worker.frontend_active.items():
                if name in active:
                    active[name] += count
        return active

    def snapshot(self) -> dict:
        now = time.monotonic()
        totals = self.active_totals()
        frontend_active = self.frontend_active()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "workers": [
                {
                    "id": worker.worker_id,
                    "pid": worker.pid,
                    "ready": worker.ready,
                    "generation": worker.generation.number,
                    "draining": worker.generation.state == DRAINING,
                    "coalesced_waits": worker.coalesced_waits,
                    **process_usage(worker.pid),
                }
                for worker in sorted(self.workers.values(), key=lambda w: w.worker_id)
            ],
            "generation": self.generation.number,
            "generation_active": self.generation.state == ACTIVE,
            "worker_restarts": self.worker_restarts,
            "reloads": dict(self.reloads),
            "table_version": self.table_version,
            "access_log_dropped": self.access_log_dropped,
            # How soon count changes reached the other workers (count-driven pools only).
            "count_staleness_ms": {
                "bounds": list(msg.STALENESS_BOUNDS_MS),
                "counts": list(self.count_staleness),
            },
            "frontends": [
                {
                    "name": frontend.spec.name,
                    "listen": [str(address) for address in frontend.spec.listen],
                    "pool": frontend.spec.pool,
                    "sni": {route.pattern: route.pool for route in frontend.spec.sni},
                    "accept_proxy": [str(net) for net in frontend.spec.accept_proxy],
                    "protocol": frontend.spec.protocol,
                    "active": frontend_active[frontend.spec.name],
                    "connections": frontend.connections,
                    "rejected": frontend.rejected,
                    "gave_up": frontend.gave_up,
                    "ended": {
                        reason: count
                        for reason, count in zip(END_REASONS, frontend.ended, strict=True)
                        if count and reason != "open"
                    },
                    **({"udp": frontend.udp_stats()} if frontend.spec.protocol == "udp" else {}),
                }
                for frontend in self.frontends
            ],
            "pools": [
                {
                    "name": pool.spec.name,
                    "algorithm": pool.spec.algorithm,
                    "send_proxy": pool.spec.send_proxy,
                    "check": pool.spec.check.type if pool.spec.check.active else None,
                    "panic": self.in_panic(pool),
                    "backends": [backend.id for backend in pool.backends],
                }
                for pool in self.pools
            ],
            "backends": [
                {
                    "id": backend.id,
                    "pool": pool.spec.name,
                    "address": str(backend.spec.address),
                    "weight": backend.spec.weight,
                    "effective_weight": round(
                        self.effective_weight(backend, now) / self.weight_scale(pool.spec), 2
                    ),
                    "backup": backend.spec.backup,
                    "up": backend.up,
                    "history": backend.history.as_dict(),
                    "transitions": backend.transitions,
                    "connect_ms": {"counts": backend.connect_ms, "sum": backend.connect_ms_sum},
                    "duration_ms": {"counts": backend.duration_ms, "sum": backend.duration_ms_sum},
                    "active": totals[backend.id],
                    "connections": backend.connections,
                    "failed": backend.failed,
                    "up_bytes": backend.up_bytes,
                    "down_bytes": backend.down_bytes,
                }
                for pool in self.pools
                for backend in pool.backends
            ],
        }


def _add(totals: list[int], deltas: list[int]) -> None:
    # In C (map): a report of 1,000 backends adds two histograms per backend. Extra buckets
    # are dropped; missing ones (trailing empties left out) add nothing.
    totals[: min(len(totals), len(deltas))] = map(operator.add, totals, deltas)


def process_usage(pid: int) -> dict:
    """CPU seconds (user + system), resident memory, open descriptors of a process, and the
    CPUs it may run on (one, under --cpu-affinity)."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            times = process.cpu_times()
            return {
                "cpu_seconds": times.user + times.system,
                "rss_bytes": process.memory_info().rss,
                "open_fds": process.num_fds(),
                "cpus": process.cpu_affinity(),
            }
    except (psutil.Error, OSError):
        return {"cpu_seconds": None, "rss_bytes": None, "open_fds": None, "cpus": None}


def _addresses(config: Config) -> str:
    return ", ".join(str(address) for frontend in config.frontends for address in frontend.listen)


def _holds_socket(pid: int, inodes: set[int]) -> bool:
    """Whether process ``pid`` has a descriptor open on one of these socket inodes."""
    names = {f"socket:[{inode}]" for inode in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in names:
                return True
        except OSError:
            continue
    return False


def _how_it_ended(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
