"""Messages between the supervisor and its workers, and their framing.

Each worker has two ``AF_UNIX`` ``SOCK_STREAM`` socketpairs to the supervisor: the control
socket, both ways, and the counts socket, on which the supervisor sends ``counts`` alone. Counts
go out every millisecond and the worker's loop reads them itself, between two slices of traffic;
the rest (tables take ms to decode) is read on a thread. A message is one msgpack map written
back to back with the next; msgpack values are self-delimiting, so there is no length prefix and
a reader feeds whatever bytes arrived into a :class:`Decoder`.

Every map carries ``"t"``, its type. Backends, pools and frontends are named by the ids the
supervisor gives them (stable across reloads), never by their place in a list; per-backend and
per-frontend entries are maps with named fields, or for a report's backends named columns.

worker -> supervisor
  ``hello``   ``{t, v, worker, pid}``: first message; ``v`` is :data:`PROTOCOL_VERSION`.
  ``report``  ``{t, table, backends, frontends, ...}``, the fields that are empty left out:
              what changed since the previous report, sent
              every second while anything did, and at once (within 1 ms) for a connect that
              failed or, when other workers pick by the counts, an active count that changed:
              those carry only such backends and no frontends, and ``counts``: ``{backend id:
              active}`` for the backends whose only change is their count (a map: a report
              every millisecond costs little per backend). ``table`` is the version the worker
              holds.
              ``backends``: ``{id, active, new, up_bytes, down_bytes, failed, succeeded,
              streak, connect_ms, connect_ms_sum, duration_ms, duration_ms_sum}``, a column
              (a list, all equally long) per field and a row for each backend whose counters
              moved (:class:`BackendStats`): ``active`` is this worker's open
              connections to it (absolute); ``new``, ``up_bytes`` (client -> backend),
              ``down_bytes``, ``failed`` and ``succeeded`` (connect attempts) are deltas;
              ``streak`` is the run of consecutive connect failures this worker has seen on it,
              0 after a success; ``connect_ms`` and ``duration_ms`` are histograms (counts by
              bucket, the data plane's fixed bounds; trailing empty buckets may be left out) of
              the connects that completed and of the
              connections that ended, with their sums in ms. ``frontends``: ``[{id, active,
              accepted, ended}]`` likewise; ``ended`` counts the connections that ended by why,
              indexed by the data plane's END_* codes (``fastlb.accesslog.END_REASONS``).
              ``log_dropped``: access log records lost since the previous report (the writer
              fell behind). ``udp``: ``[{id, flows, created, evicted, datagrams_in, bytes_in,
              datagrams_out, bytes_out, dropped}]`` for each UDP frontend whose counters moved:
              ``flows`` is this worker's active flows (absolute), the others are deltas;
              ``in`` is client -> backend; ``dropped`` counts datagrams not forwarded, indexed
              by :data:`UDP_DROP_REASONS`.
              fell behind). ``counts_since_us``: when the oldest count change this report
              carries happened (CLOCK_MONOTONIC µs; 0: none). ``count_staleness``: counts
              received since the previous such report, by how long after that change they were
              applied (a histogram over :data:`STALENESS_BOUNDS_MS`). ``coalesced``: the
              times the worker's loop slept ``--coalesce-us`` on a timer instead of blocking,
              since the previous report that carried stats.

supervisor -> worker
  ``table``   ``{t, version, pools}``: whole backend tables, each swapped in at once.
              ``pools`` is ``[{id, backends: [{id, host, port, weight, up, backup}]}]``.
  ``table-change`` ``{t, version, base, pools}``: the table ``version`` as a change to the
              table ``base``, the last one sent to this worker (a health flap then costs one
              entry, not the whole table). ``pools`` is ``[{id, backends, removed}]`` for the
              pools that changed: ``backends`` the entries that are new or differ, ``removed``
              the ids gone. Applied, an entry that stays keeps its place and new ones go last
              (:func:`apply_change`); the supervisor sends a whole table where that would not
              give the new table's order.
  ``counts``  ``{t, table, workers, gone}``, on the counts socket: what the *other* workers
              reported of their
              active counts, passed on as they came: ``workers`` is ``{worker pid: {backend
              id: active}}``, for the backends whose count changed since the last counts sent
              to this worker (a backend left out keeps its count); ``gone`` the pids of
              workers that exited, whose counts no longer hold. A worker's picks use the sum
              over the others (``_dataplane.PeerCounts``): the supervisor does not add them up.
              A count may come before the table that holds its backend: the worker keeps
              the sums and sets them when that table comes. ``counts_since_us``: the
              oldest ``counts_since_us`` of the reports behind them (0: unknown).
  ``drain``   ``{t}``: stop accepting, finish open connections, then exit.
  ``kill-sessions`` ``{t, backends}``: reset every open connection to these backend ids now
              (``fastlb ctl kill-sessions``), as on-down close does for a backend marked down.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import MISSING, dataclass, field, fields

import msgpack

# 3: table-change; 4: counts by worker; 5: backends in columns; 6: a report's empty fields left
# out, counts on a socket of their own
PROTOCOL_VERSION = 6

# The upper bounds (ms) of the data plane's histogram buckets, the last bucket being +Inf: how
# long a connect took, and how long a connection lasted. ext/_dataplane.pyx holds the same.
CONNECT_BOUNDS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# How long after a count changed in one worker the others applied it (ms; then +Inf).
STALENESS_BOUNDS_MS = (0.25, 0.5, 1, 2, 5, 10, 25, 50, 100)
DURATION_BOUNDS_MS = (10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 1800000, 3600000)


@dataclass(frozen=True, slots=True)
class Hello:
    worker: int
    pid: int
    v: int = PROTOCOL_VERSION


@dataclass(slots=True)
class BackendStats:
    """A report's per-backend counters, a column per field: row i of every column is one
    backend's. Columns, as a report lists every backend once a second: 1,000 maps with a dozen
    named fields each cost several µs apiece to write, read and check; lists of numbers cost
    tens of ns a number (msgpack and the checks run in C)."""

    id: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    new: list[int] = field(default_factory=list)
    up_bytes: list[int] = field(default_factory=list)
    down_bytes: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    succeeded: list[int] = field(default_factory=list)
    streak: list[int] = field(default_factory=list)
    connect_ms: list[list[int]] = field(default_factory=list)  # histogram counts by bucket
    connect_ms_sum: list[int] = field(default_factory=list)
    duration_ms: list[list[int]] = field(default_factory=list)
    duration_ms_sum: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, rows) -> BackendStats:
        """From rows in field order, as the data plane's report gives them."""
        columns = [list(column) for column in zip(*rows, strict=True)]
        return cls(*columns) if columns else cls()

    def rows(self):
        """The rows, each a tuple in field order."""
        if not self.id:
            return ()  # most reports: counts alone
        return zip(*_SHAPES[BackendStats].values(self), strict=True)

    def __len__(self) -> int:
        return len(self.id)


