"""Side-by-side benchmark: fastlb against HAProxy and nginx, with no balancer as the physical limit.

The same local HTTP backends serve every run; each balancer in turn listens on the same port and
wrk drives five workloads through it:

  keepalive  small HTTP requests over keep-alive connections         requests/s, p50/p99 latency
  newconn    a new TCP connection per request (Connection: close)    connections/s
  bulk       1 MiB responses                                         MB/s
  paced      small requests at the same, moderate load for everyone  p99 latency
  churn      a new connection per request at that same, moderate load  p99 latency

Two more, on request (``--workloads proxy,sni``), compare only direct, fastlb and HAProxy, each
with its own balancer configuration and backends:

  proxy      a new connection per request with PROXY v2 on both hops:  connections/s
             wrk -> fixed HAProxy (send-proxy-v2) -> balancer -> nginx (proxy_protocol)
  sni        a new TLS connection (full handshake) per request,        handshakes/s
             routed by SNI to one of two pools of nginx HTTPS backends

Rounds are interleaved (every balancer once per round, then the next round) and the table gives
medians with min and max, the ratio of each median to fastlb's and to direct's, and the balancer's
CPU time (user + system of all its processes, children included) per request. Results go to a JSON
file and a bar chart next to it.

    python loadtests/compare.py                   # full run, about 6 minutes on 2 cores
    python loadtests/compare.py --quick           # about 1 minute sanity run
    python loadtests/compare.py --workloads proxy,sni --quick   # under a minute
    python loadtests/compare.py --many-backends 1000 --quick    # fastlb, N backends against 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import many_backends
from backend import (
    BULK_PATH,
    BULK_SIZE,
    Backends,
    proxy_body,
    small_body,
    start_http_backends,
    start_nginx_backends,
)
from harness import (
    HERE,
    INSTALL_HINT,
    LOOPBACK,
    HarnessError,
    Processes,
    Running,
    cpu_seconds,
    environment,
    fastlb_missing,
    free_port,
    haproxy_missing,
    log_tail,
    nginx_missing,
    run_script,
    run_wrk,
    start_fastlb,
    start_fastlb_sni,
    start_haproxy,
    start_haproxy_sni,
    start_nginx_stream,
    write_wrk_script,
    wrk_command,
)
from rich.console import Console
from rich.table import Table

BALANCERS = ["direct", "fastlb", "haproxy", "haproxy-splice", "nginx"]
BASELINE = "fastlb"
# Each setup is a balancer configuration with its own backends, and the balancers it compares.
SETUP_BALANCERS = {
    "plain": BALANCERS,
    "proxy": ["direct", "fastlb", "haproxy"],
    "sni": ["direct", "fastlb", "haproxy"],
}
FASTLB_PROXY_ARGS = ["--accept-proxy", "127.0.0.0/8", "--send-proxy", "v2"]
SNI_NAME = "bench.example.test"  # the name wrk sends: pool web
OTHER_NAME = "other.example.test"  # matches *.example.test: pool other, checked, not measured
SNI_ROUTES = {SNI_NAME: "web", "*.example.test": "other"}
SNI_DEFAULT_POOL = "other"
# A fixed width when piped keeps the tables readable in logs and notes.
console = Console(width=None if sys.stdout.isatty() else 140)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    path: str
    metric: str  # the headline figure's unit
    close: bool = False
    paced: bool = False
    setup: str = "plain"  # a key of SETUP_BALANCERS

    def headline(self, run: dict) -> float:
        if self.metric == "MB/s":
            return run["megabytes_per_s"]
        if self.paced:
            return run["p99_ms"]
        return run["requests_per_s"]

    @property
    def higher_is_better(self) -> bool:
        return not self.paced


WORKLOADS = {
    w.name: w
    for w in [
        Workload("keepalive", "small requests, keep-alive", "/", "req/s"),
        Workload("newconn", "new connection per request", "/", "conn/s", close=True),
        Workload("bulk", "1 MiB responses", BULK_PATH, "MB/s"),
        Workload("paced", "p99 latency at the same load", "/", "p99 ms", paced=True),
        Workload(
            "churn", "new connections, p99 at the same load", "/", "p99 ms", close=True, paced=True
        ),
        Workload(
            "proxy", "PROXY v2 in and out, new connection", "/", "conn/s", close=True, setup="proxy"
        ),
        Workload("sni", "TLS routed by SNI, new handshake", "/", "hs/s", close=True, setup="sni"),
    ]
}
CLASSIC = [name for name, w in WORKLOADS.items() if w.setup == "plain"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1, help="workers/threads for every balancer")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--paced-duration", type=int, default=3, help="seconds per paced run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per start")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--bulk-connections", type=int, default=8, help="wrk connections, bulk")
    parser.add_argument("--paced-connections", type=int, default=20, help="wrk connections, paced")
    parser.add_argument(
        "--paced-delay-ms", type=int, default=5, help="pause before each paced request"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--backends", type=int, default=2, help="number of backends")
    parser.add_argument("--backend-kind", choices=["auto", "nginx", "python"], default="auto")
    parser.add_argument(
        "--balancers", default=",".join(BALANCERS), help=f"comma-separated, from {BALANCERS}"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(CLASSIC),
        help=f"comma-separated, from {list(WORKLOADS)} (default {','.join(CLASSIC)})",
    )
    parser.add_argument(
        "--fastlb-args", default="", help="extra `fastlb run` flags, e.g. '--splice always'"
    )
    parser.add_argument("--out", type=Path, help="result folder (default loadtests/results/...)")
    parser.add_argument(
        "--many-backends",
        type=int,
        default=0,
        metavar="N",
        help="fastlb only: CPU per new connection with N backends (one nginx on N ports) "
        "against 2, per algorithm, beside a plain client's cost of N ports",
    )
    parser.add_argument(
        "--algorithms", default="", help="with --many-backends: comma-separated (default all)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="sanity run: 1 round of 2 s runs, about 1 minute"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.paced_duration, args.warmup = 1, 2, 2, 1
    args.balancers = [b.strip() for b in args.balancers.split(",") if b.strip()]
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.balancers) - set(BALANCERS)
    if unknown:
        parser.error(f"unknown balancers: {', '.join(sorted(unknown))}")
    if set(names) - set(WORKLOADS):
        parser.error(f"unknown workloads: {', '.join(sorted(set(names) - set(WORKLOADS)))}")
    args.workloads = [WORKLOADS[name] for name in names]
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if args.many_backends and args.many_backends < 3:
        parser.error("--many-backends must be at least 3")
    if args.out is None:
        args.out = HERE / "results" / time.strftime("compare-%Y%m%d-%H%M%S")
    return args


def available_balancers(names: list[str]) -> list[str]:
    checks = {
        "fastlb": fastlb_missing,
        "haproxy": haproxy_missing,
        "haproxy-splice": haproxy_missing,
        "nginx": nginx_missing,
    }
    kept = []
    for name in names:
        missing = checks[name]() if name in checks else None
        if missing:
            console.print(f"[yellow]skipping {name}: {missing}[/]")
        else:
            kept.append(name)
    return kept


def start_plain_balancer(
    name: str, procs: Processes, port: int, backends: Backends, args, tmp: Path
) -> Running:
    if name == "direct":
        return Running("direct", backends.ports[0])
    if name == "fastlb":
        return start_fastlb(
            procs, port, backends.ports, args.workers, extra_args=shlex.split(args.fastlb_args)
        )
    if name in ("haproxy", "haproxy-splice"):
        splice = name == "haproxy-splice"
        return start_haproxy(procs, port, backends.ports, args.workers, tmp, splice=splice)
    return start_nginx_stream(procs, port, backends.ports, args.workers, tmp)


def missing_for_setup(setup: str) -> str | None:
    """Why a setup other than plain cannot run here, if it cannot."""
    if setup == "plain":
        return None
    if not shutil.which("nginx"):
        return f"its backends are nginx, which is not installed ({INSTALL_HINT})"
    if setup == "proxy" and haproxy_missing():
        return f"its first hop is HAProxy, which is not installed ({INSTALL_HINT})"
    if setup == "sni" and not shutil.which("openssl"):
        return "its certificate is made with openssl, which is missing (apt-get install openssl)"
    return None


def check_responses(port: int, backends: Backends, paths: list[str]) -> str | None:
    """Fetch each path twice over one keep-alive connection through the balancer, then once
    more with ``Connection: close``; return what is wrong, if anything."""
    expected = {small_body(i) for i in range(1, len(backends.ports) + 1)}
    requests = [(path, {}) for path in paths] * 2 + [(paths[-1], {"Connection": "close"})]
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        for path, headers in requests:
            connection.request("GET", path, headers=headers)
            body = connection.getresponse().read()
            if path == BULK_PATH and len(body) != BULK_SIZE:
                return f"GET {path} returned {len(body)} bytes, expected {BULK_SIZE}"
            if path == "/" and body not in expected:
                return f"GET / returned {body[:80]!r}, expected one of {sorted(expected)}"
    except (OSError, http.client.HTTPException) as exc:
        return f"GET {path} {headers or ''} through the balancer failed: {exc!r}"
    finally:
        connection.close()
    return None


def check_proxy_responses(port: int, backends: Backends) -> str | None:
    """Through the first hop and the balancer, ``GET /`` twice over one keep-alive connection
    and once more with ``Connection: close``: each answer must name this client's own address,
    which reaches the backend only if both hops sent on the address their PROXY header gave."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    headers: dict[str, str] = {}
    try:
        connection.connect()
        client = "{}:{}".format(*connection.sock.getsockname())
        expected = {proxy_body(i, client) for i in range(1, len(backends.ports) + 1)}
        for headers in ({}, {}, {"Connection": "close"}):
            connection.request("GET", "/", headers=headers)
            body = connection.getresponse().read()
            if body not in expected:
                return f"GET / returned {body[:80]!r}, expected one of {sorted(expected)}"
    except (OSError, http.client.HTTPException) as exc:
        return f"GET / {headers or ''} through the first hop and the balancer failed: {exc!r}"
    finally:
        connection.close()
    return None


