"""The data plane's reports (fastlb._dataplane.Worker.report) on real loopback sockets: only the
backends that changed are listed, count changes alone travel as a map, and a table swap keeps
what was not reported yet."""

from __future__ import annotations

import select
import socket
import time

from conftest import loopback_listener

from fastlb import _dataplane

BACKENDS = 50


def rows(ports: list[int]) -> list[tuple]:
    return [(100 + i, "127.0.0.1", port, 1, True, False) for i, port in enumerate(ports)]


def poll_until(worker, predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        worker.poll(10)


def test_reports_list_only_what_changed_and_counts_go_alone():
    backends = [loopback_listener() for _ in range(BACKENDS)]
    front = loopback_listener()
    worker = _dataplane.Worker(
        [{"id": 0, "algorithm": "roundrobin"}],
        [{"id": 0, "pool": 0}],
        [(front.fileno(), 0)],
        report_interval_ms=1,
    )
    clients = []
    try:
        worker.set_table(1, [(0, rows([b.getsockname()[1] for b in backends]))])
        assert worker.report() is None  # nothing moved yet
        clients = [socket.create_connection(front.getsockname(), timeout=5) for _ in range(3)]
        poll_until(worker, lambda: worker.active == 3, "3 connections")
        # Counts alone: a map of the backends whose count changed, nothing else.
        version, failed, frontends, counts = worker.report(False)
        assert (version, failed, frontends) == (1, [], [])
        assert counts == {100: 1, 101: 1, 102: 1}
        assert worker.counts_since_us > 0
        assert worker.report(False) is None  # reported: nothing new
        # A table swap in between keeps what was not reported yet: the frontend's accepts,
        # and the connects as they complete.
        worker.set_table(2, [(0, rows([b.getsockname()[1] for b in backends]))])
        version, full, frontends, counts = worker.report(True)
        assert version == 2 and counts == {}
        assert [f[:3] for f in frontends] == [(0, 3, 3)]
        connected = {row[0]: row[2] for row in full}
        while sum(connected.values()) < 3:
            worker.poll(10)
            report = worker.report(True)
            for row in report[1] if report else []:
                assert row[1] == 1  # still open
                connected[row[0]] = connected.get(row[0], 0) + row[2]
        assert connected == {100: 1, 101: 1, 102: 1}  # and no other backend listed
        assert worker.report(True) is None
    finally:
        for sock in clients:
            sock.close()
        for sock in backends:
            sock.close()
        worker.drain()


def test_peer_counts_steer_leastconn_and_name_what_the_tables_lack():
    """The other workers' counts, summed by PeerCounts and set in the worker's table, decide
    leastconn's pick; an id the table lacks is returned (to be set when its table comes), and
    the counts of a worker that exited no longer count."""
    backends = [loopback_listener() for _ in range(2)]
    front = loopback_listener()
    worker = _dataplane.Worker(
        [{"id": 0, "algorithm": "leastconn"}], [{"id": 0, "pool": 0}], [(front.fileno(), 0)]
    )
    peers = _dataplane.PeerCounts()
    clients = []

    def next_pick() -> int:
        clients.append(socket.create_connection(front.getsockname(), timeout=5))
        chosen = []

        def accepted():
            ready, _, _ = select.select(backends, [], [], 0)
            chosen.extend(backends.index(sock) for sock in ready)
            return bool(chosen)

        poll_until(worker, accepted, "a connect to a backend")
        conn, _ = backends[chosen[0]].accept()
        clients.append(conn)
        return 100 + chosen[0]

    try:
        worker.set_table(1, [(0, rows([b.getsockname()[1] for b in backends]))])
        assert peers.apply({111: {100: 3}}, [], worker) == []
        assert next_pick() == 101  # 100 holds 3 elsewhere
        assert peers.apply({222: {101: 5, 999: 2}}, [], worker) == [999]
        assert peers.others == {100: 3, 101: 5, 999: 2}
        assert next_pick() == 100  # 3 against 5 + 1 here
        assert peers.apply({}, [111], worker) == []
        assert peers.others == {100: 0, 101: 5, 999: 2}
        assert list(peers.by_worker) == [222]
        assert next_pick() == 100  # 1 here against 5 + 1
        assert peers.apply({222: {101: 0}}, [], worker) == []
        assert next_pick() == 101  # 2 against 1
    finally:
        for sock in clients + backends + [front]:
            sock.close()
        worker.drain()
