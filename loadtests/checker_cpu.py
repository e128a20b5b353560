"""The CPU cost of health checks: the real ``Checker`` in a selectors loop, as the supervisor
drives it, checking every one of ``--backends`` loopback backends once a second.

    python loadtests/checker_cpu.py                # 1,000 backends: tcp, http, http-close
    python loadtests/checker_cpu.py --backends 2000 --duration 10 --kinds http
    python loadtests/checker_cpu.py --supervisor   # a real `fastlb run` supervisor

It starts one asyncio process listening on ``--backends`` loopback ports, each answering any
HTTP request with a 200, keeping the connection unless the request says ``Connection: close``.
The kinds: ``tcp``; ``http``, which keeps its connection from one check to the next, as http
checks do by default; ``http-close`` (``reuse-connection = false``), a new connection for each
check. Then, for each kind, it checks each backend once a second,
the starts spread evenly over the second, for ``--duration`` seconds, and prints the CPU time
(user, system) this process spent, as a share of one core and per check, with the checks
started, those skipped because the previous one was still in flight, and the results by
reason. The backends' own CPU is not counted, only printed, to show they kept up.

On loopback the kernel charges the sender for much of the receiving end's TCP work (the
handshake, the reset), so the system time holds some of the backends' share. For tcp and
http-close a floor follows each run: the same checks reduced to their system calls (connect,
close; the request and one read for http) in a bare ``select.epoll`` loop, the least any
checker written in Python pays here.

With ``--supervisor`` it measures a real ``fastlb run`` supervisor (not its worker) checking
the backends once a second instead, from ``/proc``; the checks are those the backends accepted.
The supervisor starts every backend's checks together and keeps them in step, so they come in
bursts, one wake-up for many, where the loop above spreads them evenly, one wake-up (two for
http) a check: its worst case.

Run it from any directory with fastlb installed (``pip install .``); the backend process is
stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import select
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # first: keeps the checkout's fastlb/ off sys.path

from fastlb.health.probes import LINGER_RESET, Checker, CheckResult
from fastlb.model import Address, CheckSpec

# The kinds measured, by name: http keeps its connections between checks, as it does by default;
# http-close opens a new one for each check.
CHECK_TYPES = {"tcp": "tcp", "http": "http", "http-close": "http"}

HTTP_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HTTP_REPLY_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


# For --supervisor's count of checks: connections the backends accepted (tcp checks) and
# requests they answered (http checks, which keep their connections unless told not to).
ACCEPTED = [0]
ANSWERED = [0]


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ACCEPTED[0] += 1
    try:
        while True:  # requests on one connection until the checker closes it or asks to
            head = await reader.readuntil(b"\r\n\r\n")
            ANSWERED[0] += 1
            if b"\r\nconnection: close" in head.lower():
                writer.write(HTTP_REPLY_CLOSE)
                await writer.drain()
                break
            writer.write(HTTP_REPLY)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass  # a tcp check closes (with a reset) without a request
    finally:
        writer.close()


def tell_counts() -> None:
    """A line on stdin asks for the counts of connections accepted and requests answered."""
    if not sys.stdin.readline():
        return
    print(ACCEPTED[0], ANSWERED[0], flush=True)


async def serve(count: int) -> None:
    servers = [
        await asyncio.start_server(answer, "127.0.0.1", 0, backlog=1024) for _ in range(count)
    ]
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), tell_counts)
    print(" ".join(str(server.sockets[0].getsockname()[1]) for server in servers), flush=True)
    await asyncio.Event().wait()  # until stopped


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def process_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def process_cpu_seconds(pid: int) -> float:
    return sum(process_cpu_split(pid))


class Pacer:
    """Every backend once a second, in turn, the starts spread evenly over the second; the
    queue stays in order of due time. Counts the CPU of this process and of the backends'."""

    def __init__(self, count: int, duration: float, backend_pid: int):
        self.count = count
        self.backend_pid = backend_pid
        self.start = time.monotonic()
        self.end = self.start + duration
        self.due = collections.deque((self.start + key / count, key) for key in range(count))
        self.cpu_before = cpu_seconds()
        self.backend_before = process_cpu_seconds(backend_pid)

    def due_keys(self, now: float):
        """The keys due by ``now``, each rescheduled a second later."""
        due = self.due
        while due[0][0] <= now:
            at, key = due.popleft()
            due.append((at + 1.0, key))
            yield key

    def next_due(self) -> float:
        return min(self.due[0][0], self.end)

    def line(self, what: str, checks: int) -> str:
        user_after, system_after = cpu_seconds()
        user, system = user_after - self.cpu_before[0], system_after - self.cpu_before[1]
        backends = process_cpu_seconds(self.backend_pid) - self.backend_before
        wall = time.monotonic() - self.start
        cpu = user + system
        return (
            f"{what:11} {self.count} backends/s for {wall:.1f} s: {checks} checks, "
            f"CPU {100 * cpu / wall:.1f}% of a core (user {100 * user / wall:.1f}%, "
            f"system {100 * system / wall:.1f}%), {1e6 * cpu / max(checks, 1):.0f} us a check "
            f"({1e6 * user / max(checks, 1):.0f} user, {1e6 * system / max(checks, 1):.0f} "
            f"system); backends {100 * backends / wall:.0f}%"
        )


