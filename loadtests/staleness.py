"""How soon one worker's connection counts reach the other workers, under leastconn.

fastlb runs with ``--workers`` workers (default 2), leastconn and 2 hold backends. Each round
opens ``--connections`` connections (default 16) ``--gap-ms`` apart (default 2: 16 within 30 ms),
counted from the moment the previous one reached its backend, holds them, and records how they
split between the two backends (even is exact global least-connections); then closes them all.
``--gap-ms 0`` sends each round as one back-to-back burst. It exits 1 unless every round split
evenly, when the connections are at least ``COUNTS_TRAVEL_MS`` apart.

Staleness is measured inside fastlb: a report carries when its oldest count change happened
(CLOCK_MONOTONIC), the supervisor forwards that time with the counts, and each worker that
applies them counts how long after the change that was; ``/stats`` gives the histogram
(``count_staleness_ms``), printed at the end with its percentiles (upper bucket bounds).

    python loadtests/staleness.py                   # 20 rounds, a few seconds
    python loadtests/staleness.py --rounds 100 --workers 4 --gap-ms 1
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from backend import start_hold_backend
from harness import LOOPBACK, HarnessError, Processes, free_port, run_script, start_fastlb

# How soon a count change reaches the other workers; connections closer than this may split
# unevenly whatever the balancer does.
COUNTS_TRAVEL_MS = 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=16, help="per round")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="between two connections")
    return parser.parse_args()


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/stats", timeout=5) as reply:
        return json.load(reply)


def wait_reported(port: int, active: int, timeout: float = 10.0) -> list[dict]:
    """The backends of /stats once they count ``active`` open connections in all."""
    deadline = time.monotonic() + timeout
    while True:
        backends = stats(port)["backends"]
        if sum(b["active"] for b in backends) == active:
            return backends
        if time.monotonic() > deadline:
            raise HarnessError(f"/stats does not count {active} open connections")
        time.sleep(0.02)


def percentile(bounds: list[float], counts: list[int], share: float) -> str:
    """The upper bound of the bucket holding the given share of the samples."""
    total, seen = sum(counts), 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        seen += count
        if seen >= share * total:
            return f"≤ {bound:g} ms" if bound != float("inf") else f"> {bounds[-1]:g} ms"
    return "-"


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="fastlb-staleness-") as tmp:
        with Processes(Path(tmp)) as procs:
            ports = [start_hold_backend(procs)[0] for _ in range(2)]
            running = start_fastlb(
                procs, free_port(), ports, args.workers, extra_args=["--algorithm", "leastconn"]
            )
            stats_address = running.proc.args[running.proc.args.index("--stats") + 1]
            stats_port = int(stats_address.rsplit(":", 1)[1])
            splits = Counter()
            for _ in range(args.rounds):
                held, greeted = [], 0.0
                try:
                    for _ in range(args.connections):
                        time.sleep(max(0.0, greeted + args.gap_ms / 1000 - time.monotonic()))
                        sock = socket.create_connection((LOOPBACK, running.port), timeout=5)
                        held.append(sock)
                        sock.recv(1)  # the hold backend's greeting: it has been connected
                        greeted = time.monotonic()
                    # Counts of the connections held, as the workers reported them.
                    split = sorted(b["active"] for b in wait_reported(stats_port, len(held)))
                finally:
                    for sock in held:
                        sock.close()
                splits[tuple(split)] += 1
                wait_reported(stats_port, 0)
            staleness = stats(stats_port)["count_staleness_ms"]
    bounds, counts = staleness["bounds"], staleness["counts"]
    print(
        f"{args.rounds} rounds of {args.connections} connections {args.gap_ms:g} ms apart, "
        f"{args.workers} workers, leastconn over 2 backends"
    )
    for split, rounds in sorted(splits.items()):
        print(f"  split {'/'.join(map(str, split))}: {rounds} rounds")
    print(f"staleness of the counts applied ({sum(counts)} in all):")
    labels = [f"≤ {b:g}" for b in bounds] + [f"> {bounds[-1]:g}"]
    for label, count in zip(labels, counts, strict=True):
        print(f"  {label:>7} ms  {count:6d}")
    print(
        "  p50 "
        + percentile(bounds, counts, 0.5)
        + ", p90 "
        + percentile(bounds, counts, 0.9)
        + ", p99 "
        + percentile(bounds, counts, 0.99)
    )
    even = splits.get((args.connections // 2, args.connections - args.connections // 2), 0)
    if args.gap_ms < COUNTS_TRAVEL_MS:
        return 0  # closer together than counts travel: an uneven split is what it shows
    return 0 if even == args.rounds else 1


if __name__ == "__main__":
    run_script(main)