@dataclass(frozen=True, slots=True)
class FrontendReport:
    id: int
    active: int
    accepted: int = 0
    ended: list[int] = field(default_factory=list)  # connections ended, by reason code


# Why a UDP datagram was not forwarded, in the data plane's UDP_DROP_* order.
UDP_DROP_REASONS = ("no-backend", "error", "backend-send", "client-send", "refused")


@dataclass(frozen=True, slots=True)
class UdpReport:
    id: int  # the frontend's
    flows: int
    created: int = 0
    evicted: int = 0
    datagrams_in: int = 0
    bytes_in: int = 0
    datagrams_out: int = 0
    bytes_out: int = 0
    dropped: list[int] = field(default_factory=list)  # by UDP_DROP_REASONS


@dataclass(frozen=True, slots=True)
class Report:
    table: int
    backends: BackendStats = field(default_factory=BackendStats)
    frontends: list[FrontendReport] = field(default_factory=list)
    log_dropped: int = 0
    udp: list[UdpReport] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    counts_since_us: int = 0
    count_staleness: list[int] = field(default_factory=list)
    coalesced: int = 0


@dataclass(frozen=True, slots=True)
class BackendEntry:
    id: int
    host: str
    port: int
    weight: int
    up: bool
    backup: bool


@dataclass(frozen=True, slots=True)
class PoolTable:
    id: int
    backends: list[BackendEntry]


@dataclass(frozen=True, slots=True)
class Table:
    version: int
    pools: list[PoolTable]


@dataclass(frozen=True, slots=True)
class PoolChange:
    id: int
    backends: list[BackendEntry]  # new or changed entries
    removed: list[int] = field(default_factory=list)  # ids no longer in the pool


@dataclass(frozen=True, slots=True)
class TableChange:
    version: int
    base: int  # the version it applies to
    pools: list[PoolChange]


