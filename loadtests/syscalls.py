"""System calls per request, fastlb and HAProxy side by side.

A balancer here spends most of its CPU time in the kernel, so the number of system calls per
request is the figure to bring down. For each balancer this script runs a short fixed wrk workload
(keep-alive requests, a new connection per request, 1 MiB responses) while counting the system
calls of all the balancer's processes, and prints calls per request, per system call.

``--tool strace`` (default) runs ``strace -c -f -p PID...``: it slows the balancer down a lot,
which changes throughput and can change how many events one ``epoll_wait`` returns, but the
per-request counts of the other calls stay meaningful. ``--tool perf`` counts
tracepoints instead (``raw_syscalls:sys_enter`` for all calls, ``syscalls:sys_enter_*`` for
the usual ones, the rest as ``other``), at almost no cost, and also records what each
``epoll_wait`` returned: the epoll events per request, each a wake-up of the balancer's loop
for a socket, and how often its threads went to sleep (voluntary context switches) and were
preempted, per request. A balancer that sleeps is woken by whoever sends it the next packet, and
on a virtual machine that sender pays for waking an idle CPU. Below every table: the TCP
segments per request on the machine (``OutSegs`` of /proc/net/snmp over the run; on loopback
that is both hops, both ways).

    python loadtests/syscalls.py
    python loadtests/syscalls.py --tool perf --balancers fastlb,haproxy,haproxy-splice,nginx
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backend import BULK_PATH, start_http_backends
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
    run_script,
    run_wrk,
    start_fastlb,
    start_haproxy,
    start_nginx_stream,
    write_wrk_script,
    wrk_command,
    wrk_result,
)
from rich.console import Console
from rich.table import Table

BALANCERS = ["fastlb", "haproxy", "haproxy-splice", "nginx"]
DEFAULT_BALANCERS = ["fastlb", "haproxy", "haproxy-splice"]
# name: (title, path, Connection: close, wrk connections)
WORKLOADS = {
    "keepalive": ("small requests, keep-alive", "/", False, 50),
    "newconn": ("new connection per request", "/", True, 50),
    "bulk": ("1 MiB responses", BULK_PATH, False, 8),
}
PERF_SYSCALLS = """
    accept accept4 connect socket close shutdown setsockopt getsockopt getsockname getpeername
    read write readv writev recvfrom sendto recvmsg sendmsg recvmmsg sendmmsg splice pipe2 tee
    epoll_wait epoll_pwait epoll_pwait2 epoll_ctl poll ppoll select pselect6 io_uring_enter
    fcntl ioctl futex clock_gettime gettimeofday nanosleep clock_nanosleep timerfd_settime
    mmap munmap brk madvise getpid kill tgkill rt_sigprocmask rt_sigreturn
