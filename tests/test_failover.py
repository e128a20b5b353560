"""Failed backends: retries, passive failure detection, recovery, backups, connect timeouts."""

from __future__ import annotations

import socket
import time
from collections import Counter

from conftest import ClientLoop, wait_until


def test_backend_killed_under_load_fails_no_new_connection(backends, balancer):
    a, b, c = (backends("name", name=n) for n in "abc")
    lb = balancer([a, b, c], "--fall", "3", "--retries", "2", workers=2)
    with ClientLoop(lb) as clients:
        clients.wait_for_more(300)
        assert "b" in {attempt.name for attempt in clients.results}
        b.kill()  # returns once the process is gone: its port refuses from here on
        killed_at = time.monotonic()
        lb.wait_for(lambda s: not lb.backend(b, s)["up"], timeout=10, what="b marked down")
        clients.wait_for_more(300)
    after = [attempt for attempt in clients.results if attempt.started >= killed_at]
    # Only connections open on b when it died may have been cut (one per client thread at most).
    assert len(clients.failures()) <= len(clients.threads), clients.failures()
    assert clients.failures(started_after=killed_at) == []
    assert len(after) >= 300
    assert lb.backend(b)["failed"] >= 3


def test_refused_connects_are_retried_on_another_backend(backends, balancer, refused_address):
    good = backends("name", name="good")
    dead = refused_address
    lb = balancer([dead, good], "--retries", "1", "--fall", "1000")
    assert [lb.ask_name() for _ in range(20)] == ["good"] * 20
    stats = lb.wait_for(lambda s: lb.backend(dead, s)["failed"] == 10, what="10 failures")
    assert lb.backend(dead, stats)["up"] is True  # --fall 1000 not reached


def test_without_retries_a_refused_connect_reaches_the_client(backends, balancer, refused_address):
    good = backends("name", name="good")
    dead = refused_address
    lb = balancer([dead, good], "--retries", "0", "--fall", "1000")
    answers = []
    for _ in range(20):
        try:
            answers.append(lb.ask_name())
        except (OSError, EOFError):
            answers.append(None)
    # Round robin alternates: every other connection went to the dead backend.
    assert answers == [None, "good"] * 10


def test_fall_marks_a_dead_backend_down_and_traffic_avoids_it(backends, balancer, refused_address):
    good = backends("name", name="good")
    dead = refused_address
    lb = balancer([dead, good], "--fall", "2", "--check-interval", "60")
    for _ in range(4):
        assert lb.ask_name() == "good"
    lb.wait_for(lambda s: not lb.backend(dead, s)["up"], what="the dead backend down")
    assert [lb.ask_name() for _ in range(10)] == ["good"] * 10
    failed = lb.backend(dead)["failed"]
    assert failed == 2


def test_connect_timeout_moves_on_to_the_next_backend(backends, balancer):
    good = backends("name", name="good")
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        address = blackhole.getsockname()
        # Fill the accept queue: from then on the kernel drops SYNs to it, as a dead host would.
        fillers = []
        while True:
            filler = socket.socket()
            fillers.append(filler)
            filler.settimeout(0.5)
            try:
                filler.connect(address)
            except TimeoutError:
                break
            assert len(fillers) < 10, "the accept queue never filled"
        try:
            lb = balancer(
                [f"{address[0]}:{address[1]}", good],
                "--connect-timeout",
                "0.3",
                "--retries",
                "1",
                "--fall",
                "1000",
            )
            durations = []
            for _ in range(4):
                started = time.monotonic()
                assert lb.ask_name() == "good"
                durations.append(time.monotonic() - started)
        finally:
            for filler in fillers:
                filler.close()
    # Round robin tries the blackhole first on every other connection.
    slow, fast = durations[0::2], durations[1::2]
    assert all(0.25 <= d < 2.0 for d in slow), durations
    assert all(d < 0.25 for d in fast), durations


def test_backup_takes_over_when_every_primary_is_down_and_hands_back(backends, balancer):
    a, b = backends("name", name="a"), backends("name", name="b")
    spare = backends("name", name="spare")
    lb = balancer(
        [a, b, f"{spare.address},backup"],
        *("--fall", "1", "--rise", "1", "--check-interval", "0.2", "--retries", "2"),
        workers=2,
    )
    assert {lb.ask_name() for _ in range(10)} == {"a", "b"}
    a_port = a.port
    a.kill()
    b.kill()

    def primaries_down(stats):
        return not lb.backend(a, stats)["up"] and not lb.backend(b, stats)["up"]

    def attempt():
        try:
            lb.ask_name()
        except (OSError, EOFError):
            pass  # the connection that discovered the failure may fail
        return primaries_down(lb.stats())

    # Passive detection needs traffic to notice the failure.
    wait_until(attempt, 10, "both primaries marked down")
    assert [lb.ask_name() for _ in range(10)] == ["spare"] * 10

    backends("name", name="a-again", port=a_port)
    lb.wait_for(lambda s: lb.backend(a, s)["up"], timeout=10, what="a back up after rise")
    assert [lb.ask_name() for _ in range(10)] == ["a-again"] * 10
    assert not lb.backend(b)["up"]


def test_dead_backend_comes_back_after_rise_probes(backends, balancer):
    a, b = backends("name", name="a"), backends("name", name="b")
    lb = balancer([a, b], "--fall", "1", "--rise", "2", "--check-interval", "0.2")
    port = a.port
    a.kill()
    wait_until(lambda: lb.ask_name() == "b" and not lb.backend(a)["up"], 10, "a marked down")
    assert [lb.ask_name() for _ in range(6)] == ["b"] * 6
    backends("name", name="a2", port=port)
    lb.wait_for(lambda s: lb.backend(a, s)["up"], timeout=10, what="a back up")
    # The supervisor's view leads the worker's table by a moment: wait until a2 is served.
    wait_until(lambda: lb.ask_name() == "a2", 10, "a2 served")
    assert Counter(lb.ask_name() for _ in range(6)) == {"a2": 3, "b": 3}
