"""Memory per idle connection: RSS of each balancer while it holds many idle proxied connections.

A hold backend accepts connections, sends each one byte and keeps it open. This script opens the
connections through the balancer in batches; a connection counts only once the client has read
the backend's byte through it (so it really reaches the backend) and has sent one byte back (so
both directions have carried data, like a keep-alive connection between requests). The result is
the RSS of all the balancer's processes with the connections open, minus their RSS when idle
with a connection limit of 100 (so that what is allocated up front for the limit counts too),
divided by the number of connections.

Each balancer process needs two descriptors per connection, so the number of connections is
capped below half the hard RLIMIT_NOFILE (every process raises its soft limit to the hard one).

    python loadtests/memory.py                      # fastlb, haproxy, nginx; 10,000 connections
    python loadtests/memory.py --connections 2000
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path

from backend import HOLD_GREETING, start_hold_backend
from harness import (
    HERE,
    LOOPBACK,
    HarnessError,
    Processes,
    Running,
    environment,
    fastlb_missing,
    free_port,
    haproxy_missing,
    nginx_missing,
    nofile_hard_limit,
    raise_nofile_limit,
    rss_bytes,
    run_script,
    start_fastlb,
    start_haproxy,
    start_nginx_stream,
)
from rich.console import Console
from rich.table import Table

BALANCERS = ["fastlb", "haproxy", "nginx"]
SMALL_LIMIT = 100  # connection limit of the baseline run
BATCH = 500  # below the smallest listen backlog (nginx: 511)
FD_HEADROOM = 200  # listeners, epoll, pipes, logs: descriptors that are not connections
console = Console(width=None if sys.stdout.isatty() else 140)


class ConnectionFailed(Exception):
    pass


def open_idle_connections(port: int, count: int, timeout: float = 60.0) -> list[socket.socket]:
    """Open ``count`` connections to ``port``; each reads the backend's byte and sends one back."""
    opened: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        while len(opened) < count:
            batch = []
            for _ in range(min(BATCH, count - len(opened))):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((LOOPBACK, port))
                selector.register(sock, selectors.EVENT_READ)
                batch.append(sock)
            deadline = time.monotonic() + timeout
            waiting = len(batch)
            while waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectionFailed(
                        f"{waiting} of a batch of {len(batch)} connections got no byte from the "
                        f"backend within {timeout:.0f} s ({len(opened)} open before the batch)"
                    )
                for key, _ in selector.select(remaining):
                    sock = key.fileobj
                    try:
                        data = sock.recv(16)
                    except OSError as exc:
                        raise ConnectionFailed(
                            f"connection {len(opened) + 1}: {exc} ({len(opened)} open before)"
                        ) from None
                    if data != HOLD_GREETING:
                        raise ConnectionFailed(
                            f"connection {len(opened) + 1}: expected {HOLD_GREETING!r} from the "
                            f"backend, got {data!r} ({len(opened)} open before)"
                        )
                    selector.unregister(sock)
                    sock.send(b"?")
                    waiting -= 1
            opened.extend(batch)
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    finally:
        selector.close()
    return opened


def settled_rss(pids: list[int], interval: float = 0.5, limit: float = 10.0) -> int:
    """RSS once two samples ``interval`` apart agree within 1%, or after ``limit`` seconds."""
    previous = rss_bytes(pids)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(interval)
        current = rss_bytes(pids)
        if abs(current - previous) <= previous * 0.01:
            return current
        previous = current
    return previous


def start(name: str, procs: Processes, port: int, backend: int, limit: int, tmp: Path) -> Running:
    """Start one worker/thread of ``name`` that accepts up to ``limit`` connections."""
    if name == "fastlb":
        return start_fastlb(procs, port, [backend], workers=1, max_conn=limit)
    if name == "haproxy":
        return start_haproxy(procs, port, [backend], 1, tmp, maxconn=limit)
    return start_nginx_stream(procs, port, [backend], 1, tmp, connections=2 * limit + 100)


def idle_rss(name: str, procs: Processes, backend: int, limit: int, tmp: Path) -> int:
    running = start(name, procs, free_port(), backend, limit, tmp)
    try:
        return settled_rss(running.refresh_pids())
    finally:
        procs.stop(running.proc)


