"""``fastlb status``: a running balancer's /stats as terminal tables, once or refreshed like
``top`` (``--watch``), with rates between two polls."""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import time
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fastlb.errors import FastlbError
from fastlb.settings import Address

TIMEOUT = 5.0


def fetch(address: Address) -> dict:
    """The JSON of GET /stats; FastlbError when the balancer cannot be asked."""
    conn = http.client.HTTPConnection(address.host, address.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/stats")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise FastlbError(f"{address}/stats answered {response.status}")
        return json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FastlbError(f"cannot read stats from {address}: {exc}") from None
    finally:
        conn.close()


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


_STATE_STYLE = {
    "up": "[green]up[/]",
    "down": "[red]down[/]",
    "drain": "[yellow]drain[/]",
    "maint": "[yellow]maint[/]",
}


def _weight(backend: dict) -> str:
    """The configured weight, and the one in use when slow start or an agent changed it."""
    weight, effective = backend["weight"], backend["effective_weight"]
    return str(weight) if effective == weight else f"{effective:g}/{weight}"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _last_check(check: dict | None) -> str:
    if check is None:
        return "-"
    mark = "[green]ok[/]" if check["ok"] else "[red]failed[/]"
    return f"{mark} {check['reason']} ({check['duration'] * 1000:.0f} ms)"


def console(width: int = 120) -> Console:
    # A pipe or a file gets the whole table rather than 80 squeezed columns.
    return Console() if sys.stdout.isatty() else Console(width=width)


@dataclass(frozen=True)
class Sample:
    """One answer of /stats and when it came (time.monotonic())."""

    at: float
    stats: dict


class Rates:
    """Counters per second between two samples of the same balancer; "-" where there is no
    earlier sample or the counter went down (the balancer restarted, a backend was re-added)."""

    def __init__(self, now: Sample, before: Sample | None):
        self.elapsed = now.at - before.at if before else 0.0
        same = before is not None and before.stats["pid"] == now.stats["pid"]
        self.frontends = _by(before.stats["frontends"], "name") if same else {}
        self.backends = _by(before.stats["backends"], "id") if same else {}

    def frontend(self, frontend: dict, counter: str) -> str:
        return self._rate(self.frontends.get(frontend["name"]), frontend, counter)

    def backend(self, backend: dict, counter: str) -> str:
        return self._rate(self.backends.get(backend["id"]), backend, counter)

    def _rate(self, before: dict | None, now: dict, counter: str) -> str:
        if before is None or self.elapsed <= 0 or now[counter] < before[counter]:
            return "-"
        rate = (now[counter] - before[counter]) / self.elapsed
        return f"{_size(round(rate))}/s" if counter.endswith("_bytes") else f"{rate:.1f}"


def _by(entries: list[dict], key: str) -> dict:
    return {entry[key]: entry for entry in entries}


def render(stats: dict, console: Console) -> None:
    """Workers on one line, the frontends, then a table per pool with a row per backend: sent
    is client to backend, received the other way."""
    for part in view(stats):
        console.print(part)


def view(stats: dict, rates: Rates | None = None) -> list[RenderableType]:
    """What :func:`render` prints; with ``rates``, a per-second column after each counter."""
    workers = stats["workers"]
    ready = sum(1 for worker in workers if worker["ready"])
    parts: list[RenderableType] = [
        f"fastlb pid {stats['pid']}: {ready}/{len(workers)} workers ready, "
        f"table version {stats['table_version']}"
    ]
    frontends = Table(title="frontends", title_justify="left")
    frontends.add_column("frontend", no_wrap=True)
    frontends.add_column("listen")
    frontends.add_column("routes to")
    for column in ("active", "total", *(("conn/s",) if rates else ()), "rejected"):
        frontends.add_column(column, justify="right", no_wrap=True)
    for frontend in stats["frontends"]:
        routes = [frontend["pool"]] + [
            f"{pool} ({pattern})" for pattern, pool in frontend["sni"].items()
        ]
        frontends.add_row(
            frontend["name"],
            " ".join(frontend["listen"]),
            ", ".join(routes),
            str(frontend["active"]),
            str(frontend["connections"]),
            *((rates.frontend(frontend, "connections"),) if rates else ()),
            str(frontend["rejected"]),
        )
    parts.append(frontends)
    backends = _by(stats["backends"], "id")
    now = time.time()
    for pool in stats["pools"]:
        extra = f", send-proxy {pool['send_proxy']}" if pool["send_proxy"] else ""
        table = Table(
            title=f"pool {pool['name']} ({pool['algorithm']}{extra})", title_justify="left"
        )
        table.add_column("backend", no_wrap=True)
        columns = ["weight", "role", "state", "active", "total", "failed", "sent", "received"]
        if rates:
            columns[5:5] = ["conn/s"]
            columns[-1:] = ["sent/s", "received", "recv/s"]
        for column in columns:
            table.add_column(column, justify="left" if column == "role" else "right", no_wrap=True)
        table.add_column("since", justify="right", no_wrap=True)
        table.add_column("last check")
        for backend_id in pool["backends"]:
            backend = backends[backend_id]
            history = backend["history"]
            cells = [
                _weight(backend),
                "backup" if backend["backup"] else "primary",
                _STATE_STYLE[history["state"]],
                str(backend["active"]),
                str(backend["connections"]),
                str(backend["failed"]),
                _size(backend["up_bytes"]),
                _size(backend["down_bytes"]),
            ]
            if rates:
                cells[5:5] = [rates.backend(backend, "connections")]
                cells[-1:] = [
                    rates.backend(backend, "up_bytes"),
                    _size(backend["down_bytes"]),
                    rates.backend(backend, "down_bytes"),
                ]
            table.add_row(
                backend["address"],
                *cells,
                _age(now - history["since"]),
                _last_check(history["last_check"]),
            )
        parts.append(table)
    return parts


def watch(address: Address, interval: float, console: Console) -> None:
    """Shows the tables with rates every ``interval`` seconds until KeyboardInterrupt; while the
    balancer cannot be reached, says so and keeps asking. A terminal gets one view redrawn in
    place; a pipe, a file or a dumb terminal gets each view after the last, as ``top -b``."""
    in_place = console.is_terminal and not console.is_dumb_terminal
    live = Live(console=console, auto_refresh=False) if in_place else None
    before: Sample | None = None
    next_poll = time.monotonic()
    with live or contextlib.nullcontext():
        while True:
            clock = time.strftime("%H:%M:%S")
            try:
                sample = Sample(time.monotonic(), fetch(address))
            except FastlbError as exc:
                parts: list[RenderableType] = [
                    f"{clock} [red]{escape(str(exc))}[/]; asking again every {interval:g}s"
                ]
                before = None
            else:
                heading = f"{clock}, every {interval:g}s; Ctrl-C to stop"
                parts = [heading, *view(sample.stats, Rates(sample, before))]
                before = sample
            if live:
                live.update(Group(*parts), refresh=True)
            else:
                for part in parts:
                    console.print(part)
                console.print()
                console.file.flush()
            # A slow answer delays the next poll rather than bunching up the ones after it.
            next_poll = max(next_poll + interval, time.monotonic())
            time.sleep(max(0.0, next_poll - time.monotonic()))
