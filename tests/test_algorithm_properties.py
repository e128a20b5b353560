"""Remapping and balance properties of the hashing algorithms, measured on 100,000 client keys.

Each test prints what it measured (run with ``pytest -s``); the README quotes these numbers.
"""

import collections
import itertools

import pytest
from fastlb._dataplane import Balancer, algorithm_names, hash_client
from hypothesis import given, settings
from hypothesis import strategies as st

SIZES = [3, 5, 10, 20, 50, 1000]
MAGLEV_SIZE = 65537
MAGLEV_SIZE_LARGE = 655373  # above 655 backends


def rows_for(n, weights=None, port=8000):
    return [
        (f"10.0.{i // 200}.{i % 200 + 1}", port, weights[i] if weights else 1, True, False)
        for i in range(n)
    ]


def name(row):
    return f"{row[0]}:{row[1]}"


@pytest.fixture(scope="module")
def keys():
    """100,000 distinct client addresses, hashed as a worker hashes them (src-ip)."""
    return [hash_client(f"172.{16 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}") for i in range(100_000)]


def mapping(balancer, keys):
    """Client key -> backend name (names, not indices: indices shift when the set changes)."""
    names = balancer.names
    pick = balancer.pick
    return [names[pick(k)] for k in keys]


def shares(assigned, rows):
    counts = collections.Counter(assigned)
    return [counts[name(row)] / len(assigned) for row in rows]


