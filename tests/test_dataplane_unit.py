"""The compiled algorithms (fastlb._dataplane.Balancer) against small Python models of them.

In the style of uvloop's differential tests: the same test bodies run against the compiled
balancer and the model, and hypothesis drives both with the same random tables and operations
and asserts that they agree pick by pick.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import Ring
from models import hash_client as client_key

from fastlb import _dataplane

# ---- the models ---------------------------------------------------------------------------------


class ModelBalancer:
    """The three algorithms as their comments describe them, with the API of _dataplane.Balancer.

    Where leastconn has a tie the model takes the first backend; the compiled one rotates."""

    def __init__(self, algorithm: str, rows: list, balance_factor: float = 0.0):
        if algorithm not in ("roundrobin", "leastconn", "iphash"):
            raise ValueError(f"unknown algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.local = []
        self.others = []
        self.update(rows)

    def update(self, rows: list) -> None:
        self.rows = [tuple(row) for row in rows]
        n = len(rows)
        self.local = [0] * n
        self.others = [0] * n
        self.current = [0] * n
        self.ring = Ring(rows)
        # Up primaries; else up backups; else every primary.
        for wanted in (
            lambda up, backup: up and not backup,
            lambda up, backup: up and backup,
            lambda up, backup: not backup,
        ):
            self.eligible = [i for i, r in enumerate(self.rows) if wanted(bool(r[3]), bool(r[4]))]
            if self.eligible:
                break

    @property
    def names(self) -> list[str]:
        return [f"{host}:{port}" for host, port, *_ in self.rows]

    def candidates(self, tried) -> list[int]:
        return [i for i in self.eligible if self.rows[i][2] > 0 and i not in tried]

    def pick(self, key: int = 0, tried=()) -> int:
        candidates = self.candidates(tried)
        if not candidates:
            return -1
        if self.algorithm == "roundrobin" and tried:
            # a retry: the untried backend that would score highest, charging no one
            return max(candidates, key=lambda i: (self.current[i] + self.rows[i][2], -i))
        return getattr(self, "pick_" + self.algorithm)(key, candidates)

    def pick_roundrobin(self, key, candidates) -> int:
        # nginx's smooth weighted round robin.
        for i in candidates:
            self.current[i] += self.rows[i][2]
        best = max(candidates, key=lambda i: (self.current[i], -candidates.index(i)))
        self.current[best] -= sum(self.rows[i][2] for i in candidates)
        return best

    def least_loaded(self, candidates) -> list[int]:
        loads = {
            i: Fraction(self.local[i] + self.others[i] + 1, self.rows[i][2]) for i in candidates
        }
        lowest = min(loads.values())
        return [i for i in candidates if loads[i] == lowest]

    def pick_leastconn(self, key, candidates) -> int:
        return self.least_loaded(candidates)[0]

    def pick_iphash(self, key, candidates) -> int:
        # iphash is consistent under another name: the ketama-style ring.
        tried = [i for i in range(len(self.rows)) if i not in candidates]
        return self.ring.pick(key, tried=tried)

    def pick_address(self, host: str, port: int = 0, with_port: bool = False) -> int:
        return self.pick(client_key(host, port, with_port))

    def connect(self, index: int) -> None:
        self.local[index] += 1

    def disconnect(self, index: int) -> None:
        self.local[index] -= 1

    def set_others(self, others: list) -> None:
        self.others = list(others)

    def active(self) -> list[int]:
        return list(self.local)


IMPLEMENTATIONS = {"compiled": _dataplane.Balancer, "model": ModelBalancer}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def make(request):
    return IMPLEMENTATIONS[request.param]


def row(i: int, weight: int = 1, up: bool = True, backup: bool = False, port: int = 80):
    return (f"10.0.0.{i + 1}", port, weight, up, backup)


def picks(balancer, n: int, **kwargs) -> list[int]:
    return [balancer.pick(**kwargs) for _ in range(n)]


# ---- the same bodies against both ---------------------------------------------------------------


def test_algorithm_names():
    assert set(_dataplane.algorithm_names()) >= {"roundrobin", "leastconn", "iphash"}


def test_unknown_algorithm_is_rejected(make):
    with pytest.raises(ValueError):
        make("fastest", [row(0)])


def test_roundrobin_equal_weights_rotate_in_table_order(make):
    balancer = make("roundrobin", [row(0), row(1), row(2)])
    assert picks(balancer, 9) == [0, 1, 2] * 3


def test_roundrobin_is_smooth(make):
    balancer = make("roundrobin", [row(0, weight=3), row(1, weight=1)])
    assert picks(balancer, 8) == [0, 0, 1, 0] * 2
    balancer = make("roundrobin", [row(0, weight=5), row(1, weight=1), row(2, weight=1)])
    assert picks(balancer, 7) == [0, 0, 1, 0, 2, 0, 0]


def test_roundrobin_shares_follow_weights(make):
    balancer = make("roundrobin", [row(0, weight=1), row(1, weight=2), row(2, weight=3)])
    assert Counter(picks(balancer, 600)) == {0: 100, 1: 200, 2: 300}


def test_weight_zero_gets_nothing(make):
    balancer = make("roundrobin", [row(0, weight=0), row(1, weight=2)])
    assert set(picks(balancer, 10)) == {1}


def test_backup_only_while_every_primary_is_down(make):
    rows = [row(0), row(1), row(2, backup=True)]
    balancer = make("roundrobin", rows)
    assert balancer.eligible == [0, 1]
    assert set(picks(balancer, 10)) == {0, 1}
    balancer.update([row(0, up=False), row(1), row(2, backup=True)])
    assert set(picks(balancer, 10)) == {1}
    balancer.update([row(0, up=False), row(1, up=False), row(2, backup=True)])
    assert balancer.eligible == [2]
    assert set(picks(balancer, 10)) == {2}


def test_everything_down_falls_back_to_every_primary(make):
    balancer = make(
        "roundrobin", [row(0, up=False), row(1, up=False), row(2, up=False, backup=True)]
    )
    assert balancer.eligible == [0, 1]
    assert picks(balancer, 4) == [0, 1, 0, 1]


def test_tried_backends_are_skipped(make):
    for algorithm in ("roundrobin", "leastconn", "iphash"):
        balancer = make(algorithm, [row(0), row(1), row(2)])
        for key in range(20):
            assert balancer.pick(key, tried=[0, 2]) == 1
        assert balancer.pick(7, tried=[0, 1, 2]) == -1


def test_leastconn_picks_the_fewest_per_weight(make):
    balancer = make("leastconn", [row(0), row(1), row(2, weight=2)])
    for _ in range(3):
        balancer.connect(0)
    balancer.connect(1)
    # Loads (active + 1) / weight: 4, 2, 0.5.
    assert balancer.pick() == 2
    for _ in range(3):
        balancer.connect(2)
    # 4, 2, 2: a tie between 1 and 2.
    assert {balancer.pick() for _ in range(50)} <= {1, 2}


def test_leastconn_counts_other_workers(make):
    balancer = make("leastconn", [row(0), row(1), row(2)])
    balancer.set_others([5, 0, 5])
    assert set(picks(balancer, 10)) == {1}
    balancer.connect(1)
    balancer.connect(1)
    balancer.set_others([0, 0, 5])
    assert set(picks(balancer, 10)) == {0}


def test_leastconn_spreads_connections_evenly(make):
    balancer = make("leastconn", [row(0), row(1), row(2), row(3)])
    for _ in range(41):
        balancer.connect(balancer.pick())
    active = balancer.active()
    assert max(active) - min(active) <= 1 and sum(active) == 41


def test_iphash_is_stable_and_only_a_removed_backends_clients_move(make):
    rows = [row(i) for i in range(4)]
    balancer = make("iphash", rows)
    clients = [f"192.168.{i // 250}.{i % 250}" for i in range(1000)]
    before = {c: balancer.pick_address(c) for c in clients}
    assert before == {c: balancer.pick_address(c) for c in clients}
    assert set(before.values()) == {0, 1, 2, 3}
    balancer.update([row(0), row(1, up=False), row(2), row(3)])
    after = {c: balancer.pick_address(c) for c in clients}
    moved = {c for c in clients if before[c] != after[c]}
    assert moved == {c for c in clients if before[c] == 1}
    assert 1 not in after.values()


def test_iphash_shares_follow_weights(make):
    balancer = make("iphash", [row(0, weight=1), row(1, weight=2), row(2, weight=3)])
    n = 12000
    counts = Counter(
        balancer.pick_address(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}") for i in range(n)
    )
    # the ring's 160 points per unit of weight: within 3 points of the weight's share
    for index, weight in enumerate((1, 2, 3)):
        assert abs(counts[index] / n - weight / 6) < 0.03, counts


# ---- compiled == model, pick by pick ------------------------------------------------------------

rows_strategy = st.lists(
    st.tuples(st.integers(0, 20), st.booleans(), st.booleans()), min_size=1, max_size=8
).map(lambda specs: [row(i, w, up, backup, 1000 + i) for i, (w, up, backup) in enumerate(specs)])

tried_strategy = st.lists(st.integers(0, 7), max_size=3, unique=True)


@settings(max_examples=200, deadline=None)
@given(rows=rows_strategy, ops=st.lists(tried_strategy, max_size=60))
def test_roundrobin_matches_the_model(rows, ops):
    compiled = _dataplane.Balancer("roundrobin", rows)
    model = ModelBalancer("roundrobin", rows)
    assert compiled.eligible == model.eligible
    for tried in ops:
        tried = [i for i in tried if i < len(rows)]
        assert compiled.pick(0, tried) == model.pick(0, tried)


@settings(max_examples=200, deadline=None)
@given(
    rows=rows_strategy,
    ops=st.lists(st.tuples(st.sampled_from(["pick", "close", "others"]), tried_strategy)),
    others=st.lists(st.integers(0, 50), min_size=8, max_size=8),
)
def test_leastconn_matches_the_model(rows, ops, others):
    compiled = _dataplane.Balancer("leastconn", rows)
    model = ModelBalancer("leastconn", rows)
    n = len(rows)
    for op, tried in ops:
        tried = [i for i in tried if i < n]
        if op == "pick":
            expected = model.candidates(tried)
            got = compiled.pick(0, tried)
            if not expected:
                assert got == -1
                continue
            assert got in model.least_loaded(expected)
            compiled.connect(got)
            model.connect(got)
        elif op == "close":
            busy = [i for i in range(n) if model.local[i] > 0]
            if busy:
                compiled.disconnect(busy[0])
                model.disconnect(busy[0])
        else:
            compiled.set_others(others[:n])
            model.set_others(others[:n])
        assert compiled.active() == model.active()


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


@settings(max_examples=300, deadline=None)
@given(host=st.one_of(ipv4, ipv6), port=st.integers(0, 65535), with_port=st.booleans())
def test_client_hash_matches_the_model(host, port, with_port):
    assert _dataplane.hash_client(host, port, with_port) == client_key(host, port, with_port)


@settings(max_examples=200, deadline=None)
@given(
    rows=rows_strategy, clients=st.lists(st.one_of(ipv4, ipv6), max_size=30), tried=tried_strategy
)
def test_iphash_matches_the_model(rows, clients, tried):
    compiled = _dataplane.Balancer("iphash", rows)
    model = ModelBalancer("iphash", rows)
    tried = [i for i in tried if i < len(rows)]
    for host in clients:
        key = client_key(host)
        assert compiled.pick(key, tried) == model.pick(key, tried)
        assert compiled.pick_address(host) == model.pick_address(host)


def test_iphash_ipv6_backends_match_the_model():
    rows = [(f"2001:db8::{i + 1}", 443, i + 1, True, False) for i in range(5)]
    compiled = _dataplane.Balancer("iphash", rows)
    model = ModelBalancer("iphash", rows)
    for i in range(500):
        host = f"fd00::{i:x}"
        assert compiled.pick_address(host) == model.pick_address(host)


def test_the_histogram_bounds_are_those_the_messages_describe():
    from fastlb.protocol import messages

    assert _dataplane.histogram_bounds() == (
        messages.CONNECT_BOUNDS_MS,
        messages.DURATION_BOUNDS_MS,
    )
