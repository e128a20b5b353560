"""compare.py's many-backend mode: CPU per new connection with N backends against 2, per algorithm.

One nginx process serves N loopback ports. For each algorithm and round, fastlb runs twice, in
front of the first 2 ports and in front of all N, and wrk opens a new connection per request
through it; the figure is the CPU time of all fastlb's processes (supervisor and workers) per
connection, and the headline the ratio N / 2 (target: at most 1.05). Both run at once, idle in
turns: each round starts the pair and drives them in 1 s slices, one size then the other (in
turns the one with N first), ``--duration`` pairs of slices a round; the ratio is the median of
the pairs' ratios, so that a spell of load from elsewhere falls on both of a pair or on neither.

On loopback the connecting side itself pays more with N listening ports (the kernel's port
lookups, and the SYN's processing at a listener that is cold in the cache, which loopback runs in
the sender's context), and fastlb connects to a backend for every client. A plain client
measures that: it opens connections round-robin to the 2 ports and to the N ports straight, in
short runs, the two sizes in turns, and takes its own CPU time per connection to the ns
(CLOCK_THREAD_CPUTIME_ID): its Python part is the same for any number of ports, and the median
of many pairs' differences leaves the machine's noise out (the system time alone, split from
the user time by clock ticks, varied 3x and more between runs of one round). So the part of
the ratio the kernel takes is known.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from backend import start_http_backends
from harness import (
    LOOPBACK,
    HarnessError,
    Processes,
    fastlb_command,
    free_port,
    run_wrk,
    start_fastlb,
    write_wrk_script,
    wrk_command,
)

PLAIN_CONNECTIONS = 200  # per measurement of the plain client
PLAIN_PAIRS = 50  # of measurements (one of each size) a round
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
TARGET_RATIO = 1.05
SLICE_S = 1  # each round's runs go in slices this long, the two sizes in turns


def algorithm_names() -> list[str]:
    """The installed fastlb's algorithms (never the checkout's, which has no data plane)."""
    code = "from fastlb import _dataplane; print(' '.join(_dataplane.algorithm_names()))"
    done = subprocess.run(
        [*fastlb_command()[:2], "-c", code], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise HarnessError(f"cannot list fastlb's algorithms: {done.stderr.strip()}")
    return done.stdout.split()


def plain_client_cpu(ports: list[int], connections: int) -> float:
    """This thread's CPU time per connection (µs): connect, send a request, read until EOF,
    close, round-robin over ``ports``."""
    start = time.thread_time_ns()
    for i in range(connections):
        with socket.create_connection((LOOPBACK, ports[i % len(ports)]), timeout=5) as sock:
            sock.sendall(REQUEST)
            while sock.recv(65536):
                pass
    return (time.thread_time_ns() - start) / connections / 1000


def run_time(pids: list[int]) -> dict[int, float]:
    """Seconds each process has run on a CPU, all its threads together, to the nanosecond
    (/proc/PID/task/TID/schedstat): the clock ticks of cpu_times() are 10 ms, as much as a
    supervisor spends in a slice."""
    times = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        total = 0
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended: its time is in no file any more
        times[pid] = total / 1e9
    return times


def start_pair(procs: Processes, sizes: dict, algorithm: str, args, script: Path) -> dict:
    """A started, warmed fastlb in front of each set of ports: {size: (running, url)}."""
    extra = ["--algorithm", algorithm, *shlex.split(args.fastlb_args)]
    started = {}
    for size, ports in sizes.items():
        port = free_port()
        running = start_fastlb(procs, port, ports, args.workers, extra_args=extra)
        url = f"http://{LOOPBACK}:{port}/"
        started[size] = (running, url)
        if args.warmup > 0:
            warm = wrk_command(url, args.warmup, args.connections, args.threads, script, True)
            run_wrk(warm, timeout=args.warmup + 30)
    return started


def measure_slice(running, url: str, algorithm: str, size: int, args, script: Path) -> dict:
    """One SLICE_S run of wrk through one of the pair: its CPU per connection."""
    cmd = wrk_command(url, SLICE_S, args.connections, args.threads, script, True)
    pids = running.refresh_pids()
    before = run_time(pids)
    result = run_wrk(cmd, timeout=SLICE_S + 60)
    after = run_time(running.refresh_pids())
    if running.proc.poll() is not None or not result.requests or result.errors:
        raise HarnessError(
            f"fastlb {algorithm} with {size} backends: exit {running.proc.poll()}, "
            f"{result.requests} requests, errors {result.errors}"
        )
    cpu = sum(t - before.get(pid, 0.0) for pid, t in after.items())
    main = running.proc.pid
    return {
        "connections_per_s": result.requests_per_s,
        "cpu_us_per_connection": cpu / result.requests * 1e6,
        "supervisor_us_per_connection": (after.get(main, 0.0) - before.get(main, 0.0))
        / result.requests
        * 1e6,
    }


def run(args, console) -> int:
    """Runs the mode; returns the exit status."""
    count = args.many_backends
    algorithms = args.algorithms or algorithm_names()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    plain: list[dict] = []
    tmp = args.out / "tmp"
    tmp.mkdir(exist_ok=True)
    with Processes(args.out) as procs:
        backends = start_http_backends(procs, count, tmp, args.backend_kind)
        script = write_wrk_script(tmp, delay=False)
        console.print(
            f"{backends.kind} backends on {count} ports; fastlb with {args.workers} worker(s); "
            f"{args.rounds} round(s) of {', '.join(algorithms)}"
        )
        plain_client_cpu(backends.ports, count)  # every port once, before measuring
        for number in range(1, args.rounds + 1):
            sizes = (2, count) if number % 2 else (count, 2)
            this_round = []
            for pair_number in range(PLAIN_PAIRS):
                for size in sizes if pair_number % 2 == 0 else sizes[::-1]:
                    cpu = plain_client_cpu(backends.ports[:size], PLAIN_CONNECTIONS)
                    this_round.append(
                        {
                            "round": (number, pair_number),
                            "ports": size,
                            "cpu_us_per_connection": cpu,
                        }
                    )
            plain += this_round
            medians, extra = plain_summary(this_round, count)
            console.print(
                f"  round {number} plain client: {medians[2]:.1f} µs CPU per connection to 2 "
                f"ports, {medians[count]:.1f} to {count} ({PLAIN_PAIRS} runs of "
                f"{PLAIN_CONNECTIONS} each); paired difference {extra:+.1f} µs"
            )
            for algorithm in algorithms:
                pair = start_pair(
                    procs, {size: backends.ports[:size] for size in sizes}, algorithm, args, script
                )
                try:
                    for slice_number in range(max(1, args.duration // SLICE_S)):
                        for size in sizes if slice_number % 2 == 0 else sizes[::-1]:
                            run = measure_slice(*pair[size], algorithm, size, args, script)
                            # paired() pairs the two sizes of one slice pair
                            run.update(
                                round=(number, slice_number), algorithm=algorithm, backends=size
                            )
                            runs.append(run)
                            console.print(
                                f"  round {number}.{slice_number} {algorithm:<11} {size:>5} "
                                f"backends {run['connections_per_s']:>9,.0f} conn/s "
                                f"{run['cpu_us_per_connection']:6.1f} µs CPU/conn "
                                f"(supervisor {run['supervisor_us_per_connection']:.2f})"
                            )
                finally:
                    for running, _ in pair.values():
                        procs.stop(running.proc)
    client, client_extra = plain_summary(plain, count)
    rows = []
    for algorithm in algorithms:
        mine = {
            size: [r for r in runs if r["algorithm"] == algorithm and r["backends"] == size]
            for size in (2, count)
        }
        few, many = (
            statistics.median(r["cpu_us_per_connection"] for r in mine[size]) for size in (2, count)
        )
        sup_few, sup_many = (
            statistics.median(r["supervisor_us_per_connection"] for r in mine[size])
            for size in (2, count)
        )
        mine_runs = mine[2] + mine[count]
        rows.append(
            {
                "algorithm": algorithm,
                "cpu_us_2": few,
                f"cpu_us_{count}": many,
                "ratio": statistics.median(
                    paired(mine_runs, count, lambda a, b: b / a, "cpu_us_per_connection")
                ),
                "ratio_less_client_extra": statistics.median(
                    paired(
                        mine_runs,
                        count,
                        lambda a, b: (b - client_extra) / a,
                        "cpu_us_per_connection",
                    )
                ),
                "supervisor_us_2": sup_few,
                f"supervisor_us_{count}": sup_many,
            }
        )
    print_table(console, rows, count, client, client_extra)
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "backends": count,
        "workers": args.workers,
        "plain_client_us_per_connection": client,
        "plain_client_extra_us": client_extra,
        "rows": rows,
        "runs": runs,
        "plain_runs": plain,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = args.out / "many-backends.json"
    path.write_text(json.dumps(record, indent=2))
    console.print(f"results: {path}")
    return 0


def plain_summary(plain: list[dict], count: int) -> tuple[dict[int, float], float]:
    """The plain client's median CPU per connection at each size, and the median of the
    pairs' differences (count less 2)."""
    medians = {
        size: statistics.median(p["cpu_us_per_connection"] for p in plain if p["ports"] == size)
        for size in (2, count)
    }
    extra = statistics.median(
        paired(plain, count, lambda few, many: many - few, "cpu_us_per_connection")
    )
    return medians, extra