@pytest.mark.parametrize("algorithm", ["consistent", "maglev", "iphash"])
@pytest.mark.parametrize("n", SIZES)
def test_remove_and_add_back_moves_only_that_backends_keys(algorithm, n, keys):
    rows = rows_for(n)
    victim = rows[n // 2]
    balancer = Balancer(algorithm, rows)
    before = mapping(balancer, keys)

    balancer.update([row for row in rows if row is not victim])
    removed = mapping(balancer, keys)
    own = [k for k, b in enumerate(before) if b == name(victim)]
    assert all(removed[k] != name(victim) for k in own)  # every key of the victim moves
    others_moved = sum(
        1 for a, b in zip(before, removed, strict=True) if a != b and a != name(victim)
    )

    balancer.update(rows)
    back = mapping(balancer, keys)
    returned_others = sum(
        1 for a, b in zip(removed, back, strict=True) if a != b and b != name(victim)
    )
    took_back = sum(1 for b in back if b == name(victim))

    share = shares(before, rows)
    share_removed = shares(removed, [row for row in rows if row is not victim])
    print(
        f"\n{algorithm:10} N={n:2}: remove one -> its {len(own)} keys "
        f"({len(own) / len(keys):.2%}) move, other keys moved {others_moved} "
        f"({others_moved / len(keys):.3%}); add back -> {took_back} keys return, other keys "
        f"moved {returned_others} ({returned_others / len(keys):.3%}); share per backend "
        f"{min(share) * n:.2f}..{max(share) * n:.2f} x 1/N "
        f"(N-1: {min(share_removed) * (n - 1):.2f}..{max(share_removed) * (n - 1):.2f})"
    )

    assert back == before  # the mapping is a function of the backend set alone
    if algorithm == "maglev":
        assert others_moved <= 0.01 * len(keys)
        assert returned_others <= 0.01 * len(keys)
    else:
        assert others_moved == 0
        assert returned_others == 0
    if algorithm == "consistent":
        for count, measured in ((n, share), (n - 1, share_removed)):
            assert 0.5 / count <= min(measured) and max(measured) <= 1.5 / count


@pytest.mark.parametrize("algorithm", ["consistent", "maglev", "iphash"])
def test_marked_down_backend_loses_only_its_clients_and_gets_them_back(algorithm, keys):
    rows = rows_for(10)
    balancer = Balancer(algorithm, rows)
    before = [balancer.pick(k) for k in keys[:20_000]]
    down = [(host, port, w, i != 7, backup) for i, (host, port, w, _, backup) in enumerate(rows)]
    balancer.update(down)
    during = [balancer.pick(k) for k in keys[:20_000]]
    assert 7 not in during
    moved = [(a, b) for a, b in zip(before, during, strict=True) if a != b]
    others = sum(1 for a, _ in moved if a != 7)
    assert sum(1 for a, _ in moved if a == 7) == before.count(7) > 0
    # Maglev rebuilds its table: a few entries of other backends change hands too
    assert others <= (0.01 * len(before) if algorithm == "maglev" else 0)
    balancer.update(rows)
    assert [balancer.pick(k) for k in keys[:20_000]] == before


@pytest.mark.parametrize("n", SIZES)
def test_maglev_table_is_near_equal(n):
    balancer = Balancer("maglev", rows_for(n))
    # key k lands on entry k mod the table's size: picking 0..size-1 reads the whole table
    size = MAGLEV_SIZE if n * 100 <= MAGLEV_SIZE else MAGLEV_SIZE_LARGE
    counts = collections.Counter(balancer.pick(k) for k in range(size))
    ratio = max(counts.values()) / min(counts.values())
    print(f"\nmaglev N={n}: lookup-table entries per backend max/min = {ratio:.4f}")
    assert len(counts) == n and ratio <= 1.02


@pytest.mark.parametrize("weights", [[1, 2, 3, 4], [1, 1, 1, 5], [10, 3, 7, 1, 1, 2]])
def test_maglev_table_follows_weights(weights):
    rows = rows_for(len(weights), weights)
    balancer = Balancer("maglev", rows)
    counts = collections.Counter(balancer.pick(k) for k in range(MAGLEV_SIZE))
    errors = [counts[i] / MAGLEV_SIZE / (w / sum(weights)) - 1 for i, w in enumerate(weights)]
    print(
        f"\nmaglev weights {weights}: entry share / weight share - 1 = "
        f"{', '.join(f'{e:+.3%}' for e in errors)}"
    )
    assert max(abs(e) for e in errors) <= 0.02


@pytest.mark.parametrize("weights", [[1, 2, 3, 4], [1, 1, 1, 5]])
def test_consistent_ring_follows_weights(weights, keys):
    rows = rows_for(len(weights), weights)
    measured = shares(mapping(Balancer("consistent", rows), keys), rows)
    ratios = [s / (w / sum(weights)) for s, w in zip(measured, weights, strict=True)]
    print(
        f"\nconsistent weights {weights}: key share / weight share = "
        f"{', '.join(f'{r:.3f}' for r in ratios)}"
    )
    assert all(0.8 <= r <= 1.2 for r in ratios)


def test_weight_change_moves_keys_only_to_or_from_that_backend(keys):
    rows = rows_for(8)
    heavier = [row[:2] + (3 if i == 2 else 1,) + row[3:] for i, row in enumerate(rows)]
    before = mapping(Balancer("consistent", rows), keys)
    after = mapping(Balancer("consistent", heavier), keys)
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert moved and all(b == name(rows[2]) for _, b in moved)


rows_strategy = st.lists(
    st.tuples(st.integers(0, 5), st.booleans(), st.booleans()), min_size=1, max_size=8
).map(
    lambda specs: [
        (f"10.9.0.{i + 1}", 80, weight, up, backup) for i, (weight, up, backup) in enumerate(specs)
    ]
)


def usable(rows):
    """Indices a pick may return: the eligible set's backends with a positive weight."""
    for wanted in (
        lambda r: r[3] and not r[4],
        lambda r: r[3] and r[4],
        lambda r: not r[4],
    ):
        chosen = [i for i, r in enumerate(rows) if wanted(r)]
        if chosen:
            return {i for i in chosen if rows[i][2] > 0}
    return set()


@settings(max_examples=150, deadline=None)
@given(
    rows=rows_strategy,
    key=st.integers(0, 2**64 - 1),
    tried_mask=st.integers(0, 255),
    algorithm=st.sampled_from(algorithm_names()),
    factor=st.sampled_from([0.0, 1.25]),
)
def test_pick_returns_an_untried_usable_backend_or_minus_one(
    rows, key, tried_mask, algorithm, factor
):
    balancer = Balancer(algorithm, rows, balance_factor=factor)
    tried = [i for i in range(len(rows)) if tried_mask >> i & 1]
    left = usable(rows) - set(tried)
    choice = balancer.pick(key, tried=tried)
    if left:
        assert choice in left
    else:
        assert choice == -1


@settings(max_examples=40, deadline=None)
@given(
    rows=rows_strategy,
    order=st.randoms(use_true_random=False),
    algorithm=st.sampled_from(["consistent", "maglev", "iphash"]),
)
def test_hashing_depends_on_the_backend_set_not_its_order(rows, order, algorithm):
    shuffled = list(rows)
    order.shuffle(shuffled)
    a, b = Balancer(algorithm, rows), Balancer(algorithm, shuffled)
    for key in itertools.islice(itertools.count(0, 0x9E3779B97F4A7C15 // 997), 300):
        key &= 2**64 - 1
        x, y = a.pick(key), b.pick(key)
        assert (x < 0 and y < 0) or a.names[x] == b.names[y]
