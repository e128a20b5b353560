#!/usr/bin/env python3
"""UDP load balancing under dnsperf: queries/s and balancer CPU per query, fastlb against nginx's
stream module (``listen ... udp reuseport; proxy_responses 1;``) and dnsperf straight at the
DNS server, side by side in one run.

The DNS server is unbound on loopback answering a local zone; both balancers forward to it with
the same number of workers, and each query is a flow of its own that ends with its answer
(fastlb ``udp-responses = 1``, nginx ``proxy_responses 1``). CPU per query is the balancer's
processes' user + system time over the run, divided by the queries answered.

    python loadtests/udp.py --duration 5 --workers 1
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import LOOPBACK, NGINX_STREAM_MODULE, HarnessError, Processes, Running, free_port

ZONE = "example.test"


def dns_query(name: str, ident: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


def wait_for_dns(port: int, proc: harness.NamedProcess, timeout: float = 15.0) -> None:
    """Returns once a query to LOOPBACK:port is answered; fails early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise HarnessError(f"{proc.name} exited:\n{harness.log_tail(proc)}")
            sock.sendto(dns_query(f"who.{ZONE}", 7), (LOOPBACK, port))
            try:
                if sock.recv(512)[:2] == b"\0\7":
                    return
            except (TimeoutError, ConnectionRefusedError):
                pass
    raise HarnessError(f"no DNS answer on port {port} after {timeout:.0f} s")


def start_unbound(procs: Processes, tmp: Path, threads: int) -> int:
    port = free_port()
    config = tmp / "unbound.conf"
    config.write_text(
        "server:\n"
        f"    interface: {LOOPBACK}@{port}\n"
        '    do-daemonize: no\n    username: ""\n    chroot: ""\n'
        f'    directory: "{tmp}"\n    pidfile: "{tmp}/unbound.pid"\n'
        '    use-syslog: no\n    logfile: ""\n'
        f"    num-threads: {threads}\n"
        "    so-reuseport: yes\n"
        "    access-control: 127.0.0.0/8 allow\n"
        f'    local-zone: "{ZONE}." static\n'
        f'    local-data: "{ZONE}. A 192.0.2.1"\n'
        f'    local-data: "who.{ZONE}. A 192.0.2.1"\n'
        "remote-control:\n    control-enable: no\n"
    )
    proc = procs.start("unbound", ["unbound", "-d", "-c", str(config)])
    wait_for_dns(port, proc)
    return port


def start_fastlb(procs: Processes, tmp: Path, backend: int, workers: int) -> Running:
    port, stats = free_port(), free_port()
    config = tmp / "fastlb-udp.toml"
    config.write_text(
        f'stats = "{LOOPBACK}:{stats}"\n'
        "[frontend.dns]\n"
        f'listen = ["{LOOPBACK}:{port}"]\nprotocol = "udp"\npool = "dns"\n'
        "[pool.dns]\n"
        f'backend = ["{LOOPBACK}:{backend}"]\nudp-responses = 1\n'
    )
    cmd = [*harness.fastlb_command(), "run", "--config", str(config), "--workers", str(workers)]
    proc = procs.start("fastlb-udp", cmd)
    harness.wait_for_fastlb_stats(stats, proc)
    wait_for_dns(port, proc)
    running = Running("fastlb", port, proc)
    running.refresh_pids()
    return running


def start_nginx(procs: Processes, tmp: Path, backend: int, workers: int) -> Running:
    port = free_port()
    prefix = tmp / "nginx-udp"
    prefix.mkdir()
    config = (
        f"load_module {NGINX_STREAM_MODULE};\n"
        f"worker_processes {workers};\n"
        f"worker_rlimit_nofile {harness.nofile_hard_limit()};\n"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 16384; }\n"
        "stream {\n"
        "    server {\n"
        f"        listen {LOOPBACK}:{port} udp reuseport;\n"
        f"        proxy_pass {LOOPBACK}:{backend};\n"
        "        proxy_responses 1;\n"
        "        proxy_timeout 10s;\n"
        "    }\n"
        "}\n"
    )
    return harness.run_nginx(procs, "nginx-udp", prefix, config, port, workers, wait_for_dns)


