"""The access log: one line per connection when it ends, written by each worker between slices.

The data plane fills fixed-size records in a ring (``Worker.take_log``); this module turns the
records of one slice into lines and writes them with one ``write`` to a file opened with
``O_APPEND``, so that the lines of several workers never interleave. ``-`` is stderr. A text
line is ``key=value`` pairs after an ISO 8601 time (left out under journald, which stamps every
line itself); a JSON line is one object with the same keys.

    2026-12-02T03:04:05.123Z client=192.0.2.7:51234 frontend=web pool=web
    backend=10.0.0.11:8080 connect_ms=1 duration_ms=25 up=517 down=20734 retries=0
    end=client-closed

``end`` is why it ended: ``client-closed`` or ``backend-closed`` (who closed first), a reset on
either side, ``connect-failed`` (every backend tried failed), ``idle-timeout``, ``rejected``
(no valid PROXY header from a trusted sender, or no SNI route), ``backend-down`` (on-down
close), ``first-byte-timeout``, ``error``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime

from fastlb.model import Address

# Indexed by the data plane's END_* codes.
END_REASONS = (
    "open",
    "client-closed",
    "backend-closed",
    "client-reset",
    "backend-reset",
    "connect-failed",
    "idle-timeout",
    "rejected",
    "backend-down",
    "first-byte-timeout",
    "error",
)


def _timestamp(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class AccessLog:
    def __init__(
        self, path: str, form: str, frontends: list[str], pools: dict[int, str], journald: bool
    ):
        self.path = path
        self.json = form == "json"
        self.frontends = frontends  # names by id (their places in the config)
        self.pools = pools  # names by the supervisor's pool id
        self.stamp = not journald or path != "-"
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        """Opens the file anew (after logrotate moved it away); stderr stays as it is."""
        if self.path == "-":
            self.fd = 2
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def lines(self, records: list[tuple], backends: dict[int, str]) -> bytes:
        """The lines of ``Worker.take_log`` records; backends maps ids to addresses."""
        wall_now, mono_now = time.time(), time.monotonic() * 1000
        out = []
        for record in records:
            host, port, start, connected, end, up, down, frontend, pool, backend = record[:10]
            retries, reason = record[10:]
            entry = {
                "client": str(Address(host, port)),
                "frontend": self.frontends[frontend],
                "pool": self.pools.get(pool, "-") if pool is not None else "-",
                "backend": "-" if backend is None else backends.get(backend, str(backend)),
                "connect_ms": connected - start if connected else -1,
                "duration_ms": end - start,
                "up": up,
                "down": down,
                "retries": retries,
                "end": END_REASONS[reason] if reason < len(END_REASONS) else str(reason),
            }
            wall = wall_now - (mono_now - end) / 1000
            if self.json:
                out.append(json.dumps({"time": _timestamp(wall), **entry}))
            else:
                text = " ".join(f"{key}={value}" for key, value in entry.items())
                out.append(f"{_timestamp(wall)} {text}" if self.stamp else text)
        return ("\n".join(out) + "\n").encode() if out else b""

    def write(self, records: list[tuple], backends: dict[int, str]) -> int:
        """Writes the records; returns how many were lost (the write failed)."""
        data = self.lines(records, backends)
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            return len(records)
        return 0

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