def measure(kind: str, addresses: list[Address], duration: float, timeout: float, pid: int):
    """The real Checker in a selectors loop shaped like the supervisor's."""
    selector = selectors.DefaultSelector()
    reasons: collections.Counter[str] = collections.Counter()

    def count(key: int, result: CheckResult) -> None:
        reasons[result.reason] += 1  # cheap: the supervisor's own work on a result is not measured

    checker = Checker(selector, count)
    spec = CheckSpec(
        type=CHECK_TYPES[kind], path="/health", timeout=timeout, reuse_connection=kind == "http"
    )
    started = skipped = 0
    pacer = Pacer(len(addresses), duration, pid)
    while (now := time.monotonic()) < pacer.end:
        for key in pacer.due_keys(now):
            if checker.busy(key):
                skipped += 1
            else:
                checker.check(key, addresses[key], spec)
                started += 1
        wake = min(pacer.next_due(), checker.next_deadline() or pacer.end)
        for selector_key, mask in selector.select(max(0.0, wake - time.monotonic())):
            selector_key.data(mask)
        checker.expire(time.monotonic())
    line = pacer.line(kind, started)
    checker.close()
    selector.close()
    results = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
    print(f"{line}; {skipped} skipped; {results}", flush=True)


def measure_floor(kind: str, addresses: list[Address], duration: float, pid: int) -> None:
    """The same checks with nothing but their system calls in a bare epoll loop: for tcp a
    non-blocking connect and a close with a reset; for http also the request, sent at once, and
    one read of the reply. No timeouts, no parsing, no verdict."""
    epoll = select.epoll()
    request = (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fastlb-check\r\n"
        b"Connection: close\r\n\r\n"
    )
    in_flight: dict[int, socket.socket] = {}
    checks = failed = 0
    pacer = Pacer(len(addresses), duration, pid)
    while (now := time.monotonic()) < pacer.end:
        for key in pacer.due_keys(now):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.connect_ex((addresses[key].host, addresses[key].port))
            checks += 1
            if kind == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
                continue
            try:
                sock.send(request)
            except OSError:  # not connected at once: not what the floor measures
                failed += 1
                sock.close()
                continue
            in_flight[sock.fileno()] = sock
            epoll.register(sock.fileno(), select.EPOLLIN)
        for fd, _ in epoll.poll(max(0.0, pacer.next_due() - time.monotonic())):
            sock = in_flight.pop(fd)
            if not sock.recv(65536):
                failed += 1
            epoll.unregister(fd)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.close()
    line = pacer.line(f"{kind} floor", checks)
    for sock in in_flight.values():
        sock.close()
    epoll.close()
    print(f"{line}; {failed} failed", flush=True)


