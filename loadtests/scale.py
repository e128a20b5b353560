"""Scaling across cores: fastlb, HAProxy (nbthread) and nginx (worker_processes) at 1, 2, 4 and 8
workers pinned to cores, and the speed-up over 1 worker per workload.

The balancer under test runs on cores 0..N-1 (``taskset``; every process and thread of it),
where the kernel places its workers; with ``--pin each``, each worker or thread has a core of
its own, as each balancer's own setting does it (fastlb ``--cpu-affinity``, HAProxy ``cpu-map``,
nginx ``worker_cpu_affinity``), and the rest of the balancer (a supervisor, a master) runs on the
N cores. The backends (nginx, ``--backend-workers`` processes) and wrk run on the cores above
the largest N, the same for every run, so the load side does not change with N; on a machine
with too few cores for that (2 cores: N = 1 and 2) they are not pinned and share. The workloads
are compare.py's keepalive, newconn and bulk; wrk opens ``--connections`` connections per
worker (``--bulk-connections`` for bulk). Rounds are interleaved like compare.py's.

    python loadtests/scale.py                       # every N the cores allow, 1 round of 5 s
    python loadtests/scale.py --workers 1,2 --duration 2 --balancers fastlb,haproxy
    python loadtests/scale.py --pin each            # one core per worker or thread

It runs unattended and without network on a machine with 16 or more cores when it takes along
what it needs: ``--bundle DIR`` (run here, with the packages installed) collects the fastlb
wheel and the wheels of its dependencies, the .deb files of haproxy, nginx,
libnginx-mod-stream and wrk (and the libraries they need beyond a base Debian 12) unpacked with
``dpkg -x``, these scripts, and ``DIR/run.sh``, which makes a virtual environment from the
wheels and runs this script with the unpacked binaries: copy DIR over, then ``DIR/run.sh``
(same Debian release and Python version).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backend import start_nginx_backends
from compare import WORKLOADS, check_responses
from harness import (
    HERE,
    LOOPBACK,
    ROOT,
    HarnessError,
    Processes,
    Running,
    free_port,
    log_tail,
    process_tree,
    run_script,
    run_wrk,
    start_fastlb,
    start_haproxy,
    start_nginx_stream,
    write_wrk_script,
    wrk_command,
)
from rich.console import Console
from rich.table import Table

BALANCERS = ["fastlb", "haproxy", "nginx"]
WORKLOAD_NAMES = ["keepalive", "newconn", "bulk"]
WORKER_COUNTS = [1, 2, 4, 8]
# What the bundle unpacks: the tools, and the libraries they need beyond a base Debian 12.
DEB_PACKAGES = [
    "haproxy",
    "nginx",
    "nginx-common",
    "libnginx-mod-stream",
    "wrk",
    "liblua5.3-0",
    "libluajit-5.1-2",
    "libluajit-5.1-common",
    "libopentracing-c-wrapper0",
    "libopentracing1",
]
BUNDLED_SCRIPTS = ["scale.py", "compare.py", "many_backends.py", "harness.py", "backend.py"]
APT_ARCHIVES = Path("/var/cache/apt/archives")
console = Console(width=None if sys.stdout.isatty() else 140)

RUN_SCRIPT = """\
#!/bin/sh
# Runs loadtests/scale.py with what this folder holds: no network needed.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
if [ ! -x "$HERE/venv/bin/python" ]; then
    python3 -m venv "$HERE/venv"
    "$HERE/venv/bin/pip" install -q --no-index --find-links "$HERE/wheels" fastlb
