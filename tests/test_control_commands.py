"""The ctl verbs and the runtime state without sockets: parsing, applying, reconciling with a
config, the state file's JSON, and the no-usable-backend rule."""

from __future__ import annotations

import pytest

from fastlb import settings
from fastlb.control.commands import (
    CommandError,
    Runtime,
    config_pools,
    parse,
    unusable_pools,
)
from fastlb.model import Address, BackendSpec, Config, FrontendSpec, PoolSpec

A = Address("127.0.0.1", 9001)
B = Address("127.0.0.1", 9002)
C = Address("::1", 9003)


def config(*backends: BackendSpec, pool: str = "web") -> Config:
    return Config(
        frontends=(FrontendSpec("web", (Address("127.0.0.1", 8000),), pool),),
        pools=(PoolSpec(pool, tuple(backends)),),
    )


def present(cfg: Config, runtime: Runtime) -> dict:
    return {p.name: {s.address: s for s in runtime.specs(p)} for p in cfg.pools}


def apply(runtime: Runtime, cfg: Config, verb: str, *args: str) -> str:
    return runtime.apply(parse({"verb": verb, "args": list(args)}), present(cfg, runtime))


def test_the_weight_limit_is_the_settings_one():
    from fastlb.control import commands

    assert commands.MAX_WEIGHT == settings.MAX_WEIGHT


@pytest.mark.parametrize(
    "request_, words",
    [
        ({"verb": "show", "args": ["a", "b"]}, "usage: show [POOL]"),
        ({"verb": "drain", "args": ["web/[::1]9"]}, "[IPV6]:PORT"),
        ({"verb": "drain", "args": ["web/127.0.0.1:0"]}, "from 1 to 65535"),
        ({"verb": "weight", "args": ["web/127.0.0.1:1", "1000001"]}, "0 to 1000000"),
        ({"verb": "add", "args": ["web", "127.0.0.1:1,heavy"]}, "unknown backend option"),
        ({"verb": 3}, "unknown verb"),
        ("show", "JSON object"),
    ],
)
def test_bad_requests_are_one_line_errors(request_, words):
    with pytest.raises(CommandError) as caught:
        parse(request_)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_ipv6_addresses_are_normalised():
    command = parse({"verb": "drain", "args": ["web/[0:0::1]:9003"]})
    assert command.address == C


def test_drain_weight_add_remove_and_enable():
    cfg = config(BackendSpec(A), BackendSpec(B, 2))
    runtime = Runtime()
    apply(runtime, cfg, "drain", f"web/{A}")
    apply(runtime, cfg, "weight", f"web/{B}", "7")
    apply(runtime, cfg, "add", "web", "[::1]:9003,weight=3,backup")
    assert runtime.get("web", A).admin == "drain"
    assert runtime.weight("web", cfg.pools[0].backends[1]) == 7
    assert runtime.specs(cfg.pools[0])[-1] == BackendSpec(C, 3, True)
    with pytest.raises(CommandError, match="already in the pool"):
        apply(runtime, cfg, "add", "web", str(A))
    apply(runtime, cfg, "remove", f"web/{C}")
    assert runtime.get("web", C).removed == "pending"
    runtime.removal_done("web", C)
    assert C not in {spec.address for spec in runtime.specs(cfg.pools[0])}
    assert ("web", C) not in runtime.overrides
    # A backend the config lists stays out after its removal, until ctl add.
    apply(runtime, cfg, "remove", f"web/{B}")
    runtime.removal_done("web", B)
    assert [spec.address for spec in runtime.specs(cfg.pools[0])] == [A]
    with pytest.raises(CommandError, match="no backend"):
        apply(runtime, cfg, "drain", f"web/{B}")
    apply(runtime, cfg, "add", "web", str(B))
    assert [spec.address for spec in runtime.specs(cfg.pools[0])] == [A, B]
    apply(runtime, cfg, "enable", f"web/{A}")
    assert runtime.get("web", A).admin is None


def test_reconcile_rules():
    cfg = config(BackendSpec(A), BackendSpec(B, 2))
    runtime = Runtime()
    apply(runtime, cfg, "weight", f"web/{A}", "5")
    apply(runtime, cfg, "weight", f"web/{B}", "9")
    apply(runtime, cfg, "add", "web", str(C))
    apply(runtime, cfg, "remove", f"web/{A}")
    # The config changes B's weight (its word wins), lists C (which it owns now), keeps A.
    new = config(BackendSpec(A), BackendSpec(B, 3), BackendSpec(C))
    notes = runtime.reconcile(new)
    assert runtime.get("web", A).weight == 5 and runtime.get("web", A).removed == "pending"
    assert runtime.get("web", B).weight is None
    assert runtime.get("web", C).added is None
    assert any("the config changed its weight" in note for note in notes)
    # At start, nothing is open: a pending removal is done.
    runtime.reconcile(new, starting=True)
    assert runtime.get("web", A).removed == "done"
    # A backend the config drops, and a pool it drops, lose their state.
    runtime.set_health("web", B, up=False)
    runtime.reconcile(config(BackendSpec(A)))
    assert ("web", B) not in runtime.overrides
    runtime.reconcile(config(BackendSpec(A), pool="other"))
    assert runtime.overrides == {}


def test_the_state_file_json_round_trips_and_rejects_nonsense():
    cfg = config(BackendSpec(A), BackendSpec(B))
    runtime = Runtime()
    apply(runtime, cfg, "disable", f"web/{A}")
    apply(runtime, cfg, "weight", f"web/{B}", "4")
    apply(runtime, cfg, "add", "web", f"{C},backup")
    runtime.set_health("web", B, up=False)
    assert Runtime.from_json(runtime.to_json()) == runtime
    for document, words in [
        ({"version": 2, "backends": []}, "version 1"),
        ({"version": 1, "backends": {}}, "must be a list"),
        ({"version": 1, "backends": [{"pool": "web", "address": "x"}]}, "backends[0]"),
        ({"version": 1, "backends": [{"pool": "web", "address": str(A), "admin": "x"}]}, "admin"),
        ({"version": 1, "backends": [{"pool": "web", "address": str(A), "weight": "5"}]}, "whole"),
    ]:
        with pytest.raises(CommandError) as caught:
            Runtime.from_json(document)
        assert words in str(caught.value)


def test_a_pool_with_no_usable_backend():
    assert unusable_pools([("web", [(1, True), (0, True)])]) == {}
    assert "weight 0" in unusable_pools([("web", [(0, True)])])["web"]
    assert "disabled" in unusable_pools([("web", [(3, False)])])["web"]
    assert "no backends" in unusable_pools([("web", [])])["web"]
    cfg = config(BackendSpec(A, 0), BackendSpec(B))
    runtime = Runtime()
    assert unusable_pools(config_pools(cfg, runtime)) == {}
    apply(runtime, cfg, "drain", f"web/{B}")
    assert "web" in unusable_pools(config_pools(cfg, runtime))