@dataclass(frozen=True, slots=True)
class Counts:
    table: int
    workers: dict[int, dict[int, int]]  # worker pid -> {backend id: its active connections}
    gone: list[int] = field(default_factory=list)  # pids of workers that exited
    counts_since_us: int = 0


@dataclass(frozen=True, slots=True)
class Drain:
    pass


@dataclass(frozen=True, slots=True)
class KillSessions:
    backends: list[int]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Stands in for a message that could not be decoded; the reader logs it and goes on."""

    reason: str


Message = Hello | Report | Table | TableChange | Counts | Drain | KillSessions

_TYPES: dict[str, type] = {
    "hello": Hello,
    "report": Report,
    "table": Table,
    "table-change": TableChange,
    "counts": Counts,
    "drain": Drain,
    "kill-sessions": KillSessions,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}
# Fields that hold lists of nested entries, and the entry type of each.
_NESTED: dict[tuple[type, str], type] = {
    (Report, "frontends"): FrontendReport,
    (Report, "udp"): UdpReport,
    (Table, "pools"): PoolTable,
    (PoolTable, "backends"): BackendEntry,
    (TableChange, "pools"): PoolChange,
    (PoolChange, "backends"): BackendEntry,
}
# The type each scalar field must have; bools are ints to Python, so they are checked apart.
_BOOL_FIELDS = {"up", "backup"}
_STR_FIELDS = {"host"}
# (PoolTable.backends and the like are nested entries: _NESTED is looked up first.)
_INT_LIST_FIELDS = {
    "connect_ms",
    "duration_ms",
    "ended",
    "dropped",
    "backends",
    "count_staleness",
    "removed",
    "gone",
}
_COUNT_MAP_FIELDS = {"counts"}
_WORKER_COUNTS_FIELDS = {"workers"}
# Fields that hold columns (a map of equally long lists), and the type of each.
_COLUMNS: dict[tuple[type, str], type] = {(Report, "backends"): BackendStats}
_HISTOGRAM_COLUMNS = {"connect_ms", "duration_ms"}  # a list of counts by bucket per row


# Types that leave out the fields at their defaults, and a reader fills them in: a report lists
# many frontend entries, and most reports (the counts every millisecond) have no backends'
# stats, frontends or UDP. (Fields without a default, like id and active, always go.)
_SPARSE = {FrontendReport, Report}
_REQUIRED = object()  # stands for "no default" among a shape's defaults


class _Shape:
    """How one message or entry type is written and read, worked out once per type: a report
    carries an entry per backend every second, so per field costs count."""

    __slots__ = ("names", "values", "defaults", "nested", "columns", "kinds", "required")

    def __init__(self, cls: type):
        specs = fields(cls)
        self.names = tuple(spec.name for spec in specs)
        getter = operator.attrgetter(*self.names) if self.names else None
        # attrgetter of one name gives the value itself, of several a tuple.
        self.values = getter if len(self.names) > 1 else lambda value: (getter(value),)
        self.defaults = (
            tuple(
                spec.default
                if spec.default is not MISSING
                else spec.default_factory()
                if spec.default_factory is not MISSING
                else _REQUIRED
                for spec in specs
            )
            if cls in _SPARSE
            else None
        )
        self.nested = tuple(
            (spec.name, _NESTED[cls, spec.name]) for spec in specs if (cls, spec.name) in _NESTED
        )
        self.columns = tuple(spec.name for spec in specs if (cls, spec.name) in _COLUMNS)
        self.kinds = {spec.name: _kind(cls, spec.name) for spec in specs}
        self.required = tuple(
            spec.name
            for spec in specs
            if spec.default is MISSING and spec.default_factory is MISSING
        )


_INT, _INT_LIST, _COUNT_MAP, _WORKER_COUNTS, _NESTED_LIST, _BOOL, _STR, _COLUMN_MAP = range(8)


def _kind(cls: type, name: str) -> int:
    if (cls, name) in _NESTED:
        return _NESTED_LIST
    if (cls, name) in _COLUMNS:
        return _COLUMN_MAP
    if name in _BOOL_FIELDS:
        return _BOOL
    if name in _STR_FIELDS:
        return _STR
    if name in _INT_LIST_FIELDS:
        return _INT_LIST
    if name in _COUNT_MAP_FIELDS:
        return _COUNT_MAP
    if name in _WORKER_COUNTS_FIELDS:
        return _WORKER_COUNTS
    return _INT


_SHAPES = {
    cls: _Shape(cls) for cls in (*_TYPES.values(), *set(_NESTED.values()), *set(_COLUMNS.values()))
}


def table_change(old: Table, new: Table) -> TableChange | None:
    """new as a change to old, or None where a whole table is as good: the pools differ, the
    change would not give new's order, or it touches more than half of the entries."""
    if [pool.id for pool in old.pools] != [pool.id for pool in new.pools]:
        return None
    pools = []
    touched = total = 0
    for before, after in zip(old.pools, new.pools, strict=True):
        total += len(after.backends)
        if before.backends == after.backends:
            continue
        if len(before.backends) == len(after.backends):
            # The usual change (health, weights): the same ids in the same places.
            pairs = [
                (a, b)
                for a, b in zip(before.backends, after.backends, strict=True)
                if a is not b and a != b
            ]
            if all(a.id == b.id for a, b in pairs):
                touched += len(pairs)
                pools.append(PoolChange(after.id, [b for _, b in pairs], []))
                continue
        kept = {entry.id: entry for entry in before.backends}
        ids = {entry.id for entry in after.backends}
        changed = [entry for entry in after.backends if kept.get(entry.id) != entry]
        removed = [backend_id for backend_id in kept if backend_id not in ids]
        order = [backend_id for backend_id in kept if backend_id in ids]
        order += [entry.id for entry in changed if entry.id not in kept]
        if order != [entry.id for entry in after.backends]:
            return None
        touched += len(changed) + len(removed)
        pools.append(PoolChange(after.id, changed, removed))
    if touched * 2 > total:
        return None
    return TableChange(new.version, old.version, pools)