""".split()
TOP = 8  # system calls listed per workload, by count
EXTRA_ROWS = [  # per request, below the system calls
    ("epoll_events", "epoll events"),
    ("sleeps", "sleeps"),
    ("preemptions", "preemptions"),
    ("tcp_segments", "TCP segments"),
]
console = Console(width=None if sys.stdout.isatty() else 140)


def parse_strace_summary(text: str) -> dict[str, dict[str, int]]:
    """``{syscall: {"calls": n, "errors": n}}`` from the table that ``strace -c`` writes."""
    counts = {}
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) not in (5, 6) or not re.fullmatch(r"[\d.]+", tokens[0]):
            continue
        name = tokens[-1]
        if name == "total":
            continue
        counts[name] = {
            "calls": int(tokens[3]),
            "errors": int(tokens[4]) if len(tokens) == 6 else 0,
        }
    return counts


def perf_events() -> list[str]:
    """All system calls (raw_syscalls) and, one by one, those a proxy is likely to make."""
    # Counting every syscalls:sys_enter_* tracepoint costs perf 15 s to set up; these suffice.
    available = set(
        subprocess.run(
            ["perf", "list", "syscalls:sys_enter_*"], capture_output=True, text=True
        ).stdout.split()
    )
    events = [f"syscalls:sys_enter_{name}" for name in PERF_SYSCALLS]
    return ["raw_syscalls:sys_enter", *(e for e in events if e in available)]


def parse_perf_csv(text: str) -> dict[str, dict[str, int]]:
    """``{syscall: {"calls": n}}`` from ``perf stat -x,`` output of :func:`perf_events`.

    Calls not counted one by one are summed up as ``other``."""
    counts, total = {}, 0
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or not fields[0].strip().isdigit():
            continue
        if fields[2] == "raw_syscalls:sys_enter":
            total = int(fields[0])
        elif fields[2].startswith("syscalls:sys_enter_") and int(fields[0]) > 0:
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = {"calls": int(fields[0])}
    other = total - sum(c["calls"] for c in counts.values())
    if other > 0:
        counts["other"] = {"calls": other}
    return counts


def traced_with_strace(pids: list[int], wrk: list[str], duration: int, tmp: Path) -> tuple:
    summary = tmp / "strace.txt"
    cmd = ["strace", "-c", "-f", "-o", str(summary)]
    for pid in pids:
        cmd += ["-p", str(pid)]
    strace = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        # strace says "Process N attached" for every process (and thread) it traces.
        waiting = set(pids)
        while waiting:
            line = strace.stderr.readline()
            if not line:
                raise HarnessError(f"strace stopped before attaching: {shlex.join(cmd)}")
            match = re.search(r"Process (\d+) attached", line)
            if match:
                waiting.discard(int(match.group(1)))
        result = run_wrk(wrk, timeout=duration + 120)
    finally:
        strace.send_signal(signal.SIGINT)
        try:
            strace.wait(30)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait()
        strace.stderr.close()
    return result, parse_strace_summary(summary.read_text()), {}


EPOLL_EXITS = "syscalls:sys_exit_epoll_wait"


def traced_with_perf(pids: list[int], wrk: list[str], duration: int, tmp: Path) -> tuple:
    # With a command after --, perf counts the -p targets exactly while that command runs; the
    # recording of epoll_wait's returns wraps the count, so it covers the same run.
    output, recording = tmp / "perf.csv", tmp / "epoll.data"
    targets = ",".join(map(str, pids))
    cmd = ["perf", "record", "-q", "-o", str(recording), "-e", EPOLL_EXITS, "-p", targets, "--"]
    cmd += ["perf", "stat", "-x,", "-o", str(output), "-e", ",".join(perf_events())]
    cmd += ["-p", targets, "--", *wrk]
    switches_before = context_switches(pids)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    switches = {k: v - switches_before[k] for k, v in context_switches(pids).items()}
    script = subprocess.run(
        ["perf", "script", "-i", str(recording)], capture_output=True, text=True, timeout=120
    )
    extras = {"epoll_events": epoll_events(script.stdout), **switches}
    return wrk_result(done, cmd), parse_perf_csv(output.read_text()), extras


def epoll_events(perf_script: str) -> int:
    """The events that the recorded ``epoll_wait`` calls returned, summed (errors left out)."""
    total = 0
    for match in re.finditer(r"sys_exit_epoll_wait: 0x([0-9a-f]+)", perf_script):
        returned = int(match.group(1), 16)
        if returned < 1 << 63:  # -EINTR and the like read as huge unsigned numbers
            total += returned
    return total


def context_switches(pids: list[int]) -> dict[str, int]:
    """Voluntary ("sleeps") and involuntary ("preemptions") context switches of every thread of
    ``pids``, from /proc/PID/task/TID/status (psutil reads the main thread's alone)."""
    totals = {"sleeps": 0, "preemptions": 0}
    fields = {"voluntary_ctxt_switches": "sleeps", "nonvoluntary_ctxt_switches": "preemptions"}
    for pid in pids:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            try:
                lines = status.read_text().splitlines()
            except OSError:
                continue  # a thread that ended
            for line in lines:
                name, _, value = line.partition(":")
                if name in fields:
                    totals[fields[name]] += int(value)
    return totals


def tcp_segments_sent() -> int:
    """``Tcp: OutSegs`` of /proc/net/snmp: segments this machine has sent, all sockets."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = [row for row in lines if row[0] == "Tcp:"][:2]
    return int(values[names.index("OutSegs")])


def start(name: str, procs: Processes, port: int, backends: list[int], tmp: Path, args) -> Running:
    if name == "fastlb":
        extra = shlex.split(args.fastlb_args)
        return start_fastlb(procs, port, backends, workers=1, extra_args=extra)
    if name in ("haproxy", "haproxy-splice"):
        return start_haproxy(procs, port, backends, 1, tmp, splice=name == "haproxy-splice")
    return start_nginx_stream(procs, port, backends, 1, tmp)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--balancers", default=",".join(DEFAULT_BALANCERS), help=f"from {BALANCERS}"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"from {list(WORKLOADS)}")
    parser.add_argument("--duration", type=int, default=3, help="seconds of wrk per workload")
    parser.add_argument("--tool", choices=["strace", "perf"], default="strace")
    parser.add_argument("--fastlb-args", default="", help="extra `fastlb run` flags")
    parser.add_argument("--out", type=Path, help="JSON result (default loadtests/results/...)")
    args = parser.parse_args()
    names = [n.strip() for n in args.balancers.split(",") if n.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(names) - set(BALANCERS) or set(workloads) - set(WORKLOADS):
        parser.error("unknown balancer or workload")
    packages = {"wrk": "wrk", "strace": "strace", "perf": "linux-perf"}
    for tool in ("wrk", args.tool):
        if not shutil.which(tool):
            console.print(f"[red]syscalls.py needs {tool} (apt-get install {packages[tool]})[/]")
            return 2
    missing = {
        "fastlb": fastlb_missing,
        "haproxy": haproxy_missing,
        "haproxy-splice": haproxy_missing,
        "nginx": nginx_missing,
    }
    trace = traced_with_strace if args.tool == "strace" else traced_with_perf
    results: dict[str, dict[str, dict]] = {w: {} for w in workloads}
    problems = []
    with tempfile.TemporaryDirectory(prefix="fastlb-syscalls-") as tmp_name:
        tmp = Path(tmp_name)
        script = write_wrk_script(tmp, delay=False)
        with Processes(tmp) as procs:
            backends = start_http_backends(procs, 2, tmp)
            port = free_port()
            for name in names:
                reason = missing[name]()
                if reason:
                    console.print(f"[yellow]skipping {name}: {reason}[/]")
                    continue
                running = start(name, procs, port, backends.ports, tmp, args)
                try:
                    for workload in workloads:
                        _, path, close, connections = WORKLOADS[workload]
                        url = f"http://{LOOPBACK}:{port}{path}"
                        wrk = wrk_command(url, args.duration, connections, 1, script, close=close)
                        segments_before = tcp_segments_sent()
                        result, counts, extras = trace(
                            running.refresh_pids(), wrk, args.duration, tmp
                        )
                        segments = tcp_segments_sent() - segments_before
                        if result.errors or not result.requests:
                            problems.append(
                                f"{name} {workload}: {result.requests} responses, wrk errors "
                                f"{result.errors}, {result.bytes} bytes; wrk: {shlex.join(wrk)}"
                            )
                        total = sum(c["calls"] for c in counts.values())
                        per_request = total / result.requests if result.requests else 0.0
                        results[workload][name] = {
                            "requests": result.requests,
                            "requests_per_s": result.requests_per_s,
                            "syscalls": counts,
                            "total_per_request": per_request,
                            **extras,
                            "tcp_segments": segments,
                        }
                        console.print(
                            f"  {name:<15} {workload:<10} {result.requests:>8,} requests "
                            f"{per_request:8.2f} system calls per request"
                        )
                finally:
                    procs.stop(running.proc)

    print_tables(results, names)
    out = args.out or HERE / "results" / time.strftime("syscalls-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "environment": environment(),
        "tool": args.tool,
        "duration_s": args.duration,
        "results": results,
        "problems": problems,
    }
    out.write_text(json.dumps(record, indent=2))
    console.print(f"results: {out}")
    for problem in problems:
        console.print(f"[red]{problem}[/]")
    return 1 if problems else 0


def print_tables(results: dict, names: list[str]) -> None:
    for workload, by_balancer in results.items():
        shown = [n for n in names if n in by_balancer]
        if not shown:
            continue
        title, *_ = WORKLOADS[workload]
        table = Table(title=f"{workload}: {title} — system calls per request")
        table.add_column("system call")
        for name in shown:
            table.add_column(name, justify="right")
        totals: dict[str, float] = {}
        for name in shown:
            row = by_balancer[name]
            for call, count in row["syscalls"].items():
                totals[call] = totals.get(call, 0.0) + count["calls"] / max(row["requests"], 1)
        top = sorted(totals, key=totals.get, reverse=True)[:TOP]
        for call in top:
            cells = []
            for name in shown:
                row = by_balancer[name]
                count = row["syscalls"].get(call)
                cells.append(f"{count['calls'] / max(row['requests'], 1):.2f}" if count else "-")
            table.add_row(call, *cells)
        table.add_row(
            "[bold]all[/]",
            *(f"[bold]{by_balancer[n]['total_per_request']:.2f}[/]" for n in shown),
        )
        for key, label in EXTRA_ROWS:
            if any(by_balancer[n].get(key) is not None for n in shown):
                table.add_row(label, *(per_request_cell(by_balancer[n], key) for n in shown))
        table.add_row("requests", *(f"{by_balancer[n]['requests']:,}" for n in shown))
        console.print(table)


def per_request_cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value / max(row['requests'], 1):.2f}"


if __name__ == "__main__":
    run_script(main)
