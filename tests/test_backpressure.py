"""A client that does not read stops the backend, instead of filling the worker's memory."""

from __future__ import annotations

import time

import psutil
import pytest

MiB = 1 << 20
GiB = 1 << 30


def worker_rss(lb) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in lb.worker_pids())


def wait_until_stalled(lb, backend, timeout: float = 20.0) -> int:
    """Waits until the bytes forwarded to the client stop growing; returns how many."""
    deadline = time.monotonic() + timeout
    last, unchanged = -1, 0
    while unchanged < 5:  # reports come at least every 50 ms while anything moves
        if time.monotonic() > deadline:
            raise AssertionError(f"still streaming after {timeout}s: {last} bytes")
        time.sleep(0.1)
        down = lb.backend(backend)["down_bytes"]
        unchanged = unchanged + 1 if down == last and down > 0 else 0
        last = down
    return last


@pytest.mark.parametrize("splice", ["never", "always", "auto"])
def test_non_reading_client_does_not_grow_worker_memory(backends, balancer, splice):
    source = backends("source", nbytes=GiB)
    lb = balancer([source], "--splice", splice)
    before = worker_rss(lb)
    with lb.connect():  # and never read from
        forwarded = wait_until_stalled(lb, source)
        grown = worker_rss(lb) - before
    closed = source.next_event()
    assert grown < 8 * MiB, f"worker RSS grew by {grown / MiB:.1f} MiB"
    # Kernel socket buffers hold some of it; the rest never left the backend.
    assert forwarded < 64 * MiB
    assert closed["sent"] < 64 * MiB
    assert closed["error"] in ("EPIPE", "ECONNRESET")
