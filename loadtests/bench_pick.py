"""Pick cost of each balancing algorithm, in nanoseconds per pick.

    python loadtests/bench_pick.py [--picks 1000000] [--repeat 9] [--sizes 3,50,1000]

Each measurement is one Balancer.bench() call: a loop of picks inside the extension, without the
GIL, so no Python call overhead is counted (each pick includes deriving its key, one mix64).
Count-driven algorithms and bounded loads see held connections first (a skewed client mix, so
some backends sit at their cap), and the counts then stay fixed. leastconn keeps its backends
ordered as counts change, so its pick reads the top and the count changes pay O(log N): the row
"leastconn churn" is a pick, a connect and a close together. The table shows the best of
--repeat runs, taken in turns over all cells: the least disturbed by other processes.
"""

import argparse
import random

import harness  # first: keeps the checkout's fastlb/ off sys.path
from fastlb._dataplane import Balancer, algorithm_names

try:
    from rich.console import Console
    from rich.table import Table
except ImportError:  # rich comes with the "load" extra; plain text without it
    Console = Table = None

BOUNDED = [("consistent", 1.25), ("maglev", 1.25)]
CHURN = ("leastconn", -1.0)  # a pick, then a connect and a close of the backend picked


def variants():
    for name in algorithm_names():
        yield name, 0.0
    yield from BOUNDED
    yield CHURN


def label(algorithm, factor):
    if (algorithm, factor) == CHURN:
        return f"{algorithm} churn"
    return f"{algorithm} F={factor:g}" if factor else algorithm


def prepared(algorithm, factor, n):
    rows = [(f"10.0.{i // 250}.{i % 250 + 1}", 8080, 1, True, False) for i in range(n)]
    balancer = Balancer(algorithm, rows, balance_factor=max(factor, 0.0))
    rng = random.Random(1)
    for _ in range(20 * n):
        host = "203.0.113.7" if rng.random() < 0.5 else f"198.51.100.{rng.randrange(250)}"
        balancer.connect(balancer.pick_address(host))
    return balancer


def measure(cells, picks, repeat):
    """Best ns per pick of each cell. The runs go round all cells in turn, so that a burst of
    load from other processes spoils one run of many cells, not every run of one cell."""
    best = {cell: float("inf") for cell in cells}
    for (variant, _), balancer in cells.items():
        bench(variant, balancer, picks // 10, 0)  # page in the tables
    for run in range(repeat):
        for (variant, n), balancer in cells.items():
            cost = bench(variant, balancer, picks, run * picks) / picks
            best[variant, n] = min(best[variant, n], cost)
    return best


def bench(variant, balancer, picks, key_seed):
    if variant == CHURN:
        return balancer.bench(picks, key_seed=key_seed, churn=True)
    return balancer.bench(picks, key_seed=key_seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picks", type=int, default=1_000_000, help="picks per measurement")
    parser.add_argument("--repeat", type=int, default=9, help="measurements, best one kept")
    parser.add_argument("--sizes", default="3,50,1000", help="backend counts, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    cells = {(v, n): prepared(*v, n) for v in variants() for n in sizes}
    best = measure(cells, args.picks, args.repeat)
    results = [(label(*v), [best[v, n] for n in sizes]) for v in variants()]
    headers = ["algorithm"] + [f"N={n} (ns/pick)" for n in sizes]
    if Table is None:
        print("  ".join(f"{h:>16}" for h in headers))
        for name, costs in results:
            print("  ".join([f"{name:>16}"] + [f"{c:16.1f}" for c in costs]))
        return
    table = Table(title=f"pick cost, best of {args.repeat} x {args.picks:,} picks")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for name, costs in results:
        table.add_row(name, *(f"{c:.1f}" for c in costs))
    Console().print(table)


if __name__ == "__main__":
    harness.run_script(main)
