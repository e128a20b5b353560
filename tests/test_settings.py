"""The settings table: parsing, validation, defaults, and what is derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastlb.config
from fastlb import _dataplane, model, settings
from fastlb.errors import ConfigError
from fastlb.model import Address, BackendSpec, CheckSpec, Config, FrontendSpec, PoolSpec


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
    assert frontend.idle_timeout == 600.0  # nginx stream's proxy_timeout
    assert pool.retries == 2
    assert (pool.check.fall, pool.check.rise) == (3, 2)
    assert (pool.check.interval, pool.check.timeout) == (2.0, 1.0)
    assert pool.check.active is False
    assert pool.check == CheckSpec()
    assert (pool.observe, pool.on_down, pool.slow_start) == (None, None, 0.0)
    assert (pool.first_byte_timeout, pool.panic_threshold) == (10.0, 0.5)
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
    settings.POOL: (PoolSpec, {"name", "check", "protocol"}),
    settings.CHECK: (CheckSpec, set()),
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
        own = {option.attribute for option in settings.OPTIONS if option.scope == scope}
        assert {field.name for field in dataclasses.fields(cls)} == own | extra, scope


def test_the_check_options_default_to_the_models_defaults():
    for option in settings.OPTIONS:
        if option.scope == settings.CHECK:
            assert option.value(None) == getattr(CheckSpec(), option.attribute), option.name
            assert option.table_key, option.name
            if option.name != "active_checks":  # --check turns on what the table's active does
                assert option.key.endswith(option.table_key), option.name
        else:
            assert option.command_line and not option.table_key and not option.check_types
        assert set(option.check_types) <= set(model.CHECK_TYPES), option.name


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
        ({"observe": "everything"}, "--observe everything: choose from first-byte"),
        ({"first_byte_timeout": "0"}, "--first-byte-timeout 0: must be more than 0"),
        ({"on_down": "kill"}, "--on-down kill: choose from close"),
        ({"slow_start": "-1"}, "--slow-start -1: must be 0 or more"),
        ({"panic_threshold": "1.5"}, "--panic-threshold 1.5: must be from 0 to 1"),
        ({"panic_threshold": "120%"}, "--panic-threshold 120%: must be from 0 to 1"),
        ({"panic_threshold": "half"}, "expected a share, as in 0.5 or 50%"),
        ({"check_type": "ftp"}, "--check-type ftp: choose from tcp, http, send-expect, redis"),
        ({"check_port": "0"}, "--check-port 0: port must be between 1 and 65535"),
        ({"check_interval": "0"}, "--check-interval 0: must be more than 0"),
        ({"check_timeout": "-1s"}, "--check-timeout -1s: must be more than 0"),
        ({"rise": "0"}, "--rise 0: must be at least 1 and at most 1000"),
        ({"fall": "1001"}, "--fall 1001: must be at least 1 and at most 1000"),
        ({"check_type": "http", "check_path": "health"}, "--check-path health: must start with /"),
        ({"check_type": "http", "check_path": "/a b"}, "no spaces or control characters"),
        ({"check_type": "http", "check_host": "a b"}, "--check-host a b: no spaces"),
        ({"check_type": "http", "check_expect_status": "200-"}, "bad status range '200-'"),
        ({"check_type": "http", "check_expect_status": "299-200"}, "it ends below its start"),
        ({"check_type": "http", "check_expect_status": "600"}, "from 100 to 599"),
        ({"check_type": "send-expect", "check_send": "a\\q"}, "unknown escape \\q"),
        ({"check_type": "send-expect", "check_expect": ""}, "--check-expect : must not be empty"),
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
    assert config.pools[0].check.active is True
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
    # Every option once (the check's: those of tcp checks, no flap damping), the second
    # backend, and the frontend's pool, sni and sni-required.
    tcp = fastlb.config.check_keys("tcp")
    assert len(tcp) == 13
    others = [option for option in settings.OPTIONS if option.scope != settings.CHECK]
    assert len(lines) == len(others) + len(tcp) - 2 + 1 + 3
    assert ["pool", "default:", "check.type", "=", "tcp"] in lines
    assert ["pool", "default:", "check.port", "=", "the", "backend's"] in lines
    assert ["pool", "default:", "backend", "=", "127.0.0.1:9000,weight=2"] in lines
    assert ["pool", "default:", "backend", "=", "127.0.0.1:9001,weight=1,backup"] in lines
    assert ["frontend", "default:", "accept-proxy", "=", "off"] in lines
    assert ["stats", "=", "off"] in lines


def test_check_flags_describe_the_default_pools_check():
    check = parse(
        check_type="http", check_port="8081", check_path="/health", check_host="db.test",
        check_expect_status="2xx,301", check_interval="3s", check_timeout="1s", rise="2",
        fall="3", active_checks=True,
    ).pool("default").check  # fmt: skip
    assert check == CheckSpec(
        type="http", active=True, interval=3.0, timeout=1.0, rise=2, fall=3, port=8081,
        path="/health", host="db.test", expect_status=((200, 299), (301, 301)),
    )  # fmt: skip
    check = (
        parse(check_type="send-expect", check_send="PING\\r\\n", check_expect="+PONG")
        .pool("default")
        .check
    )
    assert (check.type, check.send, check.expect) == ("send-expect", b"PING\r\n", b"+PONG")


def test_pool_flags():
    pool = parse(
        observe="first-byte", first_byte_timeout="3s", on_down="close", slow_start="1m",
        panic_threshold="25%",
    ).pool("default")  # fmt: skip
    assert (pool.observe, pool.first_byte_timeout, pool.on_down) == ("first-byte", 3.0, "close")
    assert (pool.slow_start, pool.panic_threshold) == (60.0, 0.25)
    assert parse(panic_threshold="0").pool("default").panic_threshold == 0.0
    assert parse(observe="off", on_down="off").pool("default").observe is None


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"check_path": "/health"}, "--check-path is for type http, and the check type is tcp"),
        ({"check_type": "redis", "check_send": "x"}, "--check-send is for type send-expect"),
        ({"check_type": "agent"}, "pool default: an agent check needs the port its agent"),
        (
            {"check_type": "send-expect"},
            "pool default: a send-expect check needs something to send or expect",
        ),
    ],
)
def test_check_flags_must_fit_the_check_type(values, expected):
    assert error(**values).startswith(expected)


def test_file_only_check_settings_are_no_flags():
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    flags = {action.dest for action in parser._actions}
    for option in settings.OPTIONS:
        assert (option.name in flags) == option.command_line, option.name
    for name in ("check_type", "check_port", "check_path", "check_host", "check_expect_status",
                 "check_send", "check_expect", "active_checks", "check_interval", "check_timeout",
                 "rise", "fall", "observe", "first_byte_timeout", "on_down", "slow_start",
                 "panic_threshold"):  # fmt: skip
        assert name in flags


@pytest.mark.parametrize(
    "text, ranges",
    [
        ("200", ((200, 200),)),
        ("200-399", ((200, 399),)),
        ("2xx, 3xx", ((200, 299), (300, 399))),
        ("200-299,301", ((200, 299), (301, 301))),
    ],
)
def test_status_ranges(text, ranges):
    assert settings.status_ranges(text) == ranges


@pytest.mark.parametrize(
    "text, value",
    [
        ("PING\\r\\n", b"PING\r\n"),
        ("a\\\\b", b"a\\b"),
        ("\\x00\\xff\\t\\0", b"\x00\xff\t\x00"),
        ("é", "é".encode()),
    ],
)
def test_escaped_bytes(text, value):
    assert settings.escaped_bytes(text) == value


@pytest.mark.parametrize("text", ["", "a\\", "\\x4", "\\q"])
def test_bad_escaped_bytes(text):
    with pytest.raises(ValueError):
        settings.escaped_bytes(text)


@given(st.binary(min_size=1, max_size=40))
def test_shown_bytes_read_back_as_themselves(value):
    assert settings.escaped_bytes(settings.show_bytes(value)) == value
    assert settings.hex_bytes(value.hex()) == value


@pytest.mark.parametrize("text", ["", "zz", "a", "2a3"])
def test_bad_hex_bytes(text):
    with pytest.raises(ValueError):
        settings.hex_bytes(text)


@given(st.integers(min_value=0, max_value=100))
def test_a_percentage_is_its_share(percent):
    assert settings.share(f"{percent}%") == percent / 100
    assert settings.share(str(percent / 100)) == percent / 100
