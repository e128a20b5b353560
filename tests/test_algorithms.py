"""The balancing algorithms of the data plane, through fastlb._dataplane.Balancer.

Differential tests against the Python models in tests/models.py, retries, bounded loads under a
skewed client population, and count-driven algorithms under heterogeneous connection lifetimes.
Measured numbers are printed (run with ``pytest -s``).
"""

import collections
import heapq
import json
import math
import os
import random
import subprocess
import sys

import models
import pytest
from fastlb._dataplane import Balancer, algorithm_names, hash_client

ALGORITHMS = ["roundrobin", "leastconn", "iphash", "consistent", "maglev", "p2c", "random"]
HASHING = ["iphash", "consistent", "maglev"]


def rows_for(n, weights=None):
    return [(f"10.1.0.{i + 1}", 8080, weights[i] if weights else 1, True, False) for i in range(n)]


def client(i):
    return f"192.168.{(i >> 8) & 255}.{i & 255}"


def test_every_algorithm_is_registered():
    assert algorithm_names() == ALGORITHMS


def test_unknown_algorithm_names_the_choices():
    with pytest.raises(ValueError, match="maglev"):
        Balancer("nope", rows_for(2))


# --- differential: compiled pick == Python model ------------------------------------------------

TABLES = {
    "equal-5": rows_for(5),
    "weighted-7": rows_for(7, [1, 2, 3, 1, 5, 1, 2]),
    "down-and-drained": [
        ("10.2.0.1", 80, 1, True, False),
        ("10.2.0.2", 80, 1, False, False),
        ("10.2.0.3", 80, 0, True, False),
        ("10.2.0.4", 80, 3, True, False),
        ("10.2.0.5", 80, 2, True, True),
    ],
    "backups-only": [
        ("10.3.0.1", 80, 1, False, False),
        ("10.3.0.2", 80, 1, True, True),
        ("10.3.0.3", 80, 2, True, True),
    ],
    "ipv6-20": [(f"fd00::{i + 1:x}", 443, 1 + i % 3, True, False) for i in range(20)],
}


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("algorithm", ["roundrobin", *HASHING])
def test_compiled_matches_model(algorithm, table):
    rows = TABLES[table]
    compiled, model = Balancer(algorithm, rows), models.MODELS[algorithm](rows)
    rng = random.Random(3)
    n = len(rows)
    for i in range(3000):
        host = client(i)
        key = hash_client(host, 40000 + i, with_port=i % 2 == 1)
        assert key == models.hash_client(host, 40000 + i, with_port=i % 2 == 1)
        # a connection tries at most 16 backends (MAX_TRIES)
        tried = rng.sample(range(n), rng.randint(0, min(n, 16))) if i % 3 == 0 else []
        assert compiled.pick(key, tried=tried) == model.pick(key, tried=tuple(tried)), (i, tried)


@pytest.mark.parametrize("algorithm", ["consistent", "maglev"])
def test_compiled_bounded_load_matches_model(algorithm):
    rows = rows_for(6, [1, 1, 2, 1, 3, 1])
    compiled = Balancer(algorithm, rows, balance_factor=1.25)
    model = models.MODELS[algorithm](rows, balance_factor=1.25)
    active = [0] * len(rows)
    rng = random.Random(5)
    for i in range(4000):
        key = hash_client(client(rng.choice([1, 2, 3]) if i % 2 else i))
        choice = compiled.pick(key)
        assert choice == model.pick(key, active=active), i
        compiled.connect(choice)
        active[choice] += 1
        if i % 3 == 0:
            gone = rng.choice([j for j, a in enumerate(active) if a])
            compiled.disconnect(gone)
            active[gone] -= 1


@pytest.mark.parametrize("algorithm", HASHING)
def test_a_table_built_apart_picks_as_a_fresh_one_through_any_changes(algorithm):
    """adopt() builds as a worker does, sharing the last hash ring or Maglev table while only
    health changes; whatever the changes, it picks exactly as a table built from scratch."""
    rng = random.Random(11)
    rows = [(f"10.4.{i // 200}.{i % 200 + 1}", 80, rng.choice([1, 1, 2, 3]), True, i >= 36)
            for i in range(40)]  # fmt: skip
    adopted = Balancer(algorithm, rows)
    for step in range(60):
        i = rng.randrange(len(rows))
        host, port, weight, up, backup = rows[i]
        change = rng.random()
        if change < 0.6:
            up = not up  # a health flap: the same build, walked past the backend
        elif change < 0.8:
            weight = rng.choice([0, 1, 2, 5])
        elif change < 0.9:  # every primary down: the backups are in use
            rows = [(h, p, w, b, b) for h, p, w, _, b in rows]
        rows[i] = (host, port, weight, up, backup)
        adopted.adopt(rows)
        fresh = Balancer(algorithm, rows)
        for k in range(400):
            key = hash_client(client(step * 1000 + k))
            tried = [rng.randrange(len(rows))] if k % 4 == 0 else []
            assert adopted.pick(key, tried) == fresh.pick(key, tried), (step, k)


