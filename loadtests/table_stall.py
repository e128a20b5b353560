"""Keep-alive latency while one of 1,000 backends flaps, against the same traffic at rest.

    python loadtests/table_stall.py [--algorithms roundrobin,consistent,maglev] [--duration 5]
                                    [--connections 8] [--delay-ms 1] [--interval 0.1]
                                    [--backends 1000]

One worker process (fastlb.worker.run, as the supervisor starts it) with this script as its
supervisor, in front of nginx listening on --backends ports. For each algorithm wrk runs
keep-alive GET / twice, each connection waiting --delay-ms between requests (a latency test: a
saturated machine would measure its run queue instead): at rest, then while the script sends
the worker a new table every --interval seconds with the last backend marked down and up in
turn (a health flap: every table change, a weight, an add, a remove, a reload, reaches the
worker as such a table). The table shows p50, p99 and the slowest request (the worst stall a
request saw) of both runs, and the ratio of the p99s; the goal is at most 1.5. Results go to
loadtests/results/ as JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness  # first: keeps the checkout's fastlb/ off sys.path
from backend import BULK_PATH, BULK_SIZE, nginx_http_config
from harness import (
    HERE,
    LOOPBACK,
    Processes,
    raise_nofile_limit,
    run_wrk,
    wait_for_port,
    write_wrk_script,
    wrk_command,
)

from fastlb.protocol import messages as msg

WORKER = """
import socket, sys
from fastlb import config, worker
from fastlb.protocol import messages as msg
listen_fd, control_fd, algorithm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ports = [int(p) for p in sys.argv[4].split(",")]
listener = socket.socket(fileno=listen_fd)
listener.setblocking(False)
control = socket.socket(fileno=control_fd)
values = {
    "listen": ["127.0.0.1:%d" % listener.getsockname()[1]],
    "backends": ["127.0.0.1:%d" % p for p in ports],
    "algorithm": algorithm,
}
entries = [msg.BackendEntry(i, "127.0.0.1", p, 1, True, False) for i, p in enumerate(ports)]
table = msg.Table(1, [msg.PoolTable(0, entries)])
worker.run(0, [(0, listener)], control, config.load(values, None), table)
"""


def distinct_free_ports(count: int) -> list[int]:
    """count ports free at once (ports picked one at a time may repeat)."""
    socks = [socket.create_server((LOOPBACK, 0)) for _ in range(count)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_backends(procs: Processes, count: int, tmp: Path) -> list[int]:
    """One nginx worker serving GET / on count ports."""
    prefix = tmp / "nginx-backend"
    docroot = prefix / "www"
    docroot.mkdir(parents=True)
    (docroot / BULK_PATH.lstrip("/")).write_bytes(b"x" * BULK_SIZE)
    for path in (tmp, prefix, docroot):
        path.chmod(0o755)  # nginx started by root runs its worker as nobody
    ports = distinct_free_ports(count)
    config = prefix / "nginx.conf"
    config.write_text(nginx_http_config(ports, prefix, docroot))
    cmd = ["nginx", "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
    proc = procs.start("backend-nginx", [*cmd, "-g", "daemon off;"])
    for port in ports:
        wait_for_port(port, proc)
    return ports


def table(version: int, ports: list[int], flapped_up: bool) -> msg.Table:
    last = len(ports) - 1
    entries = [
        msg.BackendEntry(i, LOOPBACK, port, 1, i != last or flapped_up, False)
        for i, port in enumerate(ports)
    ]
    return msg.Table(version, [msg.PoolTable(0, entries)])


class StandaloneWorker:
    """A worker process and its control socket; reports are read and dropped."""

    def __init__(self, procs: Processes, algorithm: str, ports: list[int]):
        self.listener = socket.create_server((LOOPBACK, 0))
        self.control, child = socket.socketpair()
        fds = (self.listener.fileno(), child.fileno())
        cmd = [sys.executable, "-P", "-c", WORKER, *map(str, fds), algorithm]
        cmd.append(",".join(map(str, ports)))
        self.proc = procs.start(f"worker-{algorithm}", cmd, pass_fds=fds)
        child.close()
        self.port = self.listener.getsockname()[1]
        self.version = 1
        threading.Thread(target=self.drain_reports, daemon=True).start()
        wait_for_port(self.port, self.proc)

    def drain_reports(self) -> None:
        try:
            while self.control.recv(65536):
                pass
        except OSError:
            pass

    def send_table(self, ports: list[int], flapped_up: bool) -> None:
        self.version += 1
        self.control.sendall(msg.encode(table(self.version, ports, flapped_up)))

    def close(self) -> None:
        self.control.close()
        self.listener.close()


def flap(worker: StandaloneWorker, ports: list[int], interval: float, stop: threading.Event):
    up = False
    while not stop.wait(interval):
        worker.send_table(ports, up)
        up = not up


def measure(procs, algorithm, ports, args, script) -> dict:
    worker = StandaloneWorker(procs, algorithm, ports)
    url = f"http://{LOOPBACK}:{worker.port}/"
    cmd = wrk_command(url, args.duration, args.connections, 1, script, delay_ms=args.delay_ms)
    try:
        run_wrk(wrk_command(url, 1, args.connections, 1, script, delay_ms=args.delay_ms), 30)
        rest = run_wrk(cmd, args.duration + 30)
        stop = threading.Event()
        flapper = threading.Thread(target=flap, args=(worker, ports, args.interval, stop))
        flapper.start()
        try:
            flapping = run_wrk(cmd, args.duration + 30)
        finally:
            stop.set()
            flapper.join()
        tables = worker.version - 1
    finally:
        worker.close()
        procs.stop(worker.proc)
    return {
        "rest": rest.__dict__,
        "flapping": flapping.__dict__,
        "tables_sent": tables,
        "p99_ratio": flapping.p99_ms / rest.p99_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="roundrobin,consistent,maglev")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--delay-ms", type=int, default=1, help="between requests, per connection")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between tables")
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="JSON result (default loadtests/results/...)")
    args = parser.parse_args()
    raise_nofile_limit()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fastlb-table-stall-") as tmp_name:
        tmp = Path(tmp_name)
        with Processes(tmp) as procs:
            ports = start_backends(procs, args.backends, tmp)
            script = write_wrk_script(tmp, delay=True)
            for algorithm in args.algorithms.split(","):
                results[algorithm] = measure(procs, algorithm, ports, args, script)
    print(
        f"keep-alive GET /, {args.connections} connections each waiting {args.delay_ms} ms, "
        f"{args.duration} s per run, one of "
        f"{args.backends} backends flapping every {args.interval * 1000:.0f} ms"
    )
    print(
        f"{'algorithm':>12} {'rest p50':>9} {'rest p99':>9} {'rest max':>9} "
        f"{'flap p50':>9} {'flap p99':>9} {'flap max':>9} {'p99 x':>6} {'tables':>7}"
    )
    for algorithm, r in results.items():
        rest, flapping = r["rest"], r["flapping"]
        print(
            f"{algorithm:>12} {rest['p50_ms']:8.3f}m {rest['p99_ms']:8.3f}m {rest['max_ms']:8.2f}m "
            f"{flapping['p50_ms']:8.3f}m {flapping['p99_ms']:8.3f}m {flapping['max_ms']:8.2f}m "
            f"{r['p99_ratio']:6.2f} {r['tables_sent']:7d}"
        )
    out = args.out or HERE / "results" / time.strftime("table-stall-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args) | {"out": str(out)}, "results": results}, indent=1)
    )
    print(f"results: {out}")


if __name__ == "__main__":
    harness.run_script(main)