fi
export PATH="$HERE/root/usr/sbin:$HERE/root/usr/bin:$PATH"
export LD_LIBRARY_PATH="$HERE/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FASTLB_NGINX_STREAM_MODULE="$HERE/root/usr/lib/nginx/modules/ngx_stream_module.so"
exec "$HERE/venv/bin/python" "$HERE/loadtests/scale.py" --out "$HERE/results" "$@"
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers",
        default="",
        help="comma-separated N (default: 1,2,4,8 "
        "as far as the cores allow: N <= max(2, cores / 2))",
    )
    parser.add_argument("--balancers", default=",".join(BALANCERS))
    parser.add_argument("--workloads", default=",".join(WORKLOAD_NAMES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per start")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections per worker")
    parser.add_argument("--bulk-connections", type=int, default=4, help="per worker, bulk")
    parser.add_argument("--backends", type=int, default=4, help="backend ports")
    parser.add_argument(
        "--backend-workers",
        type=int,
        default=0,
        help="nginx backend processes (default: half the cores left to the load side, at least 1)",
    )
    parser.add_argument(
        "--pin",
        choices=["set", "each"],
        default="set",
        help="set: the balancer on cores 0..N-1, placed by the kernel; each: one core per "
        "worker or thread, by the balancer's own setting (default: set)",
    )
    parser.add_argument("--out", type=Path, help="result folder (default loadtests/results/...)")
    parser.add_argument(
        "--bundle",
        type=Path,
        metavar="DIR",
        help="collect what an offline machine needs to run this script into DIR, and stop",
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.workers:
        try:
            args.workers = [int(n) for n in args.workers.split(",")]
        except ValueError:
            parser.error("--workers takes whole numbers, e.g. 1,2,4")
    else:
        args.workers = [n for n in WORKER_COUNTS if n <= max(2, cores // 2)]
    args.balancers = [b for b in args.balancers.split(",") if b]
    args.workloads = [w for w in args.workloads.split(",") if w]
    if set(args.balancers) - set(BALANCERS):
        parser.error(f"balancers are {BALANCERS}")
    if set(args.workloads) - set(WORKLOAD_NAMES):
        parser.error(f"workloads are {WORKLOAD_NAMES}")
    if args.out is None:
        args.out = HERE / "results" / time.strftime("scale-%Y%m%d-%H%M%S")
    return args


# ---- the bundle --------------------------------------------------------------------------------


def run_checked(cmd: list[str], **kwargs) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise HarnessError(f"{shlex.join(cmd)} failed:\n{(done.stderr or done.stdout).strip()}")


def installed_version(package: str) -> str | None:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def fetch_deb(package: str, folder: Path) -> Path:
    """The .deb of the installed version: from apt's cache, else ``apt-get download``."""
    version = installed_version(package)
    if version is None:
        raise HarnessError(f"{package} is not installed here (apt-get install {package})")
    for path in APT_ARCHIVES.glob(f"{package}_*.deb"):
        if path.name.split("_")[1].replace("%3a", ":") == version:
            return Path(shutil.copy2(path, folder))
    run_checked(["apt-get", "download", f"{package}={version}"], cwd=folder, timeout=300)
    return next(folder.glob(f"{package}_*.deb"))


def bundle(folder: Path) -> int:
    folder = folder.resolve()
    for name in ("wheels", "debs", "root", "loadtests"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    console.print(f"wheels of fastlb ({ROOT}) and its dependencies")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(folder / "wheels")]
    run_checked([*pip, str(ROOT)], timeout=900)
    for package in DEB_PACKAGES:
        deb = fetch_deb(package, folder / "debs")
        run_checked(["dpkg", "-x", str(deb), str(folder / "root")], timeout=120)
        console.print(f"  {deb.name}")
    for script in BUNDLED_SCRIPTS:
        shutil.copy2(HERE / script, folder / "loadtests" / script)
    run = folder / "run.sh"
    run.write_text(RUN_SCRIPT)
    run.chmod(0o755)
    wheels = sorted(p.name for p in (folder / "wheels").glob("*.whl"))
    console.print(f"{len(wheels)} wheels: {', '.join(wheels)}")
    console.print(f"bundle ready: copy {folder} to the machine, then run {run}")
    return 0


# ---- the measurement ---------------------------------------------------------------------------


def cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def pin(running: Running, cpus: list[int], each: bool) -> None:
    """Every process and thread of a started balancer onto cpus; with ``each``, only the
    process that started the workers (HAProxy's threads are all pinned by cpu-map)."""
    if each:
        pids = [] if running.name == "haproxy" else [running.proc.pid]
    else:
        pids = running.refresh_pids()
    for pid in pids:
        run_checked(["taskset", "-a", "-p", "-c", cpu_list(cpus), str(pid)], timeout=10)


def start(
    name: str, procs: Processes, workers: int, ports: list[int], tmp: Path, each: bool
) -> Running:
    """With ``each``, worker (thread) i is pinned to core i by the balancer's own setting."""
    port = free_port()
    cores = list(range(workers)) if each else []
    span = f"0-{workers - 1}" if each else ""
    if name == "fastlb":
        extra = ["--cpu-affinity", span] if each else []
        return start_fastlb(procs, port, ports, workers, extra_args=extra)
    if name == "haproxy":
        return start_haproxy(procs, port, ports, workers, tmp, cpus=span)
    return start_nginx_stream(procs, port, ports, workers, tmp, cpus=cores)


def measure(args, procs, tmp, backends, name, workers, load_cpus, script) -> list[dict]:
    each = args.pin == "each"
    running = start(name, procs, workers, backends.ports, tmp, each)
    runs = []
    try:
        pin(running, list(range(workers)), each)
        wrong = check_responses(running.port, backends, ["/", "/1m"])
        if wrong:
            raise HarnessError(f"{name}: {wrong}")
        prefix = ["taskset", "-c", cpu_list(load_cpus)] if load_cpus else []
        threads = max(1, min(len(load_cpus) // 2 if load_cpus else 1, workers * 2))
        for workload_name in args.workloads:
            workload = WORKLOADS[workload_name]
            per_worker = args.bulk_connections if workload.metric == "MB/s" else args.connections
            url = f"http://{LOOPBACK}:{running.port}{workload.path}"
            connections = max(per_worker * workers, threads)
            if args.warmup > 0:
                warm = wrk_command(url, args.warmup, connections, threads, script, workload.close)
                run_wrk([*prefix, *warm], timeout=args.warmup + 30)
            cmd = wrk_command(url, args.duration, connections, threads, script, workload.close)
            result = run_wrk([*prefix, *cmd], timeout=args.duration + 60)
            if not result.requests or result.errors or running.proc.poll() is not None:
                raise HarnessError(
                    f"{name} x{workers} {workload_name}: {result.requests} requests, errors "
                    f"{result.errors}, exit {running.proc.poll()}\n{log_tail(running.proc)}"
                )
            value = workload.headline(
                {
                    "megabytes_per_s": result.megabytes_per_s,
                    "requests_per_s": result.requests_per_s,
                    "p99_ms": result.p99_ms,
                }
            )
            runs.append(
                {
                    "balancer": name,
                    "workers": workers,
                    "pin": args.pin,
                    "workload": workload_name,
                    "value": value,
                    "metric": workload.metric,
                }
            )
            console.print(
                f"  {name:<8} x{workers:<2} {workload_name:<10} {value:>12,.1f} {workload.metric}"
            )
    finally:
        procs.stop(running.proc)
    return runs


def summarize(runs: list[dict], args) -> list[dict]:
    rows = []
    for workload in args.workloads:
        for name in args.balancers:
            values = {}
            for n in args.workers:
                mine = sorted(
                    r["value"]
                    for r in runs
                    if r["balancer"] == name and r["workload"] == workload and r["workers"] == n
                )
                if mine:
                    values[n] = mine[len(mine) // 2]
            if values:
                base = values.get(min(args.workers))
                rows.append(
                    {
                        "workload": workload,
                        "balancer": name,
                        "metric": WORKLOADS[workload].metric,
                        "values": values,
                        "speedup": {n: v / base for n, v in values.items()} if base else {},
                    }
                )
    return rows


def print_tables(rows: list[dict], args) -> None:
    first = min(args.workers)
    for workload in args.workloads:
        table = Table(title=f"{WORKLOADS[workload].title}: speed-up over {first} worker(s)")
        table.add_column("balancer")
        for n in args.workers:
            table.add_column(f"x{n}", justify="right")
        for row in (r for r in rows if r["workload"] == workload):
            cells = [
                f"{row['values'][n]:,.0f} {row['metric']} ({row['speedup'][n]:.2f}×)"
                if n in row["values"]
                else "-"
                for n in args.workers
            ]
            table.add_row(row["balancer"], *cells)
        console.print(table)


def main() -> int:
    args = parse_args()
    if args.bundle:
        try:
            return bundle(args.bundle)
        except HarnessError as exc:
            console.print(f"[red]{exc}[/]")
            return 1
    for tool in ["wrk", "taskset", *args.balancers]:
        if tool != "fastlb" and not shutil.which(tool):
            console.print(f"[red]scale.py needs {tool} (apt-get install it, or use --bundle)[/]")
            return 2
    cores = os.cpu_count() or 1
    top = max(args.workers)
    load_cpus = list(range(top, cores)) if cores - top >= 2 else []
    backend_workers = args.backend_workers or max(1, len(load_cpus) // 2)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    console.print(
        f"{cores} cores: balancers on cores 0..N-1 for N in {args.workers}"
        f"{', one core per worker' if args.pin == 'each' else ''}; load side "
        f"{'on cores ' + cpu_list(load_cpus) if load_cpus else 'unpinned (too few cores)'}"
    )
    with tempfile.TemporaryDirectory(prefix="fastlb-scale-") as tmp_name:
        tmp = Path(tmp_name)
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        try:
            with Processes(logs) as procs:
                backends = start_nginx_backends(procs, args.backends, tmp, workers=backend_workers)
                if load_cpus:
                    for pid in (p.pid for p in process_tree(backends.pids[0])):
                        cmd = ["taskset", "-a", "-p", "-c", cpu_list(load_cpus), str(pid)]
                        run_checked(cmd, timeout=10)
                script = write_wrk_script(tmp, delay=False)
                for number in range(1, args.rounds + 1):
                    console.print(f"round {number}/{args.rounds}")
                    for n in args.workers:
                        for name in args.balancers:
                            runs += measure(args, procs, tmp, backends, name, n, load_cpus, script)
        except HarnessError as exc:
            console.print(f"[red]{exc}[/]")
            return 1
    rows = summarize(runs, args)
    print_tables(rows, args)
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "cores": cores,
        "load_cpus": load_cpus,
        "backend_workers": backend_workers,
        "pin": args.pin,
        "rows": rows,
        "runs": runs,
    }
    path = args.out / "scale.json"
    path.write_text(json.dumps(record, indent=2))
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    run_script(main)