def paired(runs: list[dict], count: int, combine, key: str) -> list[float]:
    """combine(value at 2, value at count) for each round that has both."""
    by_round: dict[int, dict[int, float]] = {}
    for run in runs:
        size = run.get("ports", run.get("backends"))
        by_round.setdefault(run["round"], {})[size] = run[key]
    return [combine(sizes[2], sizes[count]) for sizes in by_round.values() if len(sizes) == 2]


def print_table(console, rows: list[dict], count: int, client: dict, extra: float) -> None:
    from rich.table import Table

    table = Table(
        title=f"CPU per new connection, {count} backends against 2 "
        "(medians; each ratio is the median of the slice pairs')"
    )
    for column in (
        "algorithm",
        "µs at 2",
        f"µs at {count}",
        f"{count} / 2",
        "less client's extra",
        "supervisor µs 2 → N",
    ):
        table.add_column(column, justify="left" if column == "algorithm" else "right")
    for row in rows:
        style = "green" if row["ratio"] <= TARGET_RATIO else "yellow"
        table.add_row(
            row["algorithm"],
            f"{row['cpu_us_2']:.1f}",
            f"{row[f'cpu_us_{count}']:.1f}",
            f"[{style}]{row['ratio']:.3f}[/]",
            f"{row['ratio_less_client_extra']:.3f}",
            f"{row['supervisor_us_2']:.2f} → {row[f'supervisor_us_{count}']:.2f}",
        )
    console.print(table)
    console.print(
        f"plain client straight to the backends: {client[2]:.1f} µs of CPU time per "
        f"connection to 2 ports, "
        f"{client[count]:.1f} to {count}: {extra:+.1f} µs that the connecting side pays "
        f"(fastlb connects once per client); target ratio ≤ {TARGET_RATIO}"
    )
