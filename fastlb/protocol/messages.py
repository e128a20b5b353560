"""Messages between the supervisor and its workers, and their framing.

Each worker has one ``AF_UNIX`` ``SOCK_STREAM`` socketpair to the supervisor. A message is one
msgpack map written back to back with the next; msgpack values are self-delimiting, so there is no
length prefix and a reader feeds whatever bytes arrived into a :class:`Decoder`.

Every map carries ``"t"``, its type. Lists indexed by backend follow the order of the table the
supervisor sent (``Table.backends``); a report names the table version it counts against, and a
reader drops reports and counts for a version it does not hold.

worker -> supervisor
  ``hello``   ``{t, v, worker, pid}``: first message; ``v`` is :data:`PROTOCOL_VERSION`.
  ``report``  ``{t, table, active, new, up_bytes, down_bytes, failed, succeeded, streak}``:
              ``active`` is this worker's live connections per backend (absolute); ``new``,
              ``up_bytes`` (client -> backend), ``down_bytes``, ``failed`` and ``succeeded``
              (connect attempts) are deltas since the previous report; ``streak`` is the run of
              consecutive connect failures this worker has seen on each backend, 0 after a success.
              Sent at least every 50 ms while anything changed.

supervisor -> worker
  ``table``   ``{t, version, backends}``: the whole backend table, swapped in at once.
              ``backends`` is a list of ``[host, port, weight, up, backup]``.
  ``counts``  ``{t, table, others}``: active connections per backend held by all *other* workers.
  ``drain``   ``{t}``: stop accepting, finish open connections, then exit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import msgpack

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Hello:
    worker: int
    pid: int
    v: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Report:
    table: int
    active: list[int]
    new: list[int]
    up_bytes: list[int]
    down_bytes: list[int]
    failed: list[int]
    succeeded: list[int]
    streak: list[int]


@dataclass(frozen=True, slots=True)
class BackendEntry:
    host: str
    port: int
    weight: int
    up: bool
    backup: bool


@dataclass(frozen=True, slots=True)
class Table:
    version: int
    backends: list[BackendEntry]


@dataclass(frozen=True, slots=True)
class Counts:
    table: int
    others: list[int]


@dataclass(frozen=True, slots=True)
class Drain:
    pass


@dataclass(frozen=True, slots=True)
class Invalid:
    """Stands in for a message that could not be decoded; the reader logs it and goes on."""

    reason: str


Message = Hello | Report | Table | Counts | Drain

_TYPES: dict[str, type] = {
    "hello": Hello,
    "report": Report,
    "table": Table,
    "counts": Counts,
    "drain": Drain,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(message: Message) -> bytes:
    """One message as msgpack bytes, ready to write to the socketpair."""
    body = {"t": _NAMES[type(message)]}
    for field in fields(message):
        value = getattr(message, field.name)
        if field.name == "backends":
            value = [[b.host, b.port, b.weight, b.up, b.backup] for b in value]
        body[field.name] = value
    return msgpack.packb(body, use_bin_type=True)


def _build(body: object) -> Message | Invalid:
    if not isinstance(body, dict):
        return Invalid(f"not a map: {type(body).__name__}")
    kind = body.get("t")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return Invalid(f"unknown message type {kind!r}")
    kwargs = {}
    for field in fields(cls):
        if field.name not in body:
            if field.name == "v":
                continue
            return Invalid(f"{kind}: missing field {field.name!r}")
        kwargs[field.name] = body[field.name]
    try:
        if cls is Table:
            kwargs["backends"] = [BackendEntry(*row) for row in kwargs["backends"]]
        message = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        return Invalid(f"{kind}: {exc}")
    return _check(message)


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) for x in value)


def _check(message: Message) -> Message | Invalid:
    """Reject field values of the wrong shape, so that no reader has to."""
    if isinstance(message, Report):
        lists = [getattr(message, f.name) for f in fields(Report) if f.name != "table"]
        if not all(_is_int_list(x) for x in lists) or len({len(x) for x in lists}) != 1:
            return Invalid("report: per-backend fields must be int lists of one length")
    elif isinstance(message, Counts):
        if not _is_int_list(message.others):
            return Invalid("counts: others must be a list of ints")
    elif isinstance(message, Table):
        for b in message.backends:
            if not (
                isinstance(b.host, str) and isinstance(b.port, int) and isinstance(b.weight, int)
            ):
                return Invalid("table: backend rows are [host, port, weight, up, backup]")
    elif isinstance(message, Hello):
        if not (isinstance(message.worker, int) and isinstance(message.pid, int)):
            return Invalid("hello: worker and pid must be ints")
    return message


class Decoder:
    """Turns a byte stream into messages; tolerant of any split of the stream."""

    def __init__(self, max_buffer_size: int = 16 * 1024 * 1024):
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_buffer_size)

    def feed(self, data: bytes) -> list[Message | Invalid]:
        self._unpacker.feed(data)
        out: list[Message | Invalid] = []
        while True:
            try:
                body = next(self._unpacker)
            except StopIteration:
                return out
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                # The stream cannot be resynchronised after a framing error: start afresh.
                self._unpacker = msgpack.Unpacker(raw=False)
                out.append(Invalid(f"undecodable bytes: {exc}"))
                return out
            out.append(_build(body))