@pytest.mark.parametrize("algorithm", HASHING)
def test_a_backend_marked_down_hands_on_only_its_own_clients(algorithm):
    rows = rows_for(50)
    balancer = Balancer(algorithm, rows)
    keys = [hash_client(client(i)) for i in range(20000)]
    before = [balancer.pick(key) for key in keys]
    down = before[0]
    flapped = [row if i != down else (*row[:3], False, False) for i, row in enumerate(rows)]
    balancer.adopt(flapped)
    during = [balancer.pick(key) for key in keys]
    moved = [k for k, (a, b) in enumerate(zip(before, during, strict=True)) if a != b]
    assert moved == [k for k, a in enumerate(before) if a == down]
    assert down not in during
    # Its clients spread over the others rather than landing on one neighbour.
    assert len({during[k] for k in moved}) > 25
    balancer.adopt(rows)
    assert [balancer.pick(key) for key in keys] == before


def test_backend_identity_is_its_address():
    rows = [("10.1.0.1", 80, 1, True, False), ("::1", 8000, 1, True, False)]
    # the same address in another table position hashes the same: picks follow addresses
    a, b = Balancer("maglev", rows), Balancer("maglev", rows[::-1])
    assert all(a.names[a.pick(k)] == b.names[b.pick(k)] for k in range(0, 2**64, 2**50))


def test_two_processes_map_clients_identically():
    """What lets several fastlb nodes run side by side: no shared state, same answers."""
    rows = rows_for(12)
    script = (
        "import json, sys\n"
        "from fastlb._dataplane import Balancer\n"
        "rows = [tuple(r) for r in json.loads(sys.argv[1])]\n"
        "b = Balancer(sys.argv[2], rows)\n"
        "print(json.dumps([b.names[b.pick_address(f'127.0.{i >> 8}.{i & 255}')]"
        " for i in range(1, 1001)]))\n"
    )

    def run(order, algorithm):
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(order), algorithm],
            capture_output=True,
            text=True,
            timeout=30,
            env=os.environ,
            cwd=os.path.dirname(os.path.abspath(__file__)),  # import the installed package
            check=True,
        ).stdout
        return json.loads(out)

    for algorithm in HASHING:
        first, second = run(rows, algorithm), run(rows[::-1], algorithm)
        assert first == second and len(set(first)) == len(rows)


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_retry_never_returns_a_tried_backend(algorithm):
    rows = rows_for(5, [1, 2, 1, 3, 1])
    balancer = Balancer(algorithm, rows, balance_factor=1.25 if algorithm in HASHING else 0.0)
    for i in range(2000):
        key = hash_client(client(i))
        tried = []
        for _ in rows:
            choice = balancer.pick(key, tried=tried)
            assert choice >= 0 and choice not in tried
            tried.append(choice)
        assert sorted(tried) == list(range(len(rows)))
        assert balancer.pick(key, tried=tried) == -1


@pytest.mark.parametrize("algorithm", HASHING)
def test_retry_of_a_hashed_client_is_stable(algorithm):
    """The second choice is a function of the key too: every worker retries the same backend."""
    balancer = Balancer(algorithm, rows_for(8))
    for i in range(500):
        key = hash_client(client(i))
        first = balancer.pick(key)
        assert balancer.pick(key, tried=[first]) == balancer.pick(key, tried=[first])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_usable_backend_gives_minus_one(algorithm):
    assert Balancer(algorithm, []).pick(1) == -1
    assert Balancer(algorithm, [("10.0.0.1", 80, 0, True, False)]).pick(1) == -1


# --- weights of the randomised algorithms --------------------------------------------------------


def test_random_follows_weights():
    weights = [1, 2, 3, 4]
    balancer = Balancer("random", rows_for(4, weights))
    picks = 40_000
    counts = collections.Counter(balancer.pick(0) for _ in range(picks))
    measured = [counts[i] / picks for i in range(4)]
    print(f"\nrandom weights {weights}: shares {', '.join(f'{s:.3f}' for s in measured)}")
    assert all(abs(s - w / 10) < 0.01 for s, w in zip(measured, weights, strict=True))


@pytest.mark.parametrize("algorithm", ["p2c", "leastconn"])
def test_held_connections_follow_weights(algorithm):
    weights = [1, 2, 3, 4]
    balancer = Balancer(algorithm, rows_for(4, weights))
    for _ in range(10_000):
        balancer.connect(balancer.pick(0))
    measured = [a / 10_000 for a in balancer.active()]
    print(
        f"\n{algorithm} weights {weights}: shares of held connections "
        f"{', '.join(f'{s:.3f}' for s in measured)}"
    )
    assert all(abs(s - w / 10) < 0.005 for s, w in zip(measured, weights, strict=True))