def tls_get(port: int, server_name: str) -> bytes:
    """The body of ``GET /`` over a new TLS connection to loopback that sends ``server_name``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the backends' certificate is self-signed
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(
                f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
            )
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    return reply.partition(b"\r\n\r\n")[2]


def check_sni_responses(port: int, pools: dict[str, list[int]], routed: bool) -> str | None:
    """Over new TLS connections, each name twice: SNI_NAME must reach a backend of pool web,
    OTHER_NAME one of pool other (through its wildcard route). ``routed`` is False for direct,
    where one backend answers whatever the name."""
    numbers, first = {}, 1  # the TLS backends are numbered 1, 2, ... in the pools' order
    for name, ports in pools.items():
        numbers[name] = range(first, first + len(ports))
        first += len(ports)
    if routed:
        expected = {
            SNI_NAME: {small_body(i) for i in numbers[SNI_ROUTES[SNI_NAME]]},
            OTHER_NAME: {small_body(i) for i in numbers[SNI_ROUTES["*.example.test"]]},
        }
    else:
        expected = {SNI_NAME: {small_body(1)}}
    for server_name, bodies in expected.items():
        for _ in range(2):
            try:
                body = tls_get(port, server_name)
            except OSError as exc:
                return f"GET / over TLS with SNI {server_name} failed: {exc!r}"
            if body not in bodies:
                return f"SNI {server_name}: GET / returned {body[:80]!r}, expected {sorted(bodies)}"
    return None


class Benchmark:
    def __init__(self, args, procs: Processes, tmp: Path, setups: list[str]):
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.setups = setups
        self.port = free_port()
        self.plain_script = write_wrk_script(tmp, delay=False)
        self.delay_script = write_wrk_script(tmp, delay=True)
        self.loopback_script = write_wrk_script(tmp, delay=False, loopback=True)
        self.backends: Backends | None = None  # plain HTTP
        self.proxy_backends: Backends | None = None  # HTTP after a PROXY header
        self.front: Running | None = None  # the first hop of proxy, to the balancer
        self.front_direct: Running | None = None  # the same first hop, to the backends
        self.sni_pools: dict[str, list[int]] = {}  # HTTPS backends
        self.runs: list[dict] = []
        self.problems: list[str] = []

    def start_services(self) -> None:
        """The backends of every setup, and proxy's first hop: they serve all the rounds."""
        a, procs, tmp = self.args, self.procs, self.tmp
        if "plain" in self.setups:
            self.backends = start_http_backends(procs, a.backends, tmp, a.backend_kind)
        if "proxy" in self.setups:
            self.proxy_backends = start_nginx_backends(procs, a.backends, tmp, "proxy")
            ports = self.proxy_backends.ports
            # The same HAProxy, one thread, sends PROXY v2 to the balancer under test, or for
            # direct straight to the backends; its CPU time is not counted.
            self.front = start_haproxy(
                procs, free_port(), [self.port], 1, tmp, send_proxy=True, name="haproxy-front"
            )
            self.front_direct = start_haproxy(
                procs, free_port(), ports, 1, tmp, send_proxy=True, name="haproxy-front-direct"
            )
        if "sni" in self.setups:
            tls = start_nginx_backends(procs, 3, tmp, "tls")
            self.sni_pools = {"web": tls.ports[:2], "other": tls.ports[2:]}

    def start_balancer(self, name: str, setup: str) -> Running:
        a, procs, port, tmp = self.args, self.procs, self.port, self.tmp
        extra = shlex.split(a.fastlb_args)
        if setup == "proxy":
            ports = self.proxy_backends.ports
            if name == "direct":
                return Running("direct", self.front_direct.port)
            if name == "fastlb":
                extra = [*FASTLB_PROXY_ARGS, *extra]
                return start_fastlb(
                    procs, port, ports, a.workers, extra_args=extra, log_name="fastlb-proxy"
                )
            return start_haproxy(
                procs,
                port,
                ports,
                a.workers,
                tmp,
                accept_proxy=True,
                send_proxy=True,
                name="haproxy-proxy",
            )
        if setup == "sni":
            pools = self.sni_pools
            if name == "direct":
                return Running("direct", pools[SNI_ROUTES[SNI_NAME]][0])
            if name == "fastlb":
                return start_fastlb_sni(
                    procs, port, pools, SNI_DEFAULT_POOL, SNI_ROUTES, a.workers, tmp, extra
                )
            return start_haproxy_sni(
                procs, port, pools, SNI_DEFAULT_POOL, SNI_ROUTES, a.workers, tmp
            )
        return start_plain_balancer(name, procs, port, self.backends, a, tmp)

    def entry_port(self, setup: str, running: Running) -> int:
        """Where wrk connects: proxy's first hop in front of a balancer, else the balancer."""
        if setup == "proxy" and running.name != "direct":
            return self.front.port
        return running.port

    def check(self, setup: str, running: Running) -> str | None:
        port = self.entry_port(setup, running)
        if setup == "proxy":
            return check_proxy_responses(port, self.proxy_backends)
        if setup == "sni":
            return check_sni_responses(port, self.sni_pools, routed=running.name != "direct")
        paths = sorted({w.path for w in self.args.workloads if w.setup == setup})
        return check_responses(port, self.backends, paths)

    def wrk_for(self, workload: Workload, port: int, duration: int) -> list[str]:
        a = self.args
        url = f"http://{LOOPBACK}:{port}{workload.path}"
        if workload.paced:
            script, connections, delay_ms = self.delay_script, a.paced_connections, a.paced_delay_ms
        else:
            script, delay_ms = self.plain_script, 0
            connections = a.bulk_connections if workload.metric == "MB/s" else a.connections
        if workload.setup == "sni":
            # The name goes out as SNI; the script makes wrk connect to loopback all the same.
            url, script = f"https://{SNI_NAME}:{port}{workload.path}", self.loopback_script
        return wrk_command(
            url, duration, connections, a.threads, script, close=workload.close, delay_ms=delay_ms
        )

    def problem(self, text: str, running: Running | None = None) -> None:
        if running is not None and running.proc is not None:
            text += f"\n  command: {shlex.join(running.proc.args)}\n  log tail:\n"
            text += "\n".join("    " + line for line in log_tail(running.proc).splitlines())
        self.problems.append(text)
        console.print(f"[red]{text}[/]")

    def round(self, number: int, balancers: list[str]) -> None:
        for setup in self.setups:
            workloads = [w for w in self.args.workloads if w.setup == setup]
            for name in balancers:
                if name in SETUP_BALANCERS[setup]:
                    self.run_balancer(number, name, setup, workloads)

    def run_balancer(self, number: int, name: str, setup: str, workloads: list[Workload]) -> None:
        try:
            running = self.start_balancer(name, setup)
        except HarnessError as exc:
            self.problem(f"round {number}: {name} ({setup}) did not start: {exc}")
            return
        try:
            self.measure_all(number, running, setup, workloads)
        except HarnessError as exc:
            self.problem(f"round {number}: {name}: {exc}", running)
        finally:
            if running.proc is not None:
                self.procs.stop(running.proc)

    def measure_all(
        self, number: int, running: Running, setup: str, workloads: list[Workload]
    ) -> None:
        wrong = self.check(setup, running)
        if wrong:
            self.problem(f"round {number}: {running.name} ({setup}): {wrong}", running)
            return
        if self.args.warmup > 0:
            warm = WORKLOADS["keepalive"] if setup == "plain" else workloads[0]
            warmup = self.wrk_for(warm, self.entry_port(setup, running), self.args.warmup)
            run_wrk(warmup, timeout=self.args.warmup + 30)
        for workload in workloads:
            self.measure(number, running, workload)
            if running.proc is not None and running.proc.poll() is not None:
                self.problem(
                    f"round {number}: {running.name} exited with status "
                    f"{running.proc.returncode} during {workload.name}",
                    running,
                )
                return

    def measure(self, number: int, running: Running, workload: Workload) -> None:
        duration = self.args.paced_duration if workload.paced else self.args.duration
        cmd = self.wrk_for(workload, self.entry_port(workload.setup, running), duration)
        pids_before = running.refresh_pids()
        cpu_before = cpu_seconds(pids_before)
        result = run_wrk(cmd, timeout=duration + 60)
        pids_after = running.refresh_pids()
        cpu_after = cpu_seconds(pids_after)
        cpu = main_cpu = cpu_per_request = None
        if running.proc is not None:
            cpu = sum(t - cpu_before.get(pid, 0.0) for pid, t in cpu_after.items())
            main = running.proc.pid  # fastlb's supervisor, nginx's master
            main_cpu = cpu_after.get(main, 0.0) - cpu_before.get(main, 0.0)
            if result.requests:
                cpu_per_request = cpu / result.requests * 1e6
        run = {
            "round": number,
            "balancer": running.name,
            "workload": workload.name,
            "requests": result.requests,
            "bytes": result.bytes,
            "duration_s": result.duration_s,
            "requests_per_s": result.requests_per_s,
            "megabytes_per_s": result.megabytes_per_s,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "max_ms": result.max_ms,
            "errors": result.errors,
            "cpu_s": cpu,
            "main_process_cpu_s": main_cpu,
            "cpu_us_per_request": cpu_per_request,
        }
        run["value"] = workload.headline(run)
        self.runs.append(run)
        cpu_text = (
            f"{run['cpu_us_per_request']:.1f} µs CPU/req" if run["cpu_us_per_request"] else ""
        )
        console.print(
            f"  round {number} {running.name:<15} {workload.name:<10} "
            f"{run['value']:>10,.1f} {workload.metric:<7} p50 {result.p50_ms:6.2f} ms "
            f"p99 {result.p99_ms:6.2f} ms  {cpu_text}"
        )
        if not result.requests:
            self.problem(
                f"round {number}: {running.name} {workload.name}: no response completed in "
                f"{duration} s ({result.bytes} bytes arrived)\n  wrk: {shlex.join(cmd)}",
                running,
            )
        if result.errors:
            self.problem(
                f"round {number}: {running.name} {workload.name}: wrk errors {result.errors} "
                f"in {result.requests} requests\n  wrk: {shlex.join(cmd)}",
                running,
            )
        if set(pids_before) - set(pids_after):
            self.problem(
                f"round {number}: {running.name} {workload.name}: processes "
                f"{sorted(set(pids_before) - set(pids_after))} exited during the run",
                running,
            )


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict], balancers: list[str], workloads: list[Workload]) -> dict:
    summary: dict = {}
    for workload in workloads:
        rows = {}
        for name in balancers:
            mine = [r for r in runs if r["balancer"] == name and r["workload"] == workload.name]
            if not mine:
                continue
            cpu = [r["cpu_us_per_request"] for r in mine if r["cpu_us_per_request"] is not None]
            rows[name] = {
                "value": spread([r["value"] for r in mine]),
                "requests_per_s": spread([r["requests_per_s"] for r in mine]),
                "p50_ms": spread([r["p50_ms"] for r in mine]),
                "p99_ms": spread([r["p99_ms"] for r in mine]),
                "cpu_us_per_request": spread(cpu) if cpu else None,
                "errors": sum(sum(r["errors"].values()) for r in mine),
                "runs": len(mine),
            }
        for reference in (BASELINE, "direct"):
            if reference in rows:
                base = rows[reference]["value"]["median"]
                for row in rows.values():
                    row[f"ratio_to_{reference}"] = row["value"]["median"] / base if base else None
        summary[workload.name] = rows
    return summary


