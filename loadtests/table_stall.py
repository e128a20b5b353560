"""Keep-alive latency while one of 1,000 backends flaps, against the same traffic at rest.

    python loadtests/table_stall.py [--algorithms roundrobin,consistent,maglev] [--rounds 9]
                                    [--duration 2] [--connections 8] [--delay-ms 1]
                                    [--interval 0.1] [--backends 1000] [--change health]

One worker process (fastlb.worker.run, as the supervisor starts it) with this script as its
supervisor, in front of nginx listening on --backends ports. For each algorithm wrk runs
keep-alive GET /, each connection waiting --delay-ms between requests (a latency test: a
saturated machine would measure its run queue instead), in --rounds rounds of two runs: at
rest, then while the script sends the worker a table every --interval seconds with the last
backend marked down and up in turn (--change weight: its weight set to 2 and back to 1, which
makes a hash ring or Maglev table be built anew each time, where a health change reuses it), as
the supervisor sends it: a table-change of one entry. The table shows the median p50 and
p99 of each kind of run, the slowest request of all (the worst stall a request saw) and the
median of each round's ratio of the p99s (the two runs of a round back to back, so that load
from elsewhere on a shared machine spoils both alike); the goal is at most 1.5. Results go to
loadtests/results/ as JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
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


def table(ports: list[int]) -> msg.Table:
    """Version 1, as WORKER starts with it: every backend up."""
    entries = [msg.BackendEntry(i, LOOPBACK, port, 1, True, False) for i, port in enumerate(ports)]
    return msg.Table(1, [msg.PoolTable(0, entries)])


def flapped(last: msg.Table, version: int, change: str, turn: bool) -> msg.Table:
    """last with its last backend marked down (turn) or up, or given weight 2 (turn) or 1, made
    as the supervisor makes it: the other entries are the same objects, only that one is new."""
    entries = list(last.pools[0].backends)
    if change == "health":
        entries[-1] = replace(entries[-1], up=not turn)
    else:
        entries[-1] = replace(entries[-1], weight=2 if turn else 1)
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
        self.sent = table(ports)  # what WORKER starts with
        threading.Thread(target=self.drain_reports, daemon=True).start()
        wait_for_port(self.port, self.proc)

    def drain_reports(self) -> None:
        try:
            while self.control.recv(65536):
                pass
        except OSError:
            pass

    def send_table(self, change: str, turn: bool) -> None:
        """As the supervisor sends it: the change from the last table sent."""
        self.version += 1
        new = flapped(self.sent, self.version, change, turn)
        self.control.sendall(msg.encode(msg.table_change(self.sent, new) or new))
        self.sent = new

    def close(self) -> None:
        self.control.close()
        self.listener.close()


def flap(worker: StandaloneWorker, change: str, interval: float, stop: threading.Event):
    turn = True
    while not stop.wait(interval):
        worker.send_table(change, turn)
        turn = not turn


def measure(procs, algorithm, ports, args, script) -> dict:
    """--rounds pairs of runs, at rest then flapping, taken in turns so that a spell of load
    from other processes on a shared machine spoils one run of each kind, not all of one."""
    worker = StandaloneWorker(procs, algorithm, ports)
    url = f"http://{LOOPBACK}:{worker.port}/"
    cmd = wrk_command(url, args.duration, args.connections, 1, script, delay_ms=args.delay_ms)
    rests, flaps = [], []
    try:
        run_wrk(wrk_command(url, 1, args.connections, 1, script, delay_ms=args.delay_ms), 30)
        for _ in range(args.rounds):
            rests.append(run_wrk(cmd, args.duration + 30))
            stop = threading.Event()
            flapper = threading.Thread(target=flap, args=(worker, args.change, args.interval, stop))
            flapper.start()
            try:
                flaps.append(run_wrk(cmd, args.duration + 30))
            finally:
                stop.set()
                flapper.join()
        tables = worker.version - 1
    finally:
        worker.close()
        procs.stop(worker.proc)
    summary = {
        kind: {
            "p50_ms": statistics.median([r.p50_ms for r in runs]),
            "p99_ms": statistics.median([r.p99_ms for r in runs]),
            "max_ms": max(r.max_ms for r in runs),
        }
        for kind, runs in (("rest", rests), ("flapping", flaps))
    }
    return summary | {
        "runs": {"rest": [r.__dict__ for r in rests], "flapping": [r.__dict__ for r in flaps]},
        "tables_sent": tables,
        # Each round's flapping p99 over its own rest p99, the two runs back to back: a spell
        # of load from elsewhere on a shared machine spoils a round's two runs alike.
        "p99_ratio": statistics.median(
            f.p99_ms / r.p99_ms for r, f in zip(rests, flaps, strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="roundrobin,consistent,maglev")
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=9, help="runs at rest and flapping, each")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--delay-ms", type=int, default=1, help="between requests, per connection")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between tables")
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument(
        "--change",
        choices=["health", "weight"],
        default="health",
        help="what flaps: the last backend's health, or its weight between 1 and 2",
    )
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
        f"{args.rounds} x {args.duration} s at rest and flapping in turns (medians; max: the "
        f"slowest of all; p99 x: the median of each round's ratio), one of "
        f"{args.backends} backends flapping ({args.change}) every {args.interval * 1000:.0f} ms"
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
