"""Load test fastlb with locust: start backends and the balancer, run locust headless, keep reports.

Starts local HTTP backends (nginx, or Python when nginx is missing) and a balancer in front of
them, runs locust without its web UI for ``--run-time`` against the balancer with the users of
``locustfile.py``, prints the summary and writes locust's CSV files and HTML report into a folder
(default ``loadtests/results/locust-<timestamp>/``). Every process it starts is stopped by PID.

    python loadtests/run_locust.py                               # 20 s, 20 users
    python loadtests/run_locust.py --run-time 1m --users 50 --workers 2
    python loadtests/run_locust.py --balancer haproxy            # the same test against HAProxy
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backend import start_http_backends
from harness import (
    HERE,
    LOOPBACK,
    HarnessError,
    Processes,
    Running,
    fastlb_missing,
    free_port,
    haproxy_missing,
    log_tail,
    nginx_missing,
    run_script,
    start_fastlb,
    start_haproxy,
    start_nginx_stream,
)
from rich.console import Console

USER_CLASSES = ["KeepAliveHttpUser", "TcpUser"]
console = Console(width=None if sys.stdout.isatty() else 140)


def parse_timespan(text: str) -> int:
    """Seconds in a locust time span: ``90``, ``20s``, ``1m30s``, ``1h``."""
    # Importing locust here would monkey-patch this process with gevent, and break subprocess.
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or not match:
        raise ValueError(text)
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-time", default="20s", help="locust --run-time (default 20s)")
    parser.add_argument("--users", type=int, default=20, help="concurrent users (default 20)")
    parser.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    parser.add_argument(
        "--user-classes",
        default=",".join(USER_CLASSES),
        help=f"comma-separated, from {USER_CLASSES} (default both)",
    )
    parser.add_argument(
        "--balancer", choices=["fastlb", "haproxy", "nginx", "direct"], default="fastlb"
    )
    parser.add_argument("--workers", type=int, default=1, help="balancer workers/threads")
    parser.add_argument("--backends", type=int, default=3, help="number of backends")
    parser.add_argument("--backend-kind", choices=["auto", "nginx", "python"], default="auto")
    parser.add_argument("--fastlb-args", default="", help="extra `fastlb run` flags")
    parser.add_argument("--out", type=Path, help="report folder (default loadtests/results/...)")
    args = parser.parse_args()
    try:
        args.run_seconds = parse_timespan(args.run_time)
    except ValueError:
        parser.error(f"--run-time: cannot read {args.run_time!r} (examples: 20s, 1m30s, 90)")
    args.user_classes = [c.strip() for c in args.user_classes.split(",") if c.strip()]
    if set(args.user_classes) - set(USER_CLASSES):
        parser.error(f"--user-classes: choose from {USER_CLASSES}")
    if args.out is None:
        args.out = HERE / "results" / time.strftime("locust-%Y%m%d-%H%M%S")
    return args


def start_balancer(args, procs: Processes, backends: list[int], tmp: Path) -> Running:
    missing = {"fastlb": fastlb_missing, "haproxy": haproxy_missing, "nginx": nginx_missing}
    reason = missing[args.balancer]() if args.balancer in missing else None
    if reason:
        raise HarnessError(f"cannot run {args.balancer}: {reason}")
    if args.balancer == "direct":
        return Running("direct", backends[0])
    port = free_port()
    if args.balancer == "fastlb":
        extra = shlex.split(args.fastlb_args)
        return start_fastlb(procs, port, backends, args.workers, extra_args=extra)
    if args.balancer == "haproxy":
        return start_haproxy(procs, port, backends, args.workers, tmp)
    return start_nginx_stream(procs, port, backends, args.workers, tmp)


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastlb-locust-") as tmp_name:
        tmp = Path(tmp_name)
        with Processes(args.out) as procs:
            try:
                backends = start_http_backends(procs, args.backends, tmp, args.backend_kind)
                running = start_balancer(args, procs, backends.ports, tmp)
            except HarnessError as exc:
                console.print(f"[red]{exc}[/]")
                return 2
            host = f"http://{LOOPBACK}:{running.port}"
            console.print(
                f"{args.balancer} on {host} in front of {len(backends.ports)} {backends.kind} "
                f"backends; locust: {args.users} users ({', '.join(args.user_classes)}) "
                f"for {args.run_time}"
            )
            cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py")]
            cmd += ["--headless", "--only-summary", "--host", host]
            cmd += ["--users", str(args.users), "--spawn-rate", str(args.spawn_rate)]
            cmd += ["--run-time", args.run_time, "--stop-timeout", "5"]
            cmd += ["--csv", str(args.out / "locust"), "--html", str(args.out / "report.html")]
            cmd += ["--logfile", str(args.out / "locust.log"), *args.user_classes]
            locust = procs.start("locust-output", cmd)
            try:
                status = locust.wait(timeout=args.run_seconds + 60)
            except subprocess.TimeoutExpired:
                console.print(f"[red]locust did not finish within {args.run_seconds + 60} s[/]")
                status = None
            alive = running.proc is None or running.proc.poll() is None
            if not alive:
                console.print(f"[red]{args.balancer} exited during the test:[/]")
                console.print(log_tail(running.proc))
    # locust's own summary, printed when it stops (its log lines went to locust.log).
    print((args.out / "locust-output.log").read_text(errors="replace"))
    if not (args.out / "locust_stats.csv").exists():
        console.print("[red]locust wrote no statistics[/]")
    console.print(f"report: {args.out / 'report.html'}")
    console.print(f"CSV:    {args.out}/locust_*.csv")
    if status != 0:
        console.print(
            f"[red]locust exited with status {status} (1: some requests failed); "
            f"see {args.out / 'locust_failures.csv'}[/]"
        )
    return 0 if status == 0 and alive else 1


if __name__ == "__main__":
    run_script(main)