def versus_haproxy(summary: dict, workloads: list[Workload]) -> list[dict]:
    """fastlb against HAProxy: each figure against the better of HAProxy's copy and splice modes."""
    verdicts = []
    for workload in workloads:
        rows = summary.get(workload.name, {})
        peers = {n: rows[n] for n in ("haproxy", "haproxy-splice") if n in rows}
        if BASELINE not in rows or not peers:
            continue
        mine = rows[BASELINE]
        pick = max if workload.higher_is_better else min
        best = pick(peers, key=lambda n: peers[n]["value"]["median"])
        value_ratio = mine["value"]["median"] / peers[best]["value"]["median"]
        cpus = [
            p["cpu_us_per_request"]["median"] for p in peers.values() if p["cpu_us_per_request"]
        ]
        cpu_ratio = None
        if mine["cpu_us_per_request"] and cpus:
            cpu_ratio = mine["cpu_us_per_request"]["median"] / min(cpus)
        p99_ratio = mine["p99_ms"]["median"] / min(p["p99_ms"]["median"] for p in peers.values())
        verdicts.append(
            {
                "workload": workload.name,
                "metric": workload.metric,
                "best_haproxy": best,
                "fastlb_to_best_haproxy": value_ratio,
                "met": value_ratio >= 1.0 if workload.higher_is_better else value_ratio <= 1.0,
                "cpu_per_request_to_lowest_haproxy": cpu_ratio,
                "p99_to_lowest_haproxy": p99_ratio,
            }
        )
    return verdicts


