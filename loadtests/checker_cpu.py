"""The CPU cost of health checks: the real ``Checker`` in a selectors loop, as the supervisor
drives it, checking every one of ``--backends`` loopback backends once a second.

    python loadtests/checker_cpu.py                          # 1,000 backends: tcp, then http
    python loadtests/checker_cpu.py --backends 2000 --duration 10 --kinds http

It starts one asyncio process (its CPU is not counted) listening on ``--backends`` loopback
ports, each answering any HTTP request with a 200 and closing. Then, for each kind, it checks
each backend once a second, the starts spread evenly over the second, for ``--duration``
seconds, and prints the CPU time (user, system) this process spent as a share of one core,
with the checks started, those skipped because the previous one was still in flight, and the
results by reason. Run it from any directory with fastlb installed (``pip install .``); the
backend process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import resource
import selectors
import subprocess
import sys
import time

import harness  # noqa: F401  (first: keeps the checkout's fastlb/ off sys.path)

from fastlb.health.probes import Checker
from fastlb.model import Address, CheckSpec

HTTP_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HTTP_REPLY)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass  # a tcp check closes (with a reset) without a request
    finally:
        writer.close()


async def serve(count: int) -> None:
    servers = [
        await asyncio.start_server(answer, "127.0.0.1", 0, backlog=1024) for _ in range(count)
    ]
    print(" ".join(str(server.sockets[0].getsockname()[1]) for server in servers), flush=True)
    await asyncio.Event().wait()  # until stopped


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def measure(kind: str, addresses: list[Address], duration: float, timeout: float) -> None:
    selector = selectors.DefaultSelector()
    reasons: collections.Counter[str] = collections.Counter()
    checker = Checker(selector, lambda key, result: reasons.update([result.reason]))
    spec = CheckSpec(type=kind, path="/health", timeout=timeout)
    count = len(addresses)
    started = skipped = 0
    start = time.monotonic()
    end = start + duration
    # Every backend once a second, in turn: the queue stays in order of due time.
    due = collections.deque((start + key / count, key) for key in range(count))
    user_before, system_before = cpu_seconds()
    while (now := time.monotonic()) < end:
        while due[0][0] <= now:
            at, key = due.popleft()
            if checker.busy(key):
                skipped += 1
            else:
                checker.check(key, addresses[key], spec)
                started += 1
            due.append((at + 1.0, key))
        wake = min(due[0][0], checker.next_deadline() or end, end)
        for selector_key, mask in selector.select(max(0.0, wake - time.monotonic())):
            selector_key.data(mask)
        checker.expire(time.monotonic())
    user_after, system_after = cpu_seconds()
    user, system = user_after - user_before, system_after - system_before
    wall = time.monotonic() - start
    cpu = user + system
    checker.close()
    selector.close()
    results = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
    print(
        f"{kind:5} {count} backends/s for {wall:.1f} s: {started} checks ({skipped} skipped), "
        f"CPU {100 * cpu / wall:.1f}% of a core (user {100 * user / wall:.1f}%, "
        f"system {100 * system / wall:.1f}%), {1e6 * cpu / max(started, 1):.0f} us a check; "
        f"{results}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=1000, help="checked once a second each")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per kind")
    parser.add_argument("--kinds", default="tcp,http", help="comma-separated check types")
    parser.add_argument("--timeout", type=float, default=2.0, help="of a check, in seconds")
    parser.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    backends = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(args.backends)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ports = [int(port) for port in backends.stdout.readline().split()]
        if len(ports) != args.backends:
            sys.exit("the backend process did not start")
        addresses = [Address("127.0.0.1", port) for port in ports]
        for kind in args.kinds.split(","):
            measure(kind, addresses, args.duration, args.timeout)
    finally:
        backends.kill()
        backends.wait()


if __name__ == "__main__":
    main()