def checks_seen(backends: subprocess.Popen, kind: str) -> int:
    """The checks the backends have seen so far: requests for http, connections for tcp."""
    backends.stdin.write("\n")
    backends.stdin.flush()
    line = backends.stdout.readline()
    if not line:
        raise harness.HarnessError(f"the check backends ended (exit {backends.wait()})")
    accepted, answered = line.split()
    return int(answered if kind.startswith("http") else accepted)


def measure_supervisor(
    kind: str, addresses: list[Address], duration: float, timeout: float, backends: subprocess.Popen
) -> None:
    """The CPU of a real ``fastlb run`` supervisor (its workers not counted) checking every
    backend once a second, as it schedules them: a backend's next check is due an interval after
    its last one started, so backends checked together at the start stay together."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{probe.getsockname()[1]}"
    command = [*harness.fastlb_command(), "run", "--listen", listen, "--workers", "1"]
    command += ["--check", "--check-type", CHECK_TYPES[kind], "--check-interval", "1"]
    command += ["--check-timeout", str(timeout), "--log-level", "warning"]
    if kind != "tcp":
        command += ["--check-path", "/health"]
    for address in addresses:
        command += ["--backend", str(address)]
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as config:
        if kind != "tcp":
            config.write(f"check-reuse-connection = {str(kind == 'http').lower()}\n")
    command += ["--config", config.name]
    supervisor = None
    try:
        with harness.interrupt_held():
            supervisor = subprocess.Popen(command, preexec_fn=harness.unblock_interrupt)
        first = checks_seen(backends, kind)
        give_up = time.monotonic() + 30
        while checks_seen(backends, kind) < first + 2 * len(addresses):  # two rounds: settled
            if time.monotonic() > give_up or supervisor.poll() is not None:
                sys.exit("the supervisor did not check the backends")
            time.sleep(0.2)
        before, backend_before = checks_seen(backends, kind), process_cpu_seconds(backends.pid)
        user_before, system_before = process_cpu_split(supervisor.pid)
        start = time.monotonic()
        time.sleep(duration)
        user_after, system_after = process_cpu_split(supervisor.pid)
        wall = time.monotonic() - start
        checks = checks_seen(backends, kind) - before
        backend_cpu = process_cpu_seconds(backends.pid) - backend_before
    finally:
        if supervisor is not None:
            supervisor.terminate()
            supervisor.wait()
        os.unlink(config.name)
    user, system = user_after - user_before, system_after - system_before
    cpu = user + system
    print(
        f"{kind + ' sup':11} {len(addresses)} backends/s for {wall:.1f} s: {checks} checks, "
        f"CPU {100 * cpu / wall:.1f}% of a core (user {100 * user / wall:.1f}%, "
        f"system {100 * system / wall:.1f}%), {1e6 * cpu / max(checks, 1):.0f} us a check "
        f"({1e6 * user / max(checks, 1):.0f} user, {1e6 * system / max(checks, 1):.0f} "
        f"system); backends {100 * backend_cpu / wall:.0f}%",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=1000, help="checked once a second each")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per kind")
    parser.add_argument(
        "--kinds",
        default="tcp,http,http-close",
        help=f"comma-separated, of {', '.join(CHECK_TYPES)}",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="of a check, in seconds")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-syscall floor")
    parser.add_argument(
        "--supervisor",
        action="store_true",
        help="measure a real `fastlb run` supervisor checking the backends instead",
    )
    parser.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    backends = None
    try:
        with harness.interrupt_held():
            backends = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(args.backends)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=harness.unblock_interrupt,
            )
        ports = [int(port) for port in backends.stdout.readline().split()]
        if len(ports) != args.backends:
            sys.exit("the backend process did not start")
        addresses = [Address("127.0.0.1", port) for port in ports]
        for kind in args.kinds.split(","):
            if args.supervisor:
                measure_supervisor(kind, addresses, args.duration, args.timeout, backends)
                continue
            measure(kind, addresses, args.duration, args.timeout, backends.pid)
            if kind in ("tcp", "http-close") and not args.no_floor:
                measure_floor(kind, addresses, args.duration, backends.pid)
    finally:
        if backends is not None:
            backends.kill()
            backends.wait()


if __name__ == "__main__":
    harness.run_script(main)