def cpu_versus_haproxy(summary: dict, workloads: list[Workload]) -> list[dict]:
    """The headline of proxy and sni: fastlb's CPU time per connection against HAProxy's."""
    ratios = []
    for workload in workloads:
        rows = summary.get(workload.name, {})
        if workload.setup == "plain" or BASELINE not in rows or "haproxy" not in rows:
            continue
        mine, theirs = rows[BASELINE]["cpu_us_per_request"], rows["haproxy"]["cpu_us_per_request"]
        if not mine or not theirs:
            continue
        ratio = mine["median"] / theirs["median"]
        ratios.append(
            {
                "workload": workload.name,
                "fastlb_cpu_us_per_connection": mine["median"],
                "haproxy_cpu_us_per_connection": theirs["median"],
                "fastlb_to_haproxy": ratio,
                "met": ratio <= 1.0,
            }
        )
    return ratios


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def workload_table(workload: Workload, rows: dict) -> tuple[str, list[str], list[list[str]]]:
    """Title, column names and cells of one workload's table (for the terminal and Markdown)."""
    digits = 2 if workload.paced else (1 if workload.metric == "MB/s" else 0)
    title = f"{workload.name}: {workload.title} ({workload.metric}, median of runs)"
    columns = [
        "balancer",
        workload.metric,
        "min – max",
        "× fastlb",
        "× direct",
        "CPU µs/req" if workload.setup == "plain" else "CPU µs/conn",
        "p50 ms",
        "p99 ms",
        "errors",
    ]
    cells = []
    for name, row in rows.items():
        cpu = row["cpu_us_per_request"]
        cells.append(
            [
                name,
                fmt(row["value"]["median"], digits),
                f"{fmt(row['value']['min'], digits)} – {fmt(row['value']['max'], digits)}",
                fmt(row.get("ratio_to_fastlb"), 2),
                fmt(row.get("ratio_to_direct"), 2),
                fmt(cpu["median"] if cpu else None),
                fmt(row["p50_ms"]["median"], 2),
                fmt(row["p99_ms"]["median"], 2),
                str(row["errors"]),
            ]
        )
    return title, columns, cells


