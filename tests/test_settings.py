"""The settings table: parsing, validation, defaults, and what is derived from it."""

from __future__ import annotations

import dataclasses
import os

import pytest

import fastlb.config
from fastlb import _dataplane, settings
from fastlb.errors import ConfigError
from fastlb.model import Address, BackendSpec, Config, FrontendSpec, PoolSpec


def parse(*backends: str, listen: str = "127.0.0.1:8000", **values) -> Config:
    """The configuration of flat flags: one --listen, the backends (one by default) and
    ``values`` by option name, as typed."""
    return fastlb.config.load(
        {"listen": listen, "backends": list(backends or ["127.0.0.1:9000"]), **values}, None
    )


def error(**values) -> str:
    values.setdefault("listen", "127.0.0.1:8000")
    values.setdefault("backends", ["127.0.0.1:9000"])
    with pytest.raises(ConfigError) as info:
        fastlb.config.load(values, None)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_follow_haproxy():
    config = parse()
    (frontend,) = config.frontends
    (pool,) = config.pools
    assert pool.algorithm == "roundrobin"
    assert config.workers == (os.cpu_count() or 1)
    assert frontend.max_conn == 10000
    assert pool.connect_timeout == 5.0
    assert frontend.idle_timeout == 0.0
    assert pool.retries == 2
    assert (pool.fall, pool.rise) == (3, 2)
    assert (pool.check_interval, pool.check_timeout) == (2.0, 1.0)
    assert pool.active_checks is False
    assert config.drain_timeout == 30.0
    assert config.buffer_size == 65536
    assert config.splice == "auto"
    assert pool.hash_key == "src-ip"
    assert pool.hash_balance_factor == 0.0
    assert config.stats is None
    assert config.log_level == "info"


# The class that holds the settings of each scope, and its attributes that are no option.
SCOPE_CLASSES = {
    settings.PROCESS: (Config, {"frontends", "pools"}),
    settings.FRONTEND: (FrontendSpec, {"name", "pool", "sni", "sni_required"}),
    settings.POOL: (PoolSpec, {"name"}),
}


def test_the_worker_reads_these_names():
    names = {option.name for option in settings.OPTIONS}
    assert {
        "algorithm", "workers", "max_conn", "connect_timeout", "idle_timeout", "retries",
        "buffer_size", "splice", "hash_key", "hash_balance_factor",
    } <= names  # fmt: skip
    # Every option is an attribute of the class of its scope, and every other attribute of it
    # comes from the tables.
    for scope, (cls, extra) in SCOPE_CLASSES.items():
        own = {option.name for option in settings.OPTIONS if option.scope == scope}
        assert {field.name for field in dataclasses.fields(cls)} == own | extra, scope


def test_settings_are_frozen():
    config = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.frontends[0].max_conn = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pools[0].algorithm = "leastconn"


@pytest.mark.parametrize(
    "text, address",
    [
        ("127.0.0.1:8000", Address("127.0.0.1", 8000)),
        ("[::1]:8000", Address("::1", 8000)),
        ("[::]:443", Address("::", 443)),
        ("*:8000", Address("0.0.0.0", 8000)),
        (":8000", Address("0.0.0.0", 8000)),
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
    ],
)
def test_listen_addresses(text, address):
    assert parse(listen=text).frontends[0].listen == (address,)


def test_host_names_are_resolved_to_numeric_addresses():
    config = parse("localhost:9000", listen="localhost:8000")
    assert config.frontends[0].listen[0].host in ("127.0.0.1", "::1")
    assert config.pools[0].backends[0].address.host in ("127.0.0.1", "::1")


def test_addresses_print_with_brackets_for_ipv6():
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("10.0.0.1", 80)) == "10.0.0.1:80"


def test_backend_options():
    config = parse("127.0.0.1:9000,weight=3", "[::1]:9001,backup", "127.0.0.2:9002,backup,weight=0")
    assert config.pools[0].backends == (
        BackendSpec(Address("127.0.0.1", 9000), 3, False),
        BackendSpec(Address("::1", 9001), 1, True),
        BackendSpec(Address("127.0.0.2", 9002), 0, True),
    )


