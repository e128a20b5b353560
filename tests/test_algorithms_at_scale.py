"""The count- and order-driven algorithms at 1,000 backends, against their Python models.

roundrobin keeps nginx's smooth order pick by pick and leastconn picks an exact minimum of the
counts it has, while connections open and close and other workers' counts arrive.
"""

import random
from fractions import Fraction

import models
from fastlb._dataplane import Balancer

N = 1000


def rows_for(weights, up=None):
    return [
        (f"10.4.{i // 250}.{i % 250 + 1}", 8080, w, True if up is None else up[i], False)
        for i, w in enumerate(weights)
    ]


def test_roundrobin_is_nginx_smooth_order_at_1000_backends():
    rng = random.Random(5)
    weights = [3, 1] + [rng.choice([1, 2, 3, 5]) for _ in range(N - 2)]
    rows = rows_for(weights, up=[i % 97 != 0 for i in range(N)])
    compiled, model = Balancer("roundrobin", rows), models.SmoothRoundRobin(rows)
    for i in range(3000):
        tried = rng.sample(range(N), rng.randint(1, 16)) if i % 50 == 0 else []
        assert compiled.pick(0, tried=tried) == model.pick(0, tried=tuple(tried)), i


def test_roundrobin_three_to_one_is_a_a_b_a_among_1000_backends():
    # Backends 2.. have weight 0: still in the table, never picked.
    balancer = Balancer("roundrobin", rows_for([3, 1] + [0] * (N - 2)))
    assert [balancer.pick() for _ in range(8)] == [0, 0, 1, 0] * 2


def least_loaded(weights, active, candidates):
    loads = {i: Fraction(active[i] + 1, weights[i]) for i in candidates}
    lowest = min(loads.values())
    return {i for i in candidates if loads[i] == lowest}


def test_leastconn_is_exact_at_1000_backends():
    rng = random.Random(8)
    weights = [rng.choice([1, 1, 2, 4]) for _ in range(N)]
    balancer = Balancer("leastconn", rows_for(weights))
    local, others = [0] * N, [0] * N
    everyone = range(N)
    for step in range(4000):
        op = rng.random()
        if op < 0.6:
            tried = rng.sample(range(N), rng.randint(1, 4)) if step % 10 == 0 else []
            candidates = [i for i in everyone if i not in tried]
            active = [a + b for a, b in zip(local, others, strict=True)]
            got = balancer.pick(0, tried=tried)
            assert got in least_loaded(weights, active, candidates), step
            balancer.connect(got)
            local[got] += 1
        elif op < 0.9:
            busy = [i for i in everyone if local[i]]
            if busy:
                i = rng.choice(busy)
                balancer.disconnect(i)
                local[i] -= 1
        else:
            for i in rng.sample(range(N), 50):
                others[i] = rng.randrange(0, 8)
            balancer.set_others(others)
    assert balancer.active() == local


def test_leastconn_ties_rotate_for_short_connections():
    """Connections that close before the next opens find every backend idle: they rotate."""
    balancer = Balancer("leastconn", rows_for([1] * N))
    seen = set()
    for _ in range(N):
        i = balancer.pick()
        balancer.connect(i)
        balancer.disconnect(i)
        seen.add(i)
    assert len(seen) == N


def test_roundrobin_resumes_its_turn_when_a_new_table_is_swapped_in():
    """A health flap every 100 ms at 1,000 backends leaves fewer picks than backends between
    two tables: starting over each time would send them all to the first backends."""
    rows = rows_for([1] * N)
    balancer = Balancer("roundrobin", rows)
    seen = []
    for flap in range(10):
        rows[-1] = rows[-1][:3] + (flap % 2 == 1, False)  # up in the last one
        balancer.adopt(rows)
        seen += [balancer.pick() for _ in range(100)]
    assert seen == list(range(len(seen)))


def test_leastconn_reads_every_count_when_a_new_table_is_swapped_in():
    balancer = Balancer("leastconn", rows_for([1] * 4))
    balancer.adopt(rows_for([1] * 4))
    balancer.set_others([3, 1, 0, 2])
    assert balancer.pick() == 2