def verdict_table(verdicts: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    title = "fastlb against HAProxy's better mode (copy or splice), medians"
    columns = ["workload", "fastlb ÷ best haproxy", "best", "target", "CPU/req ÷", "p99 ÷"]
    cells = [
        [
            v["workload"],
            fmt(v["fastlb_to_best_haproxy"], 2),
            v["best_haproxy"],
            "met" if v["met"] else "missed",
            fmt(v["cpu_per_request_to_lowest_haproxy"], 2),
            fmt(v["p99_to_lowest_haproxy"], 2),
        ]
        for v in verdicts
    ]
    return title, columns, cells


def cpu_table(ratios: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    title = "CPU per connection, fastlb ÷ HAProxy (target ≤ 1), medians"
    columns = ["workload", "fastlb µs/conn", "haproxy µs/conn", "fastlb ÷ haproxy", "target"]
    cells = [
        [
            r["workload"],
            fmt(r["fastlb_cpu_us_per_connection"]),
            fmt(r["haproxy_cpu_us_per_connection"]),
            fmt(r["fastlb_to_haproxy"], 2),
            "met" if r["met"] else "missed",
        ]
        for r in ratios
    ]
    return title, columns, cells


def tables(
    summary: dict, workloads: list[Workload], verdicts: list[dict], cpu_ratios: list[dict]
) -> list[tuple]:
    found = [workload_table(w, summary[w.name]) for w in workloads if summary.get(w.name)]
    found += [verdict_table(verdicts)] if verdicts else []
    return found + ([cpu_table(cpu_ratios)] if cpu_ratios else [])


def print_tables(all_tables: list[tuple]) -> None:
    for title, columns, cells in all_tables:
        table = Table(title=title)
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in cells:
            style = "bold" if row[0] == BASELINE else None
            if "missed" in row:
                row = [f"[red]{c}[/]" if c == "missed" else c for c in row]
            table.add_row(*row, style=style)
        console.print(table)
    console.print(
        "CPU µs/req (µs/conn): user+system time of all the balancer's processes over the run "
        "÷ requests. CPU/req ÷ and p99 ÷ compare with the lower of HAProxy's two modes."
    )


def markdown(all_tables: list[tuple], record: dict) -> str:
    env = record["environment"]
    lines = [
        f"Run {env['date']} on {env['cpus']} × {env['cpu']}, Linux {env['kernel']}, "
        f"fastlb {env['fastlb']} ({env['git']}), {env['haproxy']}, {env['nginx']}, {env['wrk']}; "
        f"{record['backend']} backends.",
        "",
        f"    {record['command']}",
        "",
    ]
    for title, columns, cells in all_tables:
        lines += [f"**{title}**", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, workloads: list[Workload], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        console.print("[yellow]no chart: matplotlib is missing (pip install matplotlib)[/]")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [w for w in workloads if summary.get(w.name)]
    fig, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown), 7), squeeze=False)
    for column, workload in enumerate(shown):
        rows = summary[workload.name]
        for row_index, key, label in (
            (0, "value", workload.metric),
            (1, "cpu_us_per_request", "CPU µs per request"),
        ):
            ax = axes[row_index][column]
            names = [n for n, r in rows.items() if r[key]]
            medians = [rows[n][key]["median"] for n in names]
            below = [m - rows[n][key]["min"] for n, m in zip(names, medians, strict=True)]
            above = [rows[n][key]["max"] - m for n, m in zip(names, medians, strict=True)]
            colors = ["tab:orange" if n == BASELINE else "tab:blue" for n in names]
            ax.bar(names, medians, yerr=[below, above], capsize=3, color=colors)
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=30)
            if row_index == 0:
                better = "higher" if workload.higher_is_better else "lower"
                ax.set_title(f"{workload.title}\n({better} is better)")
    fig.suptitle("fastlb vs HAProxy vs nginx: medians, bars span min–max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    args = parse_args()
    if not shutil.which("wrk"):
        console.print(f"[red]compare.py needs wrk ({INSTALL_HINT})[/]")
        return 2
    if args.many_backends:
        return many_backends.run(args, console)
    balancers = available_balancers(args.balancers)
    setups = []
    for setup in SETUP_BALANCERS:
        names = [w.name for w in args.workloads if w.setup == setup]
        missing = missing_for_setup(setup) if names else None
        if missing:
            console.print(f"[yellow]skipping {', '.join(names)}: {missing}[/]")
            args.workloads = [w for w in args.workloads if w.setup != setup]
        elif names:
            setups.append(setup)
            if setup != "plain":
                compared = [b for b in balancers if b in SETUP_BALANCERS[setup]]
                console.print(f"{', '.join(names)}: {', '.join(compared)} only")
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastlb-compare-") as tmp_name:
        tmp = Path(tmp_name)
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        with Processes(logs) as procs:
            bench = Benchmark(args, procs, tmp, setups)
            bench.start_services()
            backends = bench.backends
            if backends is not None:
                console.print(f"{backends.kind} backends on ports {backends.ports}")
            if bench.proxy_backends is not None:
                console.print(
                    f"proxy: nginx proxy_protocol backends on ports {bench.proxy_backends.ports}, "
                    f"first hop HAProxy on {bench.front.port} (to the balancer) and "
                    f"{bench.front_direct.port} (to the backends)"
                )
            if bench.sni_pools:
                console.print(f"sni: nginx HTTPS backends, pools {bench.sni_pools}")
            console.print(
                f"balancers on port {LOOPBACK}:{bench.port}; {args.workers} worker(s) each; "
                f"{args.rounds} round(s) of {', '.join(w.name for w in args.workloads)}"
            )
            if backends is not None and backends.kind != "nginx":
                console.print(
                    "[yellow]the Python backend may be the bottleneck; install nginx for "
                    "meaningful numbers[/]"
                )
            for number in range(1, args.rounds + 1):
                console.print(f"round {number}/{args.rounds}")
                bench.round(number, balancers)
    summary = summarize(bench.runs, balancers, args.workloads)
    verdicts = versus_haproxy(summary, args.workloads)
    cpu_ratios = cpu_versus_haproxy(summary, args.workloads)
    all_tables = tables(summary, args.workloads, verdicts, cpu_ratios)
    print_tables(all_tables)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workloads")}
    settings["workloads"] = [w.name for w in args.workloads]
    record = {
        "environment": env,
        "settings": settings,
        "command": shlex.join(["python", *sys.argv]),
        "backend": backends.kind if backends is not None else "nginx",
        "workloads": {w.name: asdict(w) for w in args.workloads},
        "summary": summary,
        "versus_haproxy": verdicts,
        "cpu_per_connection_versus_haproxy": cpu_ratios,
        "problems": bench.problems,
        "runs": bench.runs,
        "elapsed_s": time.monotonic() - started,
    }
    json_path = args.out / "compare.json"
    json_path.write_text(json.dumps(record, indent=2, default=str))
    markdown_path = args.out / "compare.md"
    markdown_path.write_text(markdown(all_tables, record))
    chart = args.out / "compare.png"
    console.print(f"results: {json_path}, {markdown_path}")
    if plot(summary, args.workloads, chart):
        console.print(f"chart:   {chart}")
    if bench.problems:
        console.print(f"[red]{len(bench.problems)} problem(s); see above and {json_path}[/]")
        return 1
    return 0


if __name__ == "__main__":
    run_script(main)