@pytest.mark.parametrize(
    "backend, expected",
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:", "port must be a number"),
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:0", "port must be between 1 and 65535"),
        ("127.0.0.1:65536", "port must be between 1 and 65535"),
        ("::1:9000", "in brackets"),
        ("[::1:9000", "expected [IPV6]:PORT"),
        (":9000", "missing host"),
        ("127.0.0.1:9000,weight=x", "weight must be a whole number"),
        ("127.0.0.1:9000,weight=-1", "weight must be at least 0"),
        ("127.0.0.1:9000,weight=1000001", "at most 1000000"),
        ("127.0.0.1:9000,heavy", "unknown backend option 'heavy'"),
        ("no-such-host.invalid:9000", "cannot resolve 'no-such-host.invalid'"),
    ],
)
def test_bad_backends(backend, expected):
    message = error(backends=[backend])
    assert message.startswith(f"--backend {backend}: ")
    assert expected in message


def test_the_same_backend_twice_is_an_error():
    message = error(backends=["127.0.0.1:9000", "127.0.0.1:9000,weight=2"])
    assert message == "--backend 127.0.0.1:9000 is given twice"


def test_a_backend_is_required():
    # None: no --backend on the command line, as argparse leaves it.
    message = error(backends=None)
    assert message == "at least one --backend is required (or backend in the --config file)"


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"listen": "127.0.0.1"}, "--listen 127.0.0.1: expected HOST:PORT"),
        ({"listen": "127.0.0.1:99999"}, "port must be between 0 and 65535"),
        ({"workers": "0"}, "--workers 0: must be at least 1"),
        ({"workers": "two"}, "--workers two: must be a whole number"),
        ({"retries": "16"}, "--retries 16: must be at least 0 and at most 15"),
        ({"connect_timeout": "0"}, "--connect-timeout 0: must be more than 0"),
        ({"idle_timeout": "-1"}, "--idle-timeout -1: must be 0 or more"),
        ({"drain_timeout": "soon"}, "--drain-timeout soon: expected seconds"),
        ({"buffer_size": "1024"}, "--buffer-size 1024: must be at least 4096"),
        ({"splice": "sometimes"}, "--splice sometimes: choose from never, always, auto"),
        ({"hash_key": "dst-ip"}, "choose from src-ip, src-ip-port"),
        ({"hash_balance_factor": "0.5"}, "must be 0 (off) or at least 1"),
        ({"algorithm": "no-such-one"}, "--algorithm no-such-one: choose from"),
        ({"stats": "localhost"}, "--stats localhost: expected HOST:PORT"),
        ({"log_level": "loud"}, "--log-level loud"),
    ],
)
def test_bad_values(values, expected):
    assert expected in error(**values)


def test_algorithms_are_the_compiled_ones():
    names = _dataplane.algorithm_names()
    assert "roundrobin" in names
    for name in names:
        assert parse(algorithm=name).pool("default").algorithm == name
    assert ", ".join(names) in error(algorithm="nope")


@pytest.mark.parametrize(
    "text, value", [("5", 5.0), ("0.5", 0.5), ("250ms", 0.25), ("3s", 3.0), ("2m", 120.0)]
)
def test_durations(text, value):
    assert parse(connect_timeout=text).pools[0].connect_timeout == value


def test_switch_and_optional_address():
    config = parse(active_checks=True, stats="[::1]:0")
    assert config.pools[0].active_checks is True
    assert config.stats == Address("::1", 0)


def test_describe_has_one_line_per_setting_and_per_backend():
    config = fastlb.config.load(
        {
            "listen": ["127.0.0.1:8000"],
            "backends": ["127.0.0.1:9000,weight=2", "127.0.0.1:9001,backup"],
        },
        None,
    )
    lines = [line.split() for line in fastlb.config.describe(config)]
    # Every option once, the second backend, and the frontend's pool, sni and sni-required.
    assert len(lines) == len(settings.OPTIONS) + 1 + 3
    assert ["pool", "default:", "backend", "=", "127.0.0.1:9000,weight=2"] in lines
    assert ["pool", "default:", "backend", "=", "127.0.0.1:9001,weight=1,backup"] in lines
    assert ["frontend", "default:", "accept-proxy", "=", "off"] in lines
    assert ["stats", "=", "off"] in lines