def apply_change(table: Table, change: TableChange) -> Table:
    """The table that change makes of table (whose version must be change.base). Raises
    ValueError for a change to a pool table does not have."""
    pools = {pool.id: pool for pool in table.pools}
    for pool_change in change.pools:
        pool = pools.get(pool_change.id)
        if pool is None:
            raise ValueError(f"a change to pool {pool_change.id}, which the table lacks")
        entries = {entry.id: entry for entry in pool.backends}
        for backend_id in pool_change.removed:
            entries.pop(backend_id, None)
        for entry in pool_change.backends:
            entries[entry.id] = entry
        pools[pool.id] = PoolTable(pool.id, list(entries.values()))
    return Table(change.version, [pools[pool.id] for pool in table.pools])


def _plain(value: object) -> dict:
    """value (a message or entry) as the map that goes on the wire."""
    shape = _SHAPES[type(value)]
    values = shape.values(value) if shape.names else ()
    if shape.defaults is None:
        body = dict(zip(shape.names, values, strict=True))
    else:
        body = {
            name: item
            for name, item, default in zip(shape.names, values, shape.defaults, strict=True)
            if item != default
        }
    for name, _ in shape.nested:
        if name in body:
            body[name] = [_plain(item) for item in body[name]]
    for name in shape.columns:
        if name in body:
            body[name] = _plain(body[name])
    return body


def encode(message: Message) -> bytes:
    """One message as msgpack bytes, ready to write to the socketpair."""
    body = {"t": _NAMES[type(message)]}
    body.update(_plain(message))
    return msgpack.packb(body, use_bin_type=True)


class _Bad(Exception):
    pass


def _fill(cls: type, body: object, where: str) -> object:
    """An instance of cls from a decoded map, checking every field's shape (fields it does not
    know are passed over)."""
    if type(body) is not dict:
        raise _Bad(f"{where}: not a map")
    shape = _SHAPES[cls]
    kinds = shape.kinds
    kwargs = {}
    # msgpack decodes whole numbers as exactly int, true and false as bool.
    for name, value in body.items():
        kind = kinds.get(name)
        if kind is None:
            continue  # "t", or a field this end does not know
        if kind == _INT:
            if type(value) is not int:
                raise _Bad(f"{where}: {name} must be a whole number")
        elif kind == _INT_LIST:
            if type(value) is not list or not _INT_TYPES.issuperset(map(type, value)):
                raise _Bad(f"{where}: {name} must be a list of whole numbers")
        elif kind == _NESTED_LIST:
            if type(value) is not list:
                raise _Bad(f"{where}: {name} must be a list")
            nested, inner = _NESTED[cls, name], f"{where}.{name}"
            value = [_fill(nested, item, inner) for item in value]
        elif kind == _COLUMN_MAP:
            value = _fill_columns(_COLUMNS[cls, name], value, f"{where}.{name}")
        elif kind == _BOOL:
            if type(value) is not bool:
                raise _Bad(f"{where}: {name} must be true or false")
        elif kind == _STR:
            if type(value) is not str:
                raise _Bad(f"{where}: {name} must be a string")
        elif kind == _COUNT_MAP:
            if not _is_count_map(value):
                raise _Bad(f"{where}: {name} must map backend ids to counts")
        elif type(value) is not dict or not all(
            type(pid) is int and _is_count_map(counts) for pid, counts in value.items()
        ):
            raise _Bad(f"{where}: {name} must map worker pids to maps of backend ids to counts")
        kwargs[name] = value
    for name in shape.required:
        if name not in kwargs:
            raise _Bad(f"{where}: missing field {name!r}")
    return cls(**kwargs)


