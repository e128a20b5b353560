"""The data plane's coalescing (fastlb._dataplane.Worker, coalesce_us) on real loopback sockets:
a loop that churns through new connections sleeps on a timer before blocking, and every
connection still reaches a backend; with no accepts in a window, or with it off, it blocks."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import loopback_listener

from fastlb import _dataplane

WINDOW_S = 0.010  # LOAD_WINDOW_US in ext/_dataplane.pyx


def churn(worker, address, backend, clients, seconds: float) -> None:
    """Opens a connection every few ms for this long, each forwarded to the backend."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        clients.append(socket.create_connection(address, timeout=5))
        for _ in range(3):
            worker.poll(1)
    while worker.active < len(clients):
        assert time.monotonic() < deadline + 5, f"{worker.active} of {len(clients)} forwarded"
        worker.poll(1)
    accepted = 0
    backend.settimeout(0)
    try:
        while True:
            backend.accept()[0].close()
            accepted += 1
    except BlockingIOError:
        pass
    backend.settimeout(5)
    assert accepted == len(clients), f"the backend saw {accepted} of {len(clients)}"


@pytest.mark.parametrize("coalesce_us", [200, 0])
def test_a_churning_loop_waits_on_a_timer_and_blocks_once_the_accepts_stop(coalesce_us):
    backend = loopback_listener()
    front = loopback_listener()
    address = front.getsockname()
    worker = _dataplane.Worker(
        [{"id": 0, "algorithm": "roundrobin"}],
        [{"id": 0, "pool": 0}],
        [(front.fileno(), 0)],
        coalesce_us=coalesce_us,
        coalesce_load=0,  # any window with an accept counts as churning
    )
    front.detach()  # the worker closes it when draining
    clients: list[socket.socket] = []
    try:
        worker.set_table(1, [(0, [(100, "127.0.0.1", backend.getsockname()[1], 1, True, False)])])
        churn(worker, address, backend, clients, 5 * WINDOW_S)
        if coalesce_us == 0:
            assert worker.coalesced == 0
            return
        assert worker.coalesced > 0, "no timed wait while accepting"
        # Two windows without an accept end the churn: from then on each poll blocks.
        started = time.monotonic()
        while time.monotonic() - started < 3 * WINDOW_S:
            worker.poll(2)
        settled = worker.coalesced
        for _ in range(10):
            worker.poll(2)
        assert worker.coalesced == settled, "timed waits with no connection coming"
    finally:
        for sock in clients:
            sock.close()
        backend.close()
        worker.drain()


@pytest.mark.parametrize("bad", [{"coalesce_us": -1}, {"coalesce_load": 101}])
def test_out_of_range_coalescing_is_refused(bad):
    front = loopback_listener()
    try:
        with pytest.raises(ValueError, match="coalesce"):
            _dataplane.Worker(
                [{"id": 0, "algorithm": "roundrobin"}],
                [{"id": 0, "pool": 0}],
                [(front.fileno(), 0)],
                **bad,
            )
    finally:
        front.close()
