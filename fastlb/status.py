"""``fastlb status``: a running balancer's /stats as a terminal table."""

from __future__ import annotations

import http.client
import json
import sys
import time

from rich.console import Console
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


def console() -> Console:
    # A pipe or a file gets the whole table rather than 80 squeezed columns.
    return Console() if sys.stdout.isatty() else Console(width=120)


def render(stats: dict, console: Console) -> None:
    """Workers on one line, the frontends, then a table per pool with a row per backend: sent
    is client to backend, received the other way."""
    workers = stats["workers"]
    ready = sum(1 for worker in workers if worker["ready"])
    console.print(
        f"fastlb pid {stats['pid']}: {ready}/{len(workers)} workers ready, "
        f"table version {stats['table_version']}"
    )
    frontends = Table(title="frontends", title_justify="left")
    frontends.add_column("frontend", no_wrap=True)
    frontends.add_column("listen")
    frontends.add_column("routes to")
    for column in ("active", "total", "rejected"):
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
            str(frontend["rejected"]),
        )
    console.print(frontends)
    backends = {backend["id"]: backend for backend in stats["backends"]}
    now = time.time()
    for pool in stats["pools"]:
        extra = f", send-proxy {pool['send_proxy']}" if pool["send_proxy"] else ""
        table = Table(
            title=f"pool {pool['name']} ({pool['algorithm']}{extra})", title_justify="left"
        )
        table.add_column("backend", no_wrap=True)
        for column in ("weight", "role", "state", "active", "total", "failed", "sent", "received"):
            table.add_column(column, justify="left" if column == "role" else "right", no_wrap=True)
        table.add_column("since", justify="right", no_wrap=True)
        table.add_column("last check")
        for backend_id in pool["backends"]:
            backend = backends[backend_id]
            history = backend["history"]
            table.add_row(
                backend["address"],
                _weight(backend),
                "backup" if backend["backup"] else "primary",
                _STATE_STYLE[history["state"]],
                str(backend["active"]),
                str(backend["connections"]),
                str(backend["failed"]),
                _size(backend["up_bytes"]),
                _size(backend["down_bytes"]),
                _age(now - history["since"]),
                _last_check(history["last_check"]),
            )
        console.print(table)
