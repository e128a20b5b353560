"""Failed connections and connect times across reloads, upgrades and restarts, at a fixed rate
of new connections, for fastlb, HAProxy in master-worker mode and nginx.

A paced client opens ``--rate`` connections a second (each reads the backend's name line and
closes) while the balancer is changed ``--events`` times, ``--period`` seconds apart:

  fastlb reload    SIGHUP (what `fastlb reload` sends): workers 1 -> 2 -> 3 -> 1, the
                   algorithm and the backend list change each time (a new generation)
  fastlb upgrade   SIGUSR2 (`fastlb upgrade`): the supervisor executes the installed fastlb in place
  fastlb restart   SIGTERM, then a new `fastlb run`, on a socket held as systemd's socket unit
                   holds it (LISTEN_FDS)
  haproxy reload   haproxy -W (master-worker), the backend list changed, SIGUSR2 to the master
  nginx reload     nginx -s reload, the backend list changed

Each attempt counts against the event whose period it started in; "connect p99" is the time
from connect() to the backend's first line.

    python loadtests/reload.py                      # 20 reloads, 5 upgrades, 5 restarts
    python loadtests/reload.py --quick              # 4 of each, 500 connections/s
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    LOOPBACK,
    NGINX_STREAM_MODULE,
    ROOT,
    HarnessError,
    Processes,
    fastlb_command,
    fastlb_missing,
    free_port,
    haproxy_missing,
    nginx_missing,
    run_script,
    wait_for_fastlb_stats,
    wait_for_port,
)
from rich.console import Console
from rich.table import Table

BACKENDS_PROGRAM = ROOT / "tests" / "backends.py"
ACTIVATE_PROGRAM = ROOT / "tests" / "activate.py"
WORKERS = [1, 2, 3, 1]
ALGORITHMS = ["roundrobin", "leastconn", "random", "p2c"]
CLIENT_THREADS = 8


@dataclass
class Attempt:
    started: float
    seconds: float
    error: str | None


@dataclass
class PacedClient:
    """``rate`` new connections a second over a few threads, each attempt recorded."""

    port: int
    rate: float
    attempts: list[Attempt] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, offset: int) -> None:
        interval = CLIENT_THREADS / self.rate
        due = time.monotonic() + offset * interval / CLIENT_THREADS
        while not self.stop.is_set():
            due += interval
            started = time.monotonic()
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=10) as sock:
                    if not sock.recv(256):
                        raise EOFError("closed before the name")
                error = None
            except (OSError, EOFError) as exc:
                error = repr(exc)
            self.attempts.append(Attempt(started, time.monotonic() - started, error))
            time.sleep(max(0.0, due - time.monotonic()))

    def __enter__(self):
        self.threads = [
            threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(CLIENT_THREADS)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=15)


@dataclass
class Row:
    name: str
    events: int
    attempts: int
    failed: int
    p99_ms: float
    worst_ms: float


def measure(name, port, rate, events, period, change) -> Row:
    """Runs ``change(i)`` ``events`` times under the paced client; counts what started after
    the first change."""
    with PacedClient(port, rate) as client:
        time.sleep(period)  # warm up: the steady state before the first change
        first = time.monotonic()
        for i in range(events):
            started = time.monotonic()
            change(i)
            time.sleep(max(0.0, period - (time.monotonic() - started)))
        end = time.monotonic()
    counted = [a for a in client.attempts if first <= a.started < end]
    times = sorted(a.seconds * 1000 for a in counted if a.error is None)
    p99 = statistics.quantiles(times, n=100)[98] if len(times) >= 100 else max(times, default=0)
    return Row(
        name,
        events,
        len(counted),
        sum(1 for a in counted if a.error),
        p99,
        max(times, default=0.0),
    )


def start_backends(procs: Processes, count: int) -> list[int]:
    ports = []
    for i in range(count):
        port = free_port()
        procs.start(
            f"backend-{i}",
            [sys.executable, str(BACKENDS_PROGRAM), "name", "--name", f"b{i}", "--port", str(port)],
        )
        wait_for_port(port)
        ports.append(port)
    return ports


def backend_list(ports: list[int], i: int) -> list[int]:
    """A different non-empty list each time: drop one backend in turn."""
    return [p for j, p in enumerate(ports) if j != i % len(ports)] if len(ports) > 1 else ports


def fastlb_config(port: int, stats: int, ports: list[int], i: int) -> str:
    backends = ", ".join(f'"{LOOPBACK}:{p}"' for p in backend_list(ports, i))
    return (
        f'listen = "{LOOPBACK}:{port}"\nstats = "{LOOPBACK}:{stats}"\n'
        f"workers = {WORKERS[i % len(WORKERS)]}\n"
        f'algorithm = "{ALGORITHMS[i % len(ALGORITHMS)]}"\ndrain-timeout = "10s"\n'
        f"backend = [{backends}]\n"
    )


def run_fastlb(args, tmp: Path, ports: list[int], how: str) -> Row:
    port, stats = free_port(), free_port()
    path = tmp / f"fastlb-{how}.toml"
    path.write_text(fastlb_config(port, stats, ports, 0))
    with Processes(tmp) as procs:
        held = None
        cmd = [*fastlb_command(), "run", "--config", str(path)]
        if how == "restart":
            held = socket.socket()
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind((LOOPBACK, port))
            held.listen(4096)
            cmd = [sys.executable, str(ACTIVATE_PROGRAM), str(held.fileno()), "--", *cmd]
        proc = procs.start(f"fastlb-{how}", cmd, pass_fds=[held.fileno()] if held else [])
        wait_for_fastlb_stats(stats, proc)
        running = {"proc": proc}

        def change(i: int) -> None:
            if how == "reload":
                path.write_text(fastlb_config(port, stats, ports, i + 1))
            if how in ("reload", "upgrade"):
                # The signal `fastlb reload` / `fastlb upgrade` send once the file is valid.
                proc.send_signal(signal.SIGHUP if how == "reload" else signal.SIGUSR2)
                return
            old = running["proc"]
            old.send_signal(signal.SIGTERM)
            old.wait(timeout=30)
            procs.stop(old)
            running["proc"] = procs.start(
                f"fastlb-{how}-{i}", cmd, pass_fds=[held.fileno()] if held else []
            )
            wait_for_fastlb_stats(stats, running["proc"])

        events = args.events if how == "reload" else args.upgrades
        try:
            return measure(f"fastlb {how}", port, args.rate, events, args.period, change)
        finally:
            if held:
                held.close()


def haproxy_text(port: int, ports: list[int], i: int, tmp: Path) -> str:
    servers = "\n".join(
        f"    server s{p} {LOOPBACK}:{p}" for p in backend_list(ports, i)
    )  # fmt: skip
    return (
        f"global\n    nbthread 2\n    pidfile {tmp}/haproxy-w.pid\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend f\n    bind {LOOPBACK}:{port}\n    default_backend b\n"
        f"backend b\n    balance roundrobin\n{servers}\n"
    )


def run_haproxy(args, tmp: Path, ports: list[int]) -> Row:
    port = free_port()
    path = tmp / "haproxy-w.cfg"
    path.write_text(haproxy_text(port, ports, 0, tmp))
    with Processes(tmp) as procs:
        master = procs.start("haproxy-w", ["haproxy", "-W", "-db", "-f", str(path)])
        wait_for_port(port, master)

        def change(i: int) -> None:
            path.write_text(haproxy_text(port, ports, i + 1, tmp))
            master.send_signal(signal.SIGUSR2)

        return measure("haproxy -W reload", port, args.rate, args.events, args.period, change)


def nginx_text(port: int, ports: list[int], i: int, prefix: Path) -> str:
    servers = "\n".join(f"        server {LOOPBACK}:{p};" for p in backend_list(ports, i))
    return (
        f"load_module {NGINX_STREAM_MODULE};\nworker_processes 2;\n"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"stream {{\n    upstream b {{\n{servers}\n    }}\n"
        f"    server {{\n        listen {LOOPBACK}:{port} reuseport;\n        proxy_pass b;\n"
        "    }\n}\n"
    )


def run_nginx(args, tmp: Path, ports: list[int]) -> Row:
    port = free_port()
    prefix = tmp / "nginx-reload"
    prefix.mkdir(exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(nginx_text(port, ports, 0, prefix))
    base = ["nginx", "-p", str(prefix), "-c", str(path), "-e", str(prefix / "error.log")]
    with Processes(tmp) as procs:
        master = procs.start("nginx-reload", [*base, "-g", "daemon off;"])
        wait_for_port(port, master)

        def change(i: int) -> None:
            path.write_text(nginx_text(port, ports, i + 1, prefix))
            subprocess.run([*base, "-s", "reload"], check=True, capture_output=True, timeout=30)

        return measure("nginx -s reload", port, args.rate, args.events, args.period, change)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="new connections a second")
    parser.add_argument("--events", type=int, default=20, help="reloads of each balancer")
    parser.add_argument("--upgrades", type=int, default=5, help="fastlb upgrades and restarts")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between two events")
    parser.add_argument("--quick", action="store_true", help="4 of each at 500 connections/s")
    args = parser.parse_args()
    if args.quick:
        args.rate, args.events, args.upgrades, args.period = 500.0, 4, 4, 0.5
    missing = fastlb_missing()
    if missing:
        print(f"reload.py: {missing}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlb-reload-") as name:
        tmp = Path(name)
        with Processes(tmp) as procs:
            ports = start_backends(procs, 3)
            try:
                for how in ("reload", "upgrade", "restart"):
                    rows.append(run_fastlb(args, tmp, ports, how))
                for runner, why in ((run_haproxy, haproxy_missing()), (run_nginx, nginx_missing())):
                    if why:
                        print(f"skipped: {why}", file=sys.stderr)
                    else:
                        rows.append(runner(args, tmp, ports))
            except HarnessError as exc:
                print(f"reload.py: {exc}", file=sys.stderr)
                return 1
    table = Table(title=f"{args.rate:.0f} new connections/s, an event every {args.period:g}s")
    for column in (
        "balancer",
        "events",
        "connections",
        "failed",
        "failed/event",
        "p99 ms",
        "max ms",
    ):
        table.add_column(column, justify="left" if column == "balancer" else "right")
    for row in rows:
        table.add_row(
            row.name,
            str(row.events),
            str(row.attempts),
            str(row.failed),
            f"{row.failed / row.events:.1f}",
            f"{row.p99_ms:.1f}",
            f"{row.worst_ms:.0f}",
        )
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    run_script(main)
