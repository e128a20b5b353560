"""Messages between the supervisor and its workers, and their framing.

Each worker has one ``AF_UNIX`` ``SOCK_STREAM`` socketpair to the supervisor. A message is one
msgpack map written back to back with the next; msgpack values are self-delimiting, so there is no
length prefix and a reader feeds whatever bytes arrived into a :class:`Decoder`.

Every map carries ``"t"``, its type. Backends, pools and frontends are named by the ids the
supervisor gives them (stable across reloads), never by their place in a list; per-backend and
per-frontend entries are maps with named fields.

worker -> supervisor
  ``hello``   ``{t, v, worker, pid}``: first message; ``v`` is :data:`PROTOCOL_VERSION`.
  ``report``  ``{t, table, backends, frontends}``: what changed since the previous report, sent
              every second while anything did, and at once (within 1 ms) for a connect that
              failed or, when other workers pick by the counts, an active count that changed:
              those carry only such backends and no frontends, and ``counts``: ``{backend id:
              active}`` for the backends whose only change is their count (a map: a report
              every millisecond costs little per backend). ``table`` is the version the worker
              holds.
              ``backends``: ``[{id, active, new, up_bytes, down_bytes, failed, succeeded,
              streak}]`` for each backend whose counters moved: ``active`` is this worker's open
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
              applied (a histogram over :data:`STALENESS_BOUNDS_MS`).

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
  ``counts``  ``{t, table, others}``: ``{backend id: active connections}`` held by all *other*
              workers, for the backends whose count changed since the last counts sent to this
              worker; a backend left out keeps its count. ``counts_since_us``: the oldest
              ``counts_since_us`` of the reports behind them (0: unknown).
  ``drain``   ``{t}``: stop accepting, finish open connections, then exit.
  ``kill-sessions`` ``{t, backends}``: reset every open connection to these backend ids now
              (``fastlb ctl kill-sessions``), as on-down close does for a backend marked down.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

import msgpack

PROTOCOL_VERSION = 3  # 3: table-change

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


@dataclass(frozen=True, slots=True)
class BackendReport:
    id: int
    active: int
    new: int = 0
    up_bytes: int = 0
    down_bytes: int = 0
    failed: int = 0
    succeeded: int = 0
    streak: int = 0
    connect_ms: list[int] = field(default_factory=list)  # histogram counts by bucket
    connect_ms_sum: int = 0
    duration_ms: list[int] = field(default_factory=list)
    duration_ms_sum: int = 0


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
    backends: list[BackendReport]
    frontends: list[FrontendReport]
    log_dropped: int = 0
    udp: list[UdpReport] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    counts_since_us: int = 0
    count_staleness: list[int] = field(default_factory=list)


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
    others: dict[int, int]
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
    (Report, "backends"): BackendReport,
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
# (Report.backends, PoolTable.backends are nested entries: _NESTED is looked up first.)
_INT_LIST_FIELDS = {
    "connect_ms",
    "duration_ms",
    "ended",
    "dropped",
    "backends",
    "count_staleness",
    "removed",
}
_COUNT_MAP_FIELDS = {"others", "counts"}


# Entries that leave out the fields at their defaults: a report lists many of them, and a
# reader fills in the defaults. (Fields without a default, like id and active, always go.)
_SPARSE_DEFAULTS = {
    cls: tuple(
        (spec.name, spec.default if spec.default is not MISSING else spec.default_factory())
        for spec in fields(cls)
        if spec.default is not MISSING or spec.default_factory is not MISSING
    )
    for cls in (BackendReport, FrontendReport)
}


# Field names by message and entry type, read once: dataclasses.fields() is slow per call.
_FIELD_NAMES = {
    cls: tuple(spec.name for spec in fields(cls))
    for cls in (*_TYPES.values(), *set(_NESTED.values()))
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


def _plain(value: object) -> object:
    names = _FIELD_NAMES.get(type(value))
    if names is None:
        if type(value) is list and value and type(value[0]) in _FIELD_NAMES:
            return [_plain(item) for item in value]
        return value  # a number, a string, a map of numbers, a list of numbers
    body = {name: _plain(getattr(value, name)) for name in names}
    for name, default in _SPARSE_DEFAULTS.get(type(value), ()):
        if body[name] == default:
            del body[name]
    return body


def encode(message: Message) -> bytes:
    """One message as msgpack bytes, ready to write to the socketpair."""
    body = {"t": _NAMES[type(message)]}
    body.update(_plain(message))
    return msgpack.packb(body, use_bin_type=True)


class _Bad(Exception):
    pass


def _plan(cls: type) -> tuple[tuple[str, bool, str, type | None], ...]:
    """How each field of cls is read: (name, optional, kind, nested entry type)."""
    plan = []
    for spec in fields(cls):
        optional = spec.default is not MISSING or spec.default_factory is not MISSING
        nested = _NESTED.get((cls, spec.name))
        if nested is not None:
            kind = "nested"
        elif spec.name in _BOOL_FIELDS:
            kind = "bool"
        elif spec.name in _STR_FIELDS:
            kind = "str"
        elif spec.name in _INT_LIST_FIELDS:
            kind = "int list"
        elif spec.name in _COUNT_MAP_FIELDS:
            kind = "count map"
        else:
            kind = "int"
        plan.append((spec.name, optional, kind, nested))
    return tuple(plan)


_PLANS: dict[type, tuple] = {}


def _fill(cls: type, body: object, where: str) -> object:
    """An instance of cls from a decoded map, checking every field's shape."""
    if not isinstance(body, dict):
        raise _Bad(f"{where}: not a map")
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _plan(cls)
    kwargs = {}
    for name, optional, kind, nested in plan:
        if name not in body:
            if optional:
                continue
            raise _Bad(f"{where}: missing field {name!r}")
        value = body[name]
        # msgpack decodes whole numbers as exactly int, true and false as bool.
        if kind == "int":
            if type(value) is not int:
                raise _Bad(f"{where}: {name} must be a whole number")
        elif kind == "int list":
            if type(value) is not list or not all(type(x) is int for x in value):
                raise _Bad(f"{where}: {name} must be a list of whole numbers")
        elif kind == "nested":
            if not isinstance(value, list):
                raise _Bad(f"{where}: {name} must be a list")
            inner = f"{where}.{name}"
            value = [_fill(nested, item, inner) for item in value]
        elif kind == "bool":
            if not isinstance(value, bool):
                raise _Bad(f"{where}: {name} must be true or false")
        elif kind == "str":
            if not isinstance(value, str):
                raise _Bad(f"{where}: {name} must be a string")
        elif type(value) is not dict or not all(
            type(k) is int and type(v) is int for k, v in value.items()
        ):
            raise _Bad(f"{where}: {name} must map backend ids to counts")
        kwargs[name] = value
    return cls(**kwargs)


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
