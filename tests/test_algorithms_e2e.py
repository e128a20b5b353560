"""The added algorithms through the real ``fastlb run``: fake backends that say who they are."""

from __future__ import annotations

from collections import Counter

import pytest


def sources(count: int) -> list[str]:
    """Distinct loopback client addresses: 127.0.1.2, 127.0.1.3, ..."""
    return [f"127.0.{1 + i // 250}.{2 + i % 250}" for i in range(count)]


def test_two_maglev_balancers_send_each_client_to_the_same_backend(backends, balancer):
    """Two independent processes, backends listed in opposite orders, no shared state."""
    names = [f"m{i}" for i in range(5)]
    started = [backends("name", name=n) for n in names]
    first = balancer(started, "--algorithm", "maglev", workers=2)
    second = balancer(started[::-1], "--algorithm", "maglev", workers=2)
    clients = sources(1000)
    answers = [(first.ask_name(s), second.ask_name(s)) for s in clients]
    differing = [(s, a, b) for s, (a, b) in zip(clients, answers, strict=True) if a != b]
    assert not differing, differing[:5]
    spread = Counter(a for a, _ in answers)
    print(f"\nmaglev, 1000 clients over 5 backends, two processes agree: {dict(spread)}")
    assert set(spread) == set(names)


@pytest.mark.parametrize(
    "flags",
    [
        ("--algorithm", "consistent"),
        ("--algorithm", "consistent", "--hash-key", "src-ip-port"),
        ("--algorithm", "maglev", "--hash-balance-factor", "1.25"),
        ("--algorithm", "p2c"),
        ("--algorithm", "random"),
    ],
)
def test_every_algorithm_serves_all_backends(backends, balancer, flags):
    names = ["a", "b", "c"]
    lb = balancer([backends("name", name=n) for n in names], *flags, workers=2)
    seen = Counter(lb.ask_name(s) for s in sources(60))
    assert set(seen) == set(names), seen


@pytest.mark.parametrize("algorithm", ["consistent", "maglev"])
def test_hashing_keeps_a_client_on_one_backend_across_workers(backends, balancer, algorithm):
    lb = balancer([backends("name", name=n) for n in "abcd"], "--algorithm", algorithm, workers=4)
    for source in sources(30):
        answers = {lb.ask_name(source) for _ in range(6)}
        assert len(answers) == 1, f"{source} reached {answers}"
