"""Several services in one fastlb: frontends (where clients arrive) on several addresses, each
routing to its own pool with its own algorithm, and how /stats shows them; the flat flags as one
frontend and one pool, both named ``default``."""

from __future__ import annotations

import pytest
from conftest import (
    free_port,
    free_port_on_both_loopbacks,
    free_ports,
    ipv6_loopback,
    toml_array,
)

FRONTEND_FIELDS = {"name", "listen", "pool", "active", "connections", "rejected"}
POOL_FIELDS = {"name", "algorithm", "send_proxy", "backends"}
BACKEND_FIELDS = {"id", "pool", "address", "weight", "backup", "up", "active", "connections"}
BACKEND_FIELDS |= {"failed", "up_bytes", "down_bytes"}
WORKER_FIELDS = {"id", "pid", "ready"}


def by_name(entries: list[dict]) -> dict[str, dict]:
    return {entry["name"]: entry for entry in entries}


def pool_addresses(stats: dict) -> dict[str, list[str]]:
    """Each pool's backend addresses, by the ids the pool lists; checks each backend's pool."""
    backends = {backend["id"]: backend for backend in stats["backends"]}
    addresses = {}
    for pool in stats["pools"]:
        addresses[pool["name"]] = [backends[i]["address"] for i in pool["backends"]]
        for i in pool["backends"]:
            assert backends[i]["pool"] == pool["name"], (pool, backends[i])
    return addresses


def test_one_frontend_listens_on_ipv4_and_ipv6(configured, backends):
    if not ipv6_loopback():
        pytest.skip("::1 cannot be bound here")
    a = backends("name", name="a")
    stats, port = free_port(), free_port_on_both_loopbacks()
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.both]
        listen = ["127.0.0.1:{port}", "[::1]:{port}"]
        pool = "names"
        [pool.names]
        backend = ["{a.address}"]
    """)
    assert lb.ask_name(address=("127.0.0.1", port)) == "a"
    assert lb.ask_name(address=("::1", port)) == "a"
    stats = lb.wait_for(lambda s: lb.frontend_stats("both", s)["connections"] == 2)
    assert lb.frontend_stats("both", stats)["listen"] == [f"127.0.0.1:{port}", f"[::1]:{port}"]


def two_services(configured, backends):
    """fastlb with frontend rr → pool rr (roundrobin over a, b, c) and frontend sticky → pool
    sticky (iphash over d, e, f)."""
    rr = [backends("name", name=n) for n in "abc"]
    sticky = [backends("name", name=n) for n in "def"]
    stats, rr_port, sticky_port = free_ports(3)
    return configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.rr]
        listen = ["127.0.0.1:{rr_port}"]
        pool = "rr"
        [frontend.sticky]
        listen = ["127.0.0.1:{sticky_port}"]
        pool = "sticky"
        [pool.rr]
        algorithm = "roundrobin"
        backend = {toml_array(b.address for b in rr)}
        [pool.sticky]
        algorithm = "iphash"
        backend = {toml_array(b.address for b in sticky)}
    """)


def test_two_frontends_use_their_own_pools_and_algorithms(configured, backends):
    lb = two_services(configured, backends)
    rr, sticky = lb.address("rr"), lb.address("sticky")
    assert [lb.ask_name(address=rr) for _ in range(9)] == ["a", "b", "c"] * 3
    sources = [f"127.0.0.{x}" for x in range(2, 18)]
    answers = {source: [lb.ask_name(source, sticky) for _ in range(3)] for source in sources}
    for source, names in answers.items():
        assert len(set(names)) == 1, f"{source} moved: {names}"
    used = {names[0] for names in answers.values()}
    assert used <= {"d", "e", "f"} and len(used) > 1, answers
    # The sticky frontend's clients took no turn of round robin.
    assert [lb.ask_name(address=rr) for _ in range(3)] == ["a", "b", "c"]


def test_stats_show_every_frontend_and_pool(configured, backends):
    lb = two_services(configured, backends)
    for _ in range(4):
        lb.ask_name(address=lb.address("rr"))
    lb.ask_name(address=lb.address("sticky"))
    # Workers report their counters now and then: wait until all five are in.
    stats = lb.wait_for(
        lambda s: (
            sum(f["connections"] for f in s["frontends"]) == 5
            and sum(b["active"] for b in s["backends"]) == 0
        ),
        what="five connections counted and closed",
    )
    assert {"pid", "workers", "table_version", "frontends", "pools", "backends"} <= stats.keys()
    for kind, fields in [
        ("workers", WORKER_FIELDS),
        ("frontends", FRONTEND_FIELDS),
        ("pools", POOL_FIELDS),
        ("backends", BACKEND_FIELDS),
    ]:
        for entry in stats[kind]:
            assert fields <= entry.keys(), f"{kind}: {entry} lacks {fields - entry.keys()}"

    frontends = by_name(stats["frontends"])
    assert frontends.keys() == {"rr", "sticky"}
    for name in ("rr", "sticky"):
        host, port = lb.address(name)
        assert frontends[name]["listen"] == [f"{host}:{port}"]
    assert [frontends[n]["pool"] for n in ("rr", "sticky")] == ["rr", "sticky"]
    assert [frontends[n]["connections"] for n in ("rr", "sticky")] == [4, 1]
    assert [frontends[n]["active"] for n in ("rr", "sticky")] == [0, 0]

    pools = by_name(stats["pools"])
    assert {name: pool["algorithm"] for name, pool in pools.items()} == {
        "rr": "roundrobin",
        "sticky": "iphash",
    }
    assert [pools[n]["send_proxy"] for n in ("rr", "sticky")] == [None, None]
    addresses = pool_addresses(stats)
    assert len(addresses["rr"]) == len(addresses["sticky"]) == 3
    assert not set(addresses["rr"]) & set(addresses["sticky"])
    connections = {b["pool"]: 0 for b in stats["backends"]}
    for backend in stats["backends"]:
        connections[backend["pool"]] += backend["connections"]
    assert connections == {"rr": 4, "sticky": 1}


def test_flat_flags_are_one_frontend_and_one_pool_named_default(backends, balancer):
    a, b = backends("name", name="a"), backends("name", name="b")
    lb = balancer([a, b], "--algorithm", "leastconn")
    assert lb.ask_name() in {"a", "b"}
    stats = lb.wait_for(lambda s: sum(f["connections"] for f in s["frontends"]) == 1)
    [frontend] = stats["frontends"]
    assert (frontend["name"], frontend["pool"]) == ("default", "default")
    assert frontend["listen"] == [f"127.0.0.1:{lb.port}"]
    [pool] = stats["pools"]
    assert (pool["name"], pool["algorithm"], pool["send_proxy"]) == ("default", "leastconn", None)
    assert pool_addresses(stats) == {"default": [a.address, b.address]}


def test_listen_repeated_is_one_frontend_on_two_addresses(backends, balancer):
    a = backends("name", name="a")
    second = free_port()
    lb = balancer([a], "--listen", f"127.0.0.1:{second}")
    assert lb.ask_name() == "a"
    assert lb.ask_name(address=("127.0.0.1", second)) == "a"
    stats = lb.wait_for(lambda s: sum(f["connections"] for f in s["frontends"]) == 2)
    [frontend] = stats["frontends"]
    assert frontend["name"] == "default"
    assert frontend["listen"] == [f"127.0.0.1:{lb.port}", f"127.0.0.1:{second}"]