def dnsperf(port: int, queries: Path, args: argparse.Namespace) -> dict:
    cmd = ["dnsperf", "-s", LOOPBACK, "-p", str(port), "-d", str(queries)]
    cmd += ["-l", str(args.duration), "-c", str(args.clients), "-q", str(args.outstanding)]
    cmd += ["-t", "2"]
    if args.rate:
        cmd += ["-Q", str(args.rate)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 30)
    if done.returncode != 0:
        raise HarnessError(f"dnsperf failed:\n{done.stdout}{done.stderr}")

    def number(label: str) -> float:
        return float(re.search(rf"{label}:\s+([\d.]+)", done.stdout).group(1))

    return {
        "sent": int(number("Queries sent")),
        "completed": int(number("Queries completed")),
        "lost": int(number("Queries lost")),
        "qps": number("Queries per second"),
        "latency_ms": number("Average Latency \\(s\\)") * 1000,
    }


def measure(name: str, port: int, pids: list[int], queries: Path, args) -> dict:
    before = harness.cpu_seconds(pids)
    result = dnsperf(port, queries, args)
    after = harness.cpu_seconds(pids)
    cpu = sum(after.get(pid, 0.0) - before.get(pid, 0.0) for pid in pids)
    result["name"] = name
    result["cpu_s"] = cpu
    result["cpu_us_per_query"] = (
        cpu / result["completed"] * 1e6 if pids and result["completed"] else 0
    )
    return result


def table(rows: list[dict]) -> str:
    head = f"{'target':<8} {'queries/s':>10} {'sent':>9} {'lost':>6} {'latency ms':>10} "
    head += f"{'LB CPU s':>9} {'LB CPU us/query':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cpu = f"{r['cpu_us_per_query']:.2f}" if r["name"] != "direct" else "-"
        lines.append(
            f"{r['name']:<8} {r['qps']:>10.0f} {r['sent']:>9} {r['lost']:>6} "
            f"{r['latency_ms']:>10.3f} {r['cpu_s']:>9.2f} {cpu:>15}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of dnsperf per target")
    parser.add_argument("--workers", type=int, default=1, help="balancer worker processes")
    parser.add_argument("--server-threads", type=int, default=2, help="unbound threads")
    parser.add_argument("--clients", type=int, default=8, help="dnsperf client sockets (-c)")
    parser.add_argument("--outstanding", type=int, default=200, help="queries in flight (-q)")
    parser.add_argument("--rate", type=int, default=0, help="queries/s cap (-Q); 0: as fast")
    parser.add_argument(
        "--targets", default="direct,fastlb,nginx", help="comma-separated, in run order"
    )
    args = parser.parse_args()
    for program in ("unbound", "dnsperf"):
        if not shutil.which(program):
            print(f"{program} is not installed (apt-get install {program})", file=sys.stderr)
            return 2
    targets = args.targets.split(",")
    missing = harness.fastlb_missing() or ("nginx" in targets and harness.nginx_missing())
    if missing:
        print(missing, file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlb-udp-") as name, Processes(Path(name)) as procs:
        tmp = Path(name)
        queries = tmp / "queries"
        queries.write_text(f"who.{ZONE} A\n{ZONE} A\n" * 500)
        server = start_unbound(procs, tmp, args.server_threads)
        for target in targets:
            if target == "direct":
                rows.append(measure("direct", server, [], queries, args))
                continue
            start = start_fastlb if target == "fastlb" else start_nginx
            running = start(procs, tmp, server, args.workers)
            rows.append(measure(target, running.port, running.refresh_pids(), queries, args))
            procs.stop(running.proc)
    print(
        f"dnsperf -c {args.clients} -q {args.outstanding} -l {args.duration}"
        + (f" -Q {args.rate}" if args.rate else "")
        + f"; balancers with {args.workers} worker(s); unbound with {args.server_threads} thread(s)"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    harness.run_script(main)
