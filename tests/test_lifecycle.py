"""Process lifecycle: a killed worker is replaced, SIGTERM drains, --max-conn, idle timeout."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest
from conftest import ClientLoop, recv_line, wait_until


def refuses_new_connections(lb) -> bool:
    try:
        sock = lb.connect(timeout=2)
    except ConnectionRefusedError:
        return True
    sock.close()
    return False


def is_dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(len(data) - len(received))
        if not chunk:
            break
        received += chunk
    return received


def test_sigkill_of_a_worker_refuses_no_new_connection(backends, balancer):
    lb = balancer([backends("name", name=n) for n in "abc"], workers=2)
    victim = lb.worker_pids()[0]
    with ClientLoop(lb) as clients:
        clients.wait_for_more(300)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: is_dead(victim), 5, "the worker to die")
        killed_at = time.monotonic()

        def replaced(stats):
            workers = stats["workers"]
            pids = {w["pid"] for w in workers}
            return victim not in pids and len(workers) == 2 and all(w["ready"] for w in workers)

        lb.wait_for(replaced, timeout=5, what="a replacement worker")
        replaced_after = time.monotonic() - killed_at
        clients.wait_for_more(300)
    lb.track_descendants()
    failures = clients.failures()
    assert not [f for f in failures if "ConnectionRefusedError" in f.error], failures
    # Only connections the victim held when it died may have been cut.
    assert clients.failures(started_after=killed_at) == []
    assert len(failures) <= len(clients.threads), failures
    assert replaced_after < 2.0


def test_sigterm_waits_for_an_open_connection_to_finish(backends, balancer):
    hold = backends("hold", name="held")
    lb = balancer([hold], "--drain-timeout", "30", workers=2)
    sock = lb.connect()
    assert recv_line(sock) == "held"
    lb.signal(signal.SIGTERM)
    wait_until(lambda: refuses_new_connections(lb), 5, "new connections refused")
    message = b"still served while draining"
    assert echo(sock, message) == message
    assert lb.proc.poll() is None
    sock.close()
    closed_at = time.monotonic()
    assert lb.wait_exit(timeout=5) == 0
    assert time.monotonic() - closed_at < 2.0
    # The probes above may have reached the backend too: find the held connection by its bytes.
    assert hold.next_event(received=len(message))["error"] is None


def test_drain_timeout_cuts_connections_that_outlast_it(backends, balancer):
    hold = backends("hold", name="held")
    lb = balancer([hold], "--drain-timeout", "1", workers=2)
    with lb.connect() as sock:
        assert recv_line(sock) == "held"
        lb.signal(signal.SIGTERM)
        sent_at = time.monotonic()
        assert lb.wait_exit(timeout=10) == 0
        took = time.monotonic() - sent_at
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass  # cut connections may be reset
    assert 0.9 <= took < 4.0


def test_second_signal_exits_at_once(backends, balancer):
    hold = backends("hold", name="held")
    lb = balancer([hold], "--drain-timeout", "30", workers=2)
    with lb.connect() as sock:
        assert recv_line(sock) == "held"
        lb.signal(signal.SIGTERM)
        first_at = time.monotonic()
        wait_until(lambda: refuses_new_connections(lb), 5, "draining")

        def exited_after_another_signal() -> bool:
            # A repeat that follows the first signal very closely may count as the same request.
            if lb.proc.poll() is not None:
                return True
            lb.signal(signal.SIGINT)
            return False

        wait_until(exited_after_another_signal, 5, "exit on a second signal", interval=0.1)
        assert time.monotonic() - first_at < 3.0  # not the 30 s drain timeout
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


def test_max_conn_holds_the_next_connection_until_one_closes(backends, balancer):
    hold = backends("hold", name="held")
    lb = balancer([hold], "--max-conn", "5")
    served = [lb.connect() for _ in range(5)]
    try:
        for sock in served:
            assert recv_line(sock) == "held"
        lb.wait_for(lambda s: lb.backend(hold, s)["active"] == 5, what="5 active")
        with lb.connect() as waiting:  # the kernel completes it; the worker does not take it
            waiting.settimeout(0.5)
            with pytest.raises(TimeoutError):
                waiting.recv(1)
            assert lb.backend(hold)["active"] == 5
            served.pop().close()
            waiting.settimeout(10)
            assert recv_line(waiting) == "held"
            assert echo(waiting, b"served now") == b"served now"
    finally:
        for sock in served:
            sock.close()


def test_idle_timeout_closes_an_idle_connection(backends, balancer):
    hold = backends("hold", name="held")
    lb = balancer([hold], "--idle-timeout", "0.5")
    with lb.connect() as sock:
        assert recv_line(sock) == "held"
        # A connection that keeps moving bytes outlives the idle timeout...
        keep_until = time.monotonic() + 1.2
        while True:
            assert echo(sock, b"tick") == b"tick"
            last_moved = time.monotonic()
            if last_moved > keep_until:
                break
            time.sleep(0.2)
        # ...and is closed once it stops.
        assert sock.recv(1) == b""
        idle = time.monotonic() - last_moved
    assert 0.45 <= idle < 3.0
    assert hold.next_event()["error"] is None
