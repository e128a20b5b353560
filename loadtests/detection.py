"""How long fastlb takes to take a failing backend out: active checks and passive detection.

Each scenario runs fastlb in front of two backends (``tests/backends.py`` processes), breaks one
of them, and measures the time until ``/stats`` shows it down, polling every 10 ms. Passive
scenarios keep a paced client loop running (about 100 new connections per second) and count
the clients that failed, which should be none while the other backend is up.

    python loadtests/detection.py                 # every scenario, 3 runs each
    python loadtests/detection.py --runs 5 --scenarios http-stopped,closes

Scenarios (settings as HAProxy's ``check inter 1s fall 3 timeout 1s``):
  http-stopped   SIGSTOP (the kernel still completes handshakes), http check: bound interval x
                 fall + timeout + 1 s
  tcp-stopped    the same with a tcp check, which a stopped server passes: never detected
  closes         a server that accepts and closes at once, no check: passive, fall 3
  refuses        a killed server, no check: passive, fall 3
  silent         a server that accepts and never answers, observe first-byte 1 s: passive
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from harness import (
    LOOPBACK,
    ROOT,
    Processes,
    fastlb_command,
    free_port,
    run_script,
    wait_for_fastlb_stats,
    wait_for_port,
)
from rich.console import Console
from rich.table import Table

BACKENDS_PROGRAM = ROOT / "tests" / "backends.py"
GIVE_UP = 12.0  # seconds after which a scenario counts as never detected
CHECK = ["--check-interval", "1s", "--fall", "3", "--check-timeout", "1s", "--rise", "2"]


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # of the backend that breaks
    how: str  # "stop", "kill" or "" (it is broken from the start)
    flags: tuple[str, ...]
    bound: float | None  # seconds, what the settings promise
    traffic: bool  # passive: only client traffic can find it


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("http-stopped", "http", "stop", ("--check", "--check-type", "http", *CHECK),
                 1 * 3 + 1 + 1, False),
        Scenario("tcp-stopped", "http", "stop", ("--check", *CHECK), None, False),
        Scenario("closes", "close", "", ("--fall", "3"), None, True),
        Scenario("refuses", "http", "kill", ("--fall", "3"), None, True),
        Scenario("silent", "silent", "", ("--fall", "3", "--observe", "first-byte",
                                          "--first-byte-timeout", "1s"), None, True),
    ]
}  # fmt: skip


def start_backend(procs: Processes, mode: str, name: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = procs.start(
        f"backend-{name}",
        [sys.executable, str(BACKENDS_PROGRAM), mode, "--name", name, "--port", str(port)]
        + ["--lifetime", "120"],
    )
    wait_for_port(port, proc)
    return proc, port


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/stats", timeout=5) as response:
        return json.loads(response.read())


def is_down(stats_port: int, backend_port: int) -> bool:
    for backend in stats(stats_port)["backends"]:
        if backend["address"] == f"{LOOPBACK}:{backend_port}":
            return not backend["up"]
    raise KeyError(backend_port)


def client_loop(port: int, stop: threading.Event, failures: list[str]) -> None:
    """About 100 new connections a second, each a small HTTP request; failures are kept."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if not sock.recv(4096):
                    failures.append("closed without an answer")
        except OSError as exc:
            failures.append(repr(exc))
        time.sleep(max(0.0, 0.01 - (time.monotonic() - started)))


def run_once(scenario: Scenario, tmp: Path) -> tuple[float | None, int]:
    """Seconds until the broken backend was down (None: not within GIVE_UP), failed clients."""
    with Processes(tmp) as procs:
        good, good_port = start_backend(procs, "http", "good")
        bad, bad_port = start_backend(procs, scenario.mode, "bad")
        port, stats_port = free_port(), free_port()
        cmd = [*fastlb_command(), "run", "--listen", f"{LOOPBACK}:{port}", "--workers", "1"]
        cmd += ["--stats", f"{LOOPBACK}:{stats_port}"]
        cmd += ["--backend", f"{LOOPBACK}:{good_port}", "--backend", f"{LOOPBACK}:{bad_port}"]
        proc = procs.start("fastlb", [*cmd, *scenario.flags])
        wait_for_fastlb_stats(stats_port, proc)
        wait_for_port(port, proc)
        stop, failures = threading.Event(), []
        clients = None
        if scenario.traffic:
            clients = threading.Thread(target=client_loop, args=(port, stop, failures))
            clients.start()
        broken = time.monotonic()
        if scenario.how == "stop":
            bad.send_signal(signal.SIGSTOP)
        elif scenario.how == "kill":
            bad.kill()
            bad.wait()
        try:
            while time.monotonic() - broken < GIVE_UP:
                if is_down(stats_port, bad_port):
                    return time.monotonic() - broken, len(failures)
                time.sleep(0.01)
            return None, len(failures)
        finally:
            stop.set()
            if clients:
                clients.join()
            if scenario.how == "stop":
                bad.send_signal(signal.SIGCONT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    names = args.scenarios.split(",")
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown} (choose from {', '.join(SCENARIOS)})")
    table = Table(title=f"time until a broken backend is marked down, {args.runs} runs")
    for column in ("scenario", "bound", "median", "min – max", "not detected", "failed clients"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    with tempfile.TemporaryDirectory(prefix="fastlb-detection-") as tmp:
        for name in names:
            scenario = SCENARIOS[name]
            times, missed, failed = [], 0, 0
            for _ in range(args.runs):
                seconds, failures = run_once(scenario, Path(tmp))
                failed += failures
                if seconds is None:
                    missed += 1
                else:
                    times.append(seconds)
            table.add_row(
                name,
                f"{scenario.bound:.1f} s" if scenario.bound else "-",
                f"{statistics.median(times):.2f} s" if times else "-",
                f"{min(times):.2f} – {max(times):.2f} s" if times else "-",
                f"{missed} of {args.runs}" if missed else "0",
                str(failed) if scenario.traffic else "-",
            )
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    return 0


if __name__ == "__main__":
    run_script(main)