# --- bounded loads -------------------------------------------------------------------------------


def skewed_clients(rng, count):
    """A few hot addresses (think NAT gateways) make 60% of connections, 2,000 others the rest."""
    hot = [f"203.0.113.{i}" for i in range(1, 4)]
    return [
        rng.choice(hot) if rng.random() < 0.6 else f"198.51.{rng.randrange(8)}.{rng.randrange(250)}"
        for _ in range(count)
    ]


def ceil_cap(factor, total_after, n):
    return math.ceil(factor * total_after / n)


@pytest.mark.parametrize("algorithm", ["consistent", "maglev"])
@pytest.mark.parametrize("n", [5, 10])
def test_bounded_load_caps_every_backend(algorithm, n):
    rng = random.Random(11)
    clients = skewed_clients(rng, 5000)
    balancer = Balancer(algorithm, rows_for(n), balance_factor=1.25)
    unbounded = Balancer(algorithm, rows_for(n))
    active = [0] * n
    for host in clients:
        choice = balancer.pick_address(host)
        balancer.connect(choice)
        active[choice] += 1
        unbounded.connect(unbounded.pick_address(host))
        assert max(active) <= ceil_cap(1.25, sum(active), n)
    plain = unbounded.active()
    print(
        f"\n{algorithm} N={n}, 60% of 5000 connections from 3 hot IPs: max/average active "
        f"{max(active) / (sum(active) / n):.2f} with F=1.25 (cap {ceil_cap(1.25, sum(active), n)}"
        f", max {max(active)}), {max(plain) / (sum(plain) / n):.2f} without"
    )
    assert max(plain) > ceil_cap(1.25, sum(plain), n)  # the skew is real: the cap does the work


@pytest.mark.parametrize("algorithm", ["consistent", "maglev"])
def test_bounded_load_with_churn_and_other_workers(algorithm):
    """Two workers, each counting its own connections and the other's (fresh counts): every
    placement keeps the chosen backend within the cap of that moment, over all workers."""
    n = 6
    rng = random.Random(13)
    workers = [Balancer(algorithm, rows_for(n), balance_factor=1.25) for _ in range(2)]
    held = [[], []]
    for step, host in enumerate(skewed_clients(rng, 6000)):
        w = step % 2
        me, other = workers[w], workers[1 - w]
        me.set_others(other.active())
        choice = me.pick_address(host)
        me.connect(choice)
        held[w].append(choice)
        total = [a + b for a, b in zip(me.active(), other.active(), strict=True)]
        assert total[choice] <= ceil_cap(1.25, sum(total), n)
        if rng.random() < 0.45 and held[w]:
            me.disconnect(held[w].pop(rng.randrange(len(held[w]))))


# --- count-driven algorithms under heterogeneous lifetimes ---------------------------------------


def new_connection_split(algorithm, n=4, slow=0, arrivals=20_000, rate=40.0):
    """Discrete-event run: Poisson arrivals, exponential lifetimes with mean 1, ten times longer
    on the slow backend; returns the share of new connections each backend received."""
    rng = random.Random(7)
    balancer = Balancer(algorithm, rows_for(n))
    departures = []
    new = [0] * n
    now = 0.0
    for _ in range(arrivals):
        now += rng.expovariate(rate)
        while departures and departures[0][0] <= now:
            balancer.disconnect(heapq.heappop(departures)[1])
        choice = balancer.pick(rng.getrandbits(64))
        balancer.connect(choice)
        new[choice] += 1
        lifetime = rng.expovariate(1.0) * (10.0 if choice == slow else 1.0)
        heapq.heappush(departures, (now + lifetime, choice))
    return [c / arrivals for c in new]


def test_slow_backend_gets_fewer_new_connections():
    # Equal active counts mean new connections in proportion to 1 / lifetime:
    # 0.1 / (0.1 + 3) = 3.2% for the slow backend out of four.
    ideal = 0.1 / 3.1
    splits = {a: new_connection_split(a) for a in ("leastconn", "p2c", "roundrobin")}
    for algorithm, split in splits.items():
        print(
            f"\n{algorithm:10}: new connections, slow backend (10x lifetime) first: "
            f"{', '.join(f'{s:.1%}' for s in split)} (equal active counts would give "
            f"{ideal:.1%} to the slow one)"
        )
    assert splits["leastconn"][0] <= 2 * ideal
    assert splits["p2c"][0] <= 3 * ideal
    assert splits["roundrobin"][0] == pytest.approx(0.25, abs=0.01)  # blind to lifetimes


def test_bench_runs_picks_and_reports_nanoseconds():
    balancer = Balancer("maglev", rows_for(10))
    elapsed = balancer.bench(100_000, key_seed=1)
    assert elapsed > 0 and balancer.active() == [0] * 10
