"""What the access log costs: CPU per new connection with it on and off, fastlb and HAProxy.

wrk opens a new connection per request (``Connection: close``) through each balancer in turn,
in interleaved rounds: fastlb without and with ``--access-log FILE``, HAProxy without and with
``option tcplog`` (``log stdout format raw``, its stdout going to a file). The table gives the
medians of connections/s and of the balancer's CPU time (user + system, all its processes) per
connection, and each balancer's log-on ÷ log-off ratio.

    python loadtests/accesslog.py                   # 3 rounds of 5 s
    python loadtests/accesslog.py --rounds 5 --duration 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from backend import start_http_backends
from harness import (
    LOOPBACK,
    Processes,
    _run_haproxy,
    cpu_seconds,
    free_port,
    haproxy_config,
    run_script,
    run_wrk,
    start_fastlb,
    write_wrk_script,
    wrk_command,
)
from rich.console import Console
from rich.table import Table

VARIANTS = ["fastlb", "fastlb-log", "haproxy", "haproxy-log"]
HAPROXY_LOG = ("log stdout format raw local0", "option tcplog")


def start(name: str, procs: Processes, port: int, backends: list[int], tmp: Path):
    if name.startswith("fastlb"):
        extra = ["--access-log", str(tmp / "fastlb-access.log")] if name.endswith("-log") else []
        return start_fastlb(procs, port, backends, 1, extra_args=extra, log_name=name)
    text = haproxy_config(port, backends, 1, False, 4096, tmp, name=name)
    if name.endswith("-log"):
        global_line, defaults_line = HAPROXY_LOG
        text = text.replace("global\n", f"global\n    {global_line}\n", 1)
        text = text.replace("defaults\n", f"defaults\n    log global\n    {defaults_line}\n", 1)
    return _run_haproxy(procs, name, port, text, tmp, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk per run")
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="fastlb-accesslog-") as tmp_dir:
        tmp = Path(tmp_dir)
        with Processes(tmp) as procs:
            backends = start_http_backends(procs, 2, tmp).ports
            script = write_wrk_script(tmp, delay=False)
            for number in range(1, args.rounds + 1):
                for name in VARIANTS:
                    port = free_port()
                    running = start(name, procs, port, backends, tmp)
                    url = f"http://{LOOPBACK}:{port}/"
                    run_wrk(wrk_command(url, 1, args.connections, 1, script, close=True), 30)
                    before = cpu_seconds(running.refresh_pids())
                    cmd = wrk_command(url, args.duration, args.connections, 1, script, close=True)
                    result = run_wrk(cmd, timeout=args.duration + 60)
                    after = cpu_seconds(running.refresh_pids())
                    procs.stop(running.proc)
                    cpu = sum(t - before.get(pid, 0.0) for pid, t in after.items())
                    per_connection = cpu / max(1, result.requests) * 1e6
                    runs[name].append((result.requests_per_s, per_connection))
                    print(
                        f"round {number} {name:<12} {result.requests_per_s:>9,.0f} conn/s "
                        f"{per_connection:6.1f} µs CPU/conn errors {result.errors}",
                        flush=True,
                    )
    table = Table(title="access log cost: new connection per request, medians")
    for column in ("balancer", "conn/s", "CPU µs/conn", "log on ÷ off (CPU)"):
        table.add_column(column, justify="left" if column == "balancer" else "right")
    medians = {
        name: (
            statistics.median(r for r, _ in runs[name]),
            statistics.median(c for _, c in runs[name]),
        )
        for name in VARIANTS
    }
    for name in VARIANTS:
        rate, cpu = medians[name]
        ratio = ""
        if name.endswith("-log"):
            ratio = f"{cpu / medians[name[:-4]][1]:.2f}"
        table.add_row(name, f"{rate:,.0f}", f"{cpu:.1f}", ratio)
    Console(width=None if sys.stdout.isatty() else 100).print(table)
    return 0


if __name__ == "__main__":
    run_script(main)