def _fill_columns(cls: type, body: object, where: str) -> object:
    """An instance of a columns type from a decoded map: every column present, a list of whole
    numbers (or of lists of them), all as long as each other. Each check runs in C."""
    if type(body) is not dict:
        raise _Bad(f"{where}: not a map")
    columns = []
    rows = None
    for name in _SHAPES[cls].names:
        column = body.get(name)
        if type(column) is not list:
            raise _Bad(
                f"{where}: {name} must be a list" if name in body else f"{where}: missing {name!r}"
            )
        if name in _HISTOGRAM_COLUMNS:
            if not _LIST_TYPES.issuperset(map(type, column)) or not _INT_TYPES.issuperset(
                map(type, itertools.chain.from_iterable(column))
            ):
                raise _Bad(f"{where}: {name} must be a list of lists of whole numbers")
        elif not _INT_TYPES.issuperset(map(type, column)):
            raise _Bad(f"{where}: {name} must be a list of whole numbers")
        if rows is None:
            rows = len(column)
        elif len(column) != rows:
            raise _Bad(f"{where}: {name} has {len(column)} rows where id has {rows}")
        columns.append(column)
    return cls(*columns)


def _is_count_map(value: object) -> bool:
    # Sets of the types, built in C: a count map carries an entry per changed backend.
    return (
        type(value) is dict
        and _INT_TYPES.issuperset(map(type, value))
        and _INT_TYPES.issuperset(map(type, value.values()))
    )


_INT_TYPES = frozenset({int})
_LIST_TYPES = frozenset({list})


def _build(body: object) -> Message | Invalid:
    if not isinstance(body, dict):
        return Invalid(f"not a map: {type(body).__name__}")
    kind = body.get("t")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return Invalid(f"unknown message type {kind!r}")
    try:
        return _fill(cls, body, kind)
    except (_Bad, TypeError, ValueError) as exc:
        return Invalid(str(exc))


def receive(sock) -> bytes | None:
    """What a non-blocking socket of the stream holds: None when nothing yet, b"" at its end
    (the other side closed it, or it failed)."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def send_pending(sock, pending: bytearray) -> bool:
    """Writes what a non-blocking socket of the stream takes of ``pending`` and removes it
    from there; False when the socket failed (``pending`` then left as it was)."""
    try:
        sent = sock.send(pending)
    except BlockingIOError:
        return True
    except OSError:
        return False
    del pending[:sent]
    return True


class Decoder:
    """Turns a byte stream into messages; tolerant of any split of the stream."""

    def __init__(self, max_buffer_size: int = 16 * 1024 * 1024):
        self._max_buffer_size = max_buffer_size
        self._unpacker = self._new_unpacker()

    def _new_unpacker(self) -> msgpack.Unpacker:
        # Integer map keys (backend ids in counts) need strict_map_key off.
        return msgpack.Unpacker(
            raw=False, max_buffer_size=self._max_buffer_size, strict_map_key=False
        )

    def feed(self, data: bytes) -> list[Message | Invalid]:
        self._unpacker.feed(data)
        out: list[Message | Invalid] = []
        while True:
            try:
                body = next(self._unpacker)
            except StopIteration:
                return out
            except (
                msgpack.ExtraData,
                msgpack.FormatError,
                msgpack.StackError,
                ValueError,
                TypeError,  # a map key that cannot be one (a map used as a key)
            ) as exc:
                # The stream cannot be resynchronised after a framing error: start afresh.
                self._unpacker = self._new_unpacker()
                out.append(Invalid(f"undecodable bytes: {exc}"))
                return out
            out.append(_build(body))