def measure(name: str, procs: Processes, backend: int, count: int, tmp: Path) -> dict:
    # What a balancer allocates up front for its connection limit (fastlb's connection table,
    # HAProxy's fd table) is memory per connection too, so the baseline has a small limit.
    small_limit = idle_rss(name, procs, backend, SMALL_LIMIT, tmp)
    port = free_port()
    running = start(name, procs, port, backend, count + 10, tmp)
    try:
        pids = running.refresh_pids()
        before = settled_rss(pids)
        started = time.monotonic()
        sockets = open_idle_connections(port, count)
        opened_s = time.monotonic() - started
        try:
            pids = running.refresh_pids()
            after = settled_rss(pids)
            alive = running.proc.poll() is None
        finally:
            for sock in sockets:
                sock.close()
    finally:
        procs.stop(running.proc)
    if not alive:
        raise HarnessError(f"{name} exited while holding {count} connections")
    return {
        "balancer": name,
        "connections": count,
        "processes": len(pids),
        "rss_idle_small_limit_bytes": small_limit,
        "rss_idle_bytes": before,
        "rss_open_bytes": after,
        "bytes_per_connection": (after - small_limit) / count,
        "bytes_per_connection_while_open": (after - before) / count,
        "open_seconds": opened_s,
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_table(results: list[dict], count: int) -> None:
    base = next((r for r in results if r["balancer"] == "fastlb"), None)
    table = Table(title=f"RSS per idle proxied connection ({count:,} connections, 1 worker)")
    columns = [
        "balancer",
        "processes",
        f"idle, limit {SMALL_LIMIT}",
        f"idle, limit {count:,}",
        f"{count:,} open",
        "per connection",
        "× fastlb",
        "allocated while opening",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column == "balancer" else "right")
    for r in results:
        ratio = r["bytes_per_connection"] / base["bytes_per_connection"] if base else None
        table.add_row(
            r["balancer"],
            str(r["processes"]),
            mib(r["rss_idle_small_limit_bytes"]),
            mib(r["rss_idle_bytes"]),
            mib(r["rss_open_bytes"]),
            f"{r['bytes_per_connection'] / 1024:.2f} KiB",
            f"{ratio:.2f}" if ratio else "-",
            f"{r['bytes_per_connection_while_open'] / 1024:.2f} KiB",
        )
    console.print(table)
    console.print(
        f"RSS of all the balancer's processes. per connection = ({count:,} open - idle with a "
        f"limit of {SMALL_LIMIT}) / {count:,}; allocated while opening = ({count:,} open - idle "
        f"with a limit of {count:,}) / {count:,}, the rest being allocated at start for the limit."
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=10_000, help="default 10,000")
    parser.add_argument("--balancers", default=",".join(BALANCERS), help=f"from {BALANCERS}")
    parser.add_argument("--out", type=Path, help="JSON result (default loadtests/results/...)")
    args = parser.parse_args()
    names = [n.strip() for n in args.balancers.split(",") if n.strip()]
    if set(names) - set(BALANCERS):
        parser.error(f"unknown balancers: {', '.join(sorted(set(names) - set(BALANCERS)))}")

    raise_nofile_limit()
    fits = (nofile_hard_limit() - FD_HEADROOM) // 2
    count = min(args.connections, fits)
    if count < args.connections:
        console.print(
            f"[yellow]{count:,} connections instead of {args.connections:,}: a balancer process "
            f"holds 2 descriptors per connection and the hard RLIMIT_NOFILE is "
            f"{nofile_hard_limit():,}[/]"
        )
    missing = {"fastlb": fastlb_missing, "haproxy": haproxy_missing, "nginx": nginx_missing}
    results, problems = [], []
    with tempfile.TemporaryDirectory(prefix="fastlb-memory-") as tmp_name:
        tmp = Path(tmp_name)
        with Processes(tmp) as procs:
            backend, _ = start_hold_backend(procs)
            for name in names:
                reason = missing[name]()
                if reason:
                    console.print(f"[yellow]skipping {name}: {reason}[/]")
                    continue
                try:
                    result = measure(name, procs, backend, count, tmp)
                except (HarnessError, ConnectionFailed) as exc:
                    problems.append(f"{name}: {exc}")
                    console.print(f"[red]{name}: {exc}[/]")
                    continue
                results.append(result)
                console.print(
                    f"  {name:<8} {count:,} connections opened in {result['open_seconds']:.1f} s, "
                    f"{result['bytes_per_connection'] / 1024:.2f} KiB each"
                )
    print_table(results, count)
    out = args.out or HERE / "results" / time.strftime("memory-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "environment": environment(),
        "connections": count,
        "results": results,
        "problems": problems,
    }
    out.write_text(json.dumps(record, indent=2))
    console.print(f"results: {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    run_script(main)
