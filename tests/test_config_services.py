"""Several services in one configuration: [frontend.NAME] and [pool.NAME] tables, the defaults
they inherit from the flags and the top level, and every mistake as one FILE:LINE line."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastlb.config
from fastlb import model, settings
from fastlb.errors import ConfigError
from fastlb.model import Address, BackendSpec, Config, FrontendSpec, PoolSpec, SniRoute

HERE = Path(__file__).resolve().parent
CONTRIB = HERE.parent / "contrib"

EXAMPLE = """\
workers = 4
stats = "127.0.0.1:9000"

[frontend.tls]
listen = ["127.0.0.1:8443", "[::1]:8443"]
pool = "web"                                          # the default route
sni = { "api.example.test" = "api", "*.example.test" = "web" }
accept-proxy = ["127.0.0.0/8"]                        # PROXY v1/v2 accepted from these senders only
max-conn = 20000

[pool.web]
algorithm = "leastconn"
backend = ["127.0.0.1:9001", "127.0.0.1:9002,weight=2", "127.0.0.1:9003,backup"]
send-proxy = "v2"                                     # or "v1"; absent: off
connect-timeout = "2s"

[pool.api]
backend = ["127.0.0.1:9101"]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "services.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def flags(*argv: str) -> dict:
    """Raw values by option name, as the command line gives them to config.load."""
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return vars(parser.parse_args(list(argv)))


def load(tmp_path: Path, text: str, *argv: str) -> Config:
    return fastlb.config.load(flags(*argv), write(tmp_path, text))


def test_the_example_parses_to_frontends_and_pools(tmp_path):
    config = load(tmp_path, EXAMPLE)
    assert config == Config(
        frontends=(
            FrontendSpec(
                name="tls",
                listen=(Address("127.0.0.1", 8443), Address("::1", 8443)),
                pool="web",
                sni=(SniRoute("api.example.test", "api"), SniRoute("*.example.test", "web")),
                accept_proxy=(ipaddress.ip_network("127.0.0.0/8"),),
                max_conn=20000,
                idle_timeout=600.0,
            ),
        ),
        pools=(
            PoolSpec(
                name="web",
                backends=(
                    BackendSpec(Address("127.0.0.1", 9001)),
                    BackendSpec(Address("127.0.0.1", 9002), weight=2),
                    BackendSpec(Address("127.0.0.1", 9003), backup=True),
                ),
                algorithm="leastconn",
                send_proxy="v2",
                connect_timeout=2.0,
            ),
            PoolSpec(name="api", backends=(BackendSpec(Address("127.0.0.1", 9101)),)),
        ),
        workers=4,
        stats=Address("127.0.0.1", 9000),
    )
    assert config.frontend("tls").pools() == ["web", "api"]


def test_describe_names_every_frontend_and_pool_setting(tmp_path):
    lines = fastlb.config.describe(load(tmp_path, EXAMPLE))
    words = [line.split() for line in lines]
    assert words[0] == ["workers", "=", "4"]
    assert ["frontend", "tls:", "listen", "=", "[::1]:8443"] in words
    assert ["frontend", "tls:", "sni", "=", "*.example.test", "->", "web"] in words
    assert ["frontend", "tls:", "accept-proxy", "=", "127.0.0.0/8"] in words
    assert ["frontend", "tls:", "inspect-timeout", "=", "5.0"] in words
    assert ["pool", "web:", "backend", "=", "127.0.0.1:9003,weight=1,backup"] in words
    assert ["pool", "web:", "send-proxy", "=", "v2"] in words
    assert ["pool", "api:", "send-proxy", "=", "off"] in words
    # Every process option, then every frontend and pool option of each.
    process = [o for o in settings.OPTIONS if o.scope == settings.PROCESS]
    assert [line.split()[0] for line in lines[: len(process)]] == [o.key for o in process]
    for option in settings.OPTIONS:
        if option.scope == settings.POOL:
            for pool in ("web:", "api:"):
                assert any(w[:3] == ["pool", pool, option.key] for w in words), option.key


def test_top_level_and_flags_are_the_defaults_of_every_table(tmp_path):
    text = """\
        connect-timeout = "3s"
        max-conn = 300
        retries = 4
        listen = "127.0.0.1:7000"
        backend = ["127.0.0.1:9000"]

        [frontend.a]
        listen = "127.0.0.1:7001"
        pool = "p"

        [frontend.b]
        listen = "127.0.0.1:7002"
        pool = "p"
        max-conn = 50

        [pool.p]
        backend = ["127.0.0.1:9001"]
        retries = 1
    """
    config = load(tmp_path, text, "--connect-timeout", "1s", "--idle-timeout", "9")
    # listen and backend describe the default frontend and pool only.
    assert [f.name for f in config.frontends] == ["default", "a", "b"]
    assert config.frontend("a").listen == (Address("127.0.0.1", 7001),)
    assert config.pool("p").backends == (BackendSpec(Address("127.0.0.1", 9001)),)
    assert config.frontend("default").pool == "default"
    # A flag wins over the top level, a table over both.
    assert {p.name: p.connect_timeout for p in config.pools} == {"default": 1.0, "p": 1.0}
    assert {p.name: p.retries for p in config.pools} == {"default": 4, "p": 1}
    assert {f.name: f.max_conn for f in config.frontends} == {"default": 300, "a": 300, "b": 50}
    assert {f.idle_timeout for f in config.frontends} == {9.0}


def test_a_table_setting_wins_over_a_flag(tmp_path):
    text = """\
        [frontend.a]
        listen = "127.0.0.1:7001"
        pool = "p"
        [pool.p]
        backend = "127.0.0.1:9001"
        algorithm = "leastconn"
        [pool.q]
        backend = "127.0.0.1:9002"
    """
    config = load(tmp_path, text, "--algorithm", "maglev", "--send-proxy", "v1", "--check")
    assert [(p.name, p.algorithm) for p in config.pools] == [("p", "leastconn"), ("q", "maglev")]
    assert {(p.send_proxy, p.check.active) for p in config.pools} == {("v1", True)}
    assert [p.name for p in config.pools] == ["p", "q"]  # no default pool without backend


def test_flags_add_a_default_frontend_and_pool_to_a_file(tmp_path):
    text = '[frontend.a]\nlisten = "127.0.0.1:7001"\npool = "default"\n'
    config = load(tmp_path, text, "--listen", "127.0.0.1:7000", "--backend", "127.0.0.1:9000")
    assert [(f.name, f.pool) for f in config.frontends] == [
        ("default", "default"),
        ("a", "default"),
    ]
    assert [p.name for p in config.pools] == ["default"]


FLAT = """\
listen = "127.0.0.1:8000"
algorithm = "leastconn"
workers = 3
connect-timeout = "250ms"
max_conn = 500
check = true
send-proxy = "v1"
accept-proxy = "10.1.0.0/16"
backend = [
    "127.0.0.1:9001",
    "127.0.0.1:9002,weight=2",
    "127.0.0.1:9003,backup",
]
"""


def test_a_flat_file_is_one_default_frontend_and_pool_as_the_flags_give(tmp_path):
    from_file = load(tmp_path, FLAT)
    from_flags = fastlb.config.load(
        flags(
            "--listen", "127.0.0.1:8000", "--algorithm", "leastconn", "--workers", "3",
            "--connect-timeout", "250ms", "--max-conn", "500", "--check", "--send-proxy", "v1",
            "--accept-proxy", "10.1.0.0/16",
            "--backend", "127.0.0.1:9001", "--backend", "127.0.0.1:9002,weight=2",
            "--backend", "127.0.0.1:9003,backup",
        ),
        None,
    )  # fmt: skip
    assert from_file == from_flags
    (frontend,) = from_file.frontends
    (pool,) = from_file.pools
    assert (frontend.name, frontend.pool, pool.name) == (model.DEFAULT,) * 3
    assert frontend.max_conn == 500 and frontend.accept_proxy == (
        ipaddress.ip_network("10.1.0.0/16"),
    )
    assert (pool.algorithm, pool.connect_timeout, pool.check.active) == ("leastconn", 0.25, True)
    assert [(b.weight, b.backup) for b in pool.backends] == [(1, False), (2, False), (1, True)]
    assert from_file.workers == 3


def test_flags_win_over_top_level_keys(tmp_path):
    config = load(tmp_path, FLAT, "--workers", "1", "--backend", "127.0.0.1:7000")
    assert config.workers == 1
    assert [str(b.address) for b in config.pool("default").backends] == ["127.0.0.1:7000"]
    assert config.pool("default").algorithm == "leastconn"


def test_repeated_listen_flags_and_defaults():
    config = fastlb.config.load(
        flags("--listen", "127.0.0.1:7000", "--listen", "[::1]:7000", "--backend", "127.0.0.1:1"),
        None,
    )
    (frontend,) = config.frontends
    assert frontend.listen == (Address("127.0.0.1", 7000), Address("::1", 7000))
    assert (frontend.inspect_timeout, frontend.accept_proxy, frontend.sni) == (5.0, (), ())
    assert config.pool("default").send_proxy is None


def test_port_0_may_repeat(tmp_path):
    text = """\
        listen = ["127.0.0.1:0", "127.0.0.1:0"]
        backend = "127.0.0.1:9000"
        [frontend.a]
        listen = "127.0.0.1:0"
    """
    assert len(load(tmp_path, text).frontends) == 2


def test_sni_keys_are_lower_case_and_may_be_a_table_of_their_own(tmp_path):
    text = """\
        [pool.p]
        backend = "127.0.0.1:9000"
        [frontend.a]
        listen = "127.0.0.1:7001"
        pool = "p"
        sni-required = true
        [frontend.a.sni]
        "API.Example.TEST" = "p"
        "*.Example.test" = "p"
    """
    frontend = load(tmp_path, text).frontend("a")
    assert frontend.sni == (SniRoute("api.example.test", "p"), SniRoute("*.example.test", "p"))
    assert frontend.sni_required and frontend.sni[1].wildcard


POOL_P = '[pool.p]\nbackend = "127.0.0.1:9000"\n'
FRONT_A = '[frontend.a]\nlisten = "127.0.0.1:7001"\npool = "p"\n'
FLAT_1 = 'listen = "127.0.0.1:7001"\nbackend = "127.0.0.1:9"\n'


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (POOL_P + '[frontend.a]\nlisten = "127.0.0.1:7001"\nalgorithm = "x"\n', 5,
         "unknown key 'algorithm' in [frontend.a]; algorithm is a pool setting (a frontend "
         "takes: listen, max-conn, idle-timeout, inspect-timeout, accept-proxy, protocol, "
         "max-flows, pool, sni, sni-required)"),
        (POOL_P + "bogus = 1\n" + FRONT_A, 3,
         "unknown key 'bogus' in [pool.p] (a pool takes: backend, algorithm,"),
        (POOL_P + FRONT_A + "workers = 2\n", 6, "workers is a process setting"),
        ('workrs = 3\n' + POOL_P + FRONT_A, 1, "unknown setting 'workrs'"),
        (POOL_P + '[frontend.a]\nlisten = "127.0.0.1:7001"\n\npool = "nope"\n', 6,
         "frontend a: pool: no pool named 'nope' (pools: p)"),
        (POOL_P + FRONT_A + 'sni = { "x.test" = "p", "y.test" = "q" }\n', 6,
         "frontend a: sni 'y.test': no pool named 'q' (pools: p)"),
        (POOL_P + FRONT_A + '[frontend.a.sni]\n"x.test" = "p"\n"y.test" = "q"\n', 8,
         "no pool named 'q'"),
        (POOL_P + FRONT_A + '[frontend.b]\npool = "p"\nlisten = ["127.0.0.1:7002",\n'
         '  "127.0.0.1:7001"]\n', 8, "listen 127.0.0.1:7001 is also used by frontend a"),
        (FLAT_1 + '[frontend.a]\nlisten = "127.0.0.1:7001"\n', 4,
         "listen 127.0.0.1:7001 is also used by frontend default"),
        (POOL_P + '[frontend.a]\npool = "p"\nlisten = ["[::1]:7001", "[::1]:7001"]\n', 5,
         "listen [::1]:7001 is given twice"),
        (POOL_P + '\n[frontend.a]\npool = "p"\n', 4, "[frontend.a] has no listen"),
        ('[pool.p]\nalgorithm = "leastconn"\n' + FRONT_A, 1, "[pool.p] has no backend"),
        ('[pool.p]\nbackend = []\n' + FRONT_A, 2, "pool p has no backend"),
        ('[pool.p]\nbackend = [\n  "127.0.0.1:9001",\n  "127.0.0.1:9001,weight=2",\n]\n' + FRONT_A,
         2, "pool p: backend 127.0.0.1:9001 is given twice"),
        ('listen = "127.0.0.1:1"\nbackend = ["127.0.0.1:2", "127.0.0.1:2"]\n', 2,
         "--backend 127.0.0.1:2 is given twice"),
        (POOL_P + FRONT_A + 'sni = { "a..test" = "p" }\n', 6, "sni 'a..test': empty label"),
        (POOL_P + FRONT_A + 'sni = { "a.*.test" = "p" }\n', 6,
         "* may only be the whole first label"),
        (POOL_P + FRONT_A + 'sni = { "-a.test" = "p" }\n', 6, "no '-' first or last"),
        (POOL_P + FRONT_A + 'sni = { "x.test" = "p", "X.Test" = "p" }\n', 6,
         "sni 'X.Test' is given twice (as 'x.test')"),
        (POOL_P + FRONT_A + 'sni = "x.test"\n', 6, "sni takes a table of host name = pool"),
        (POOL_P + FRONT_A + "\nsni-required = true\n", 7,
         "sni-required is set but the frontend has no sni routes"),
        (POOL_P + FRONT_A + 'sni_required = "yes"\n', 6, "sni-required must be true or false"),
        (POOL_P + FRONT_A + 'accept-proxy = ["127.0.0.1", "10.0.0.1/8"]\n', 6,
         "--accept-proxy 10.0.0.1/8: host bits are set: write 10.0.0.0/8 for the network, or "
         "10.0.0.1 alone"),
        (POOL_P + FRONT_A + 'accept-proxy = "localhost"\n', 6,
         "--accept-proxy localhost: expected an IP address or a network"),
        (POOL_P + 'send-proxy = "v3"\n' + FRONT_A, 3, "--send-proxy v3: choose from v1, v2"),
        ('send-proxy = "on"\n' + POOL_P + FRONT_A, 1, "--send-proxy on: choose from v1, v2"),
        (POOL_P + FRONT_A + 'inspect-timeout = "0"\n', 6,
         "--inspect-timeout 0: must be more than 0"),
        (POOL_P + '[frontend."a b"]\nlisten = "127.0.0.1:1"\npool = "p"\n', 3,
         "frontend name 'a b': use letters, digits, '_', '.' and '-'"),
        ('[pool."p/q"]\nbackend = "127.0.0.1:1"\n', 1, "pool name 'p/q'"),
        ("[pool]\nx = 1\n", 2, "pool.x is not a table; write [pool.x]"),
        ('pool = "web"\n', 1, "pool takes tables: [pool.NAME]"),
        (POOL_P + '[frontend.a]\nlisten = "127.0.0.1:7001"\n', 3,
         "[frontend.a] has no pool = NAME"),
        ('backend = "127.0.0.1:1"\n[pool.default]\nbackend = "127.0.0.1:2"\n', 2,
         "[pool.default] is also given by backend at the top level"),
        (POOL_P + FRONT_A + "max-conn = 5\nmax_conn = 6\n", 7, "max_conn is set twice"),
        (POOL_P + FRONT_A + 'listen = "127.0.0.1:7009"\n', 6, "Cannot overwrite a value"),
    ],
)  # fmt: skip
def test_mistakes_name_the_file_and_line(tmp_path, text, line, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        fastlb.config.load(flags(), path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "argv", "expected"),
    [
        (POOL_P, [], "--listen is required (or a [frontend.NAME] in the --config file)"),
        ('listen = "127.0.0.1:1"\n' + POOL_P, [],
         "at least one --backend is required (or backend in the --config file)"),
        (POOL_P, ["--listen", "127.0.0.1:1", "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2"],
         "--listen 127.0.0.1:1 is given twice"),
        (POOL_P, ["--accept-proxy", "::1/64", "--listen", "127.0.0.1:1"],
         "--accept-proxy ::1/64: host bits are set"),
    ],
)  # fmt: skip
def test_mistakes_that_belong_to_no_line(tmp_path, text, argv, expected):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, *argv)
    assert str(caught.value).startswith(expected)


def test_accept_proxy_takes_networks_and_single_addresses():
    parse = settings.parse_network
    assert parse("10.0.0.1") == ipaddress.ip_network("10.0.0.1/32")
    assert parse("::1") == ipaddress.ip_network("::1/128")
    assert parse("127.0.0.0/8") == ipaddress.ip_network("127.0.0.0/8")
    assert parse("fd00::/8") == ipaddress.ip_network("fd00::/8")
    for bad in ("10.0.0.1/8", "10.0.0.0/33", "fe80::1%eth0", "", "10.0.0"):
        with pytest.raises(ValueError):
            parse(bad)


# ---- SNI patterns --------------------------------------------------------------------------

LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
NAMES = st.lists(LABEL, min_size=1, max_size=6).map(".".join).filter(lambda name: len(name) <= 251)
REFERENCE = re.compile(
    r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


@given(NAMES, st.booleans())
def test_every_dns_name_is_a_pattern_in_lower_case(name, wildcard):
    text = "*." + name if wildcard else name
    assert fastlb.config.sni_pattern(text) == text.lower()


@given(st.text(alphabet="aZ09-.*_ é", max_size=80) | NAMES.map(lambda n: n + "."))
def test_a_pattern_is_accepted_exactly_when_it_is_a_dns_name(text):
    valid = text.isascii() and len(text) <= 253 and REFERENCE.fullmatch(text.lower()) is not None
    try:
        fastlb.config.sni_pattern(text)
    except ValueError:
        assert not valid
    else:
        assert valid


def test_long_names_and_labels_are_rejected():
    label = "a" * 63
    assert fastlb.config.sni_pattern(label + ".test") == label + ".test"
    with pytest.raises(ValueError, match="longer than 63"):
        fastlb.config.sni_pattern("a" + label + ".test")
    name = ".".join([label] * 4)  # 255 characters
    with pytest.raises(ValueError, match="at most 253"):
        fastlb.config.sni_pattern(name)


# ---- the open-file limit -------------------------------------------------------------------


def test_every_frontend_is_scaled_down_to_fit_the_open_file_limit(tmp_path):
    text = POOL_P + textwrap.dedent("""\
        [frontend.a]
        listen = "127.0.0.1:7001"
        pool = "p"
        max-conn = 30000
        [frontend.b]
        listen = "127.0.0.1:7002"
        pool = "p"
        max-conn = 10000
        [frontend.c]
        listen = "127.0.0.1:7003"
        pool = "p"
        max-conn = 1
    """)
    config = load(tmp_path, text)
    same, message = fastlb.config.fit_to_open_file_limit(config, 1_000_000)
    assert same is config and message is None
    fitted, message = fastlb.config.fit_to_open_file_limit(config, 8192 + settings.FD_RESERVE)
    sizes = {f.name: f.max_conn for f in fitted.frontends}
    assert sizes == {"a": 3071, "b": 1023, "c": 1}  # 4096 shared 3:1, and c keeps 1
    assert 2 * fitted.max_conn + settings.FD_RESERVE <= 8192 + settings.FD_RESERVE
    assert "frontend a from 30000 to 3071" in message
    assert fitted.pools == config.pools


def test_one_frontend_keeps_the_flat_message():
    config = fastlb.config.load(
        flags("--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--max-conn", "10000"), None
    )
    same, message = fastlb.config.fit_to_open_file_limit(config, 1_000_000)
    assert same is config and message is None
    fitted, message = fastlb.config.fit_to_open_file_limit(config, 4096)
    assert fitted.max_conn == (4096 - settings.FD_RESERVE) // 2
    assert 2 * fitted.max_conn + settings.FD_RESERVE <= 4096
    assert message.startswith(f"--max-conn lowered from 10000 to {fitted.max_conn} to fit")


# ---- the example files and fastlb check -----------------------------------------------------


def test_the_example_files_are_valid():
    services = fastlb.config.load({}, str(CONTRIB / "services.toml"))
    assert [f.name for f in services.frontends] == ["postgres", "redis", "https"]
    assert {p.name for p in services.pools} == {"postgres", "redis", "web", "api"}
    assert services.frontend("https").sni and services.frontend("https").accept_proxy
    assert all(p.check.active and p.check.interval == 2.0 for p in services.pools)
    assert [services.pool(name).check.type for name in ("postgres", "redis", "web", "api")] == [
        "postgres", "redis", "tls", "tcp",
    ]  # fmt: skip
    assert services.pool("redis").check.timeout == 0.5
    for frontend in services.frontends:
        assert all(ipaddress.ip_address(a.host).is_loopback for a in frontend.listen)
    for pool in services.pools:
        assert all(ipaddress.ip_address(b.address.host).is_loopback for b in pool.backends)
    flat = fastlb.config.load({}, str(CONTRIB / "fastlb.toml"))
    assert [f.name for f in flat.frontends] == [p.name for p in flat.pools] == [model.DEFAULT]
    assert flat.pools[0].check.active and len(flat.pools[0].backends) == 3


@pytest.fixture
def listening_address():
    """ "127.0.0.1:PORT" of a listening socket: a TCP connect to it succeeds (the kernel
    completes it from the backlog)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_check_prints_every_frontend_and_pool_and_probes_every_backend(
    tmp_path, listening_address, refused_address
):
    text = f"""\
        max-conn = 100
        [frontend.db]
        listen = "127.0.0.1:0"
        pool = "db"
        [frontend.tls]
        listen = ["127.0.0.1:0", "[::1]:0"]
        pool = "web"
        sni = {{ "api.example.test" = "db" }}
        [pool.db]
        backend = ["{listening_address}"]
        [pool.web]
        backend = ["{listening_address}", "{refused_address},backup"]
        send-proxy = "v1"
    """
    result = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "check", "--config", write(tmp_path, text)],
        capture_output=True, text=True, timeout=30, cwd=HERE,
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert result.stderr.splitlines() == [
        f"fastlb: error: pool web backend {refused_address} is unreachable: Connection refused"
    ]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["frontend", "db:", "listen", "=", "127.0.0.1:0"] in lines
    assert ["frontend", "tls:", "listen", "=", "[::1]:0"] in lines
    assert ["frontend", "tls:", "sni", "=", "api.example.test", "->", "db"] in lines
    assert ["frontend", "tls:", "max-conn", "=", "100"] in lines
    assert ["pool", "db:", "backend", "=", f"{listening_address},weight=1"] in lines
    assert ["pool", "web:", "backend", "=", f"{refused_address},weight=1,backup"] in lines
    assert ["pool", "web:", "send-proxy", "=", "v1"] in lines
    assert ["pool", "db:", "send-proxy", "=", "off"] in lines


def test_check_reports_a_mistake_in_one_line(tmp_path):
    path = write(tmp_path, POOL_P + FRONT_A + 'sni = { "bad_name.test" = "p" }\n')
    result = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "check", "--config", path],
        capture_output=True, text=True, timeout=30, cwd=HERE,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"fastlb: error: {path}:6: sni 'bad_name.test': label 'bad_name': letters, digits and "
        "'-' only, and no '-' first or last"
    ]


# ---- health checks: [pool.NAME.check] and the pool's passive, on-down, slow-start and panic keys

CHECKS = """\
listen = "127.0.0.1:7000"
backend = "127.0.0.1:9000"
check-interval = "5s"                 # the default of every check below
rise = 4
check-path = "/ready"                 # for http checks only: the top level's type is http
check-type = "http"

[pool.web]
backend = "127.0.0.1:9001"
observe = "first-byte"
first-byte-timeout = "2s"
on-down = "close"
slow-start = "1m"
panic-threshold = "30%"
[pool.web.check]
method = "HEAD"
host = "www.example.test"
expect-status = [200, "300-399"]
expect-body = "ok"
expect-body-regex = 'up \\d+'
port = 8081
interval = "3s"
fast-interval = "500ms"
down-interval = "10s"
jitter = "200ms"
flap-window = "1m"
flap-base = "5s"
flap-max = "2m"

[pool.redis]
backend = "127.0.0.1:9002"
check = { type = "redis", username = "probe", password = "secret", active = false }

[pool.kv]
backend = "127.0.0.1:9003"
[pool.kv.check]
type = "send-expect"
send-hex = "50494e470d0a"
expect = "+PONG\\r\\n"
expect-regex = '^\\+PONG'

[pool.pg]
backend = "127.0.0.1:9004"
[pool.pg.check]
type = "postgres"
ssl-request = false
user = "monitor"
database = "postgres"
timeout = "2s"

[pool.my]
backend = "127.0.0.1:9005"
check.type = "mysql"

[pool.tls]
backend = "127.0.0.1:9006"
check = { type = "tls", sni = "api.example.test" }

[pool.agent]
backend = "127.0.0.1:9007"
check = { type = "agent", port = 9999 }

[pool.plain]
backend = "127.0.0.1:9008"
check = true

[pool.off]
backend = "127.0.0.1:9009"
check = false
"""


def test_check_tables_of_every_type(tmp_path):
    config = load(tmp_path, CHECKS)
    checks = {pool.name: pool.check for pool in config.pools}
    # The flags and top level are the default pool's check, and the defaults of the tables.
    assert checks["default"] == model.CheckSpec(type="http", interval=5.0, rise=4, path="/ready")
    assert checks["web"] == model.CheckSpec(
        type="http", active=True, interval=3.0, fast_interval=0.5, down_interval=10.0, rise=4,
        jitter=0.2, port=8081, method="HEAD", path="/ready", host="www.example.test",
        expect_status=((200, 200), (300, 399)), expect_body="ok", expect_body_regex=r"up \d+",
        flap_window=60.0, flap_base=5.0, flap_max=120.0,
    )  # fmt: skip
    # A table of another type takes the top level's keys that fit it (interval, rise), not
    # the others (path).
    assert checks["redis"] == model.CheckSpec(
        type="redis", active=False, interval=5.0, rise=4, username="probe", password="secret"
    )
    assert checks["kv"] == model.CheckSpec(
        type="send-expect", active=True, interval=5.0, rise=4, send=b"PING\r\n",
        expect=b"+PONG\r\n", expect_regex=r"^\+PONG",
    )  # fmt: skip
    assert checks["pg"] == model.CheckSpec(
        type="postgres", active=True, interval=5.0, rise=4, timeout=2.0, ssl_request=False,
        user="monitor", database="postgres",
    )  # fmt: skip
    assert checks["my"] == model.CheckSpec(type="mysql", active=True, interval=5.0, rise=4)
    assert checks["tls"] == model.CheckSpec(
        type="tls", active=True, interval=5.0, rise=4, sni="api.example.test"
    )
    assert checks["agent"] == model.CheckSpec(
        type="agent", active=True, interval=5.0, rise=4, port=9999
    )
    # check = true or false: the top level's check, on or off.
    assert checks["plain"] == dataclasses.replace(checks["default"], active=True)
    assert checks["off"] == checks["default"]
    web = config.pool("web")
    assert (web.observe, web.first_byte_timeout, web.on_down) == ("first-byte", 2.0, "close")
    assert (web.slow_start, web.panic_threshold) == (60.0, 0.3)
    default = config.pool("default")
    assert (default.observe, default.on_down, default.panic_threshold) == (None, None, 0.5)


def test_a_check_table_turns_active_checks_on_unless_it_says_otherwise(tmp_path):
    text = """\
        [frontend.a]
        listen = "127.0.0.1:7001"
        pool = "p"
        [pool.p]
        backend = "127.0.0.1:9001"
        [pool.p.check]
        rise = 1
        [pool.q]
        backend = "127.0.0.1:9002"
        [pool.r]
        backend = "127.0.0.1:9003"
        check = { active = false }
    """
    config = load(tmp_path, text)
    assert [p.check.active for p in config.pools] == [True, False, False]
    # The --check flag is the default of the pools that say nothing.
    config = load(tmp_path, text, "--check", "--check-timeout", "3s", "--fall", "5")
    assert [p.check.active for p in config.pools] == [True, True, False]
    assert {(p.check.timeout, p.check.fall) for p in config.pools} == {(3.0, 5)}
    assert config.pool("p").check.rise == 1
    # A table's own spelling of a value wins over the top level's other one.
    text = """\
        check-type = "send-expect"
        check-send = "a"
        [frontend.a]
        listen = "127.0.0.1:7001"
        pool = "p"
        [pool.p]
        backend = "127.0.0.1:9001"
        check = { send-hex = "62" }
    """
    assert load(tmp_path, text).pool("p").check.send == b"b"


def test_describe_shows_the_check_settings_of_each_type(tmp_path):
    lines = [line.split() for line in fastlb.config.describe(load(tmp_path, CHECKS))]

    def check_rows(pool: str) -> dict[str, str]:
        return {
            words[2].removeprefix("check."): " ".join(words[4:])
            for words in lines
            if words[:2] == ["pool", f"{pool}:"] and words[2].startswith("check.")
        }

    web = check_rows("web")
    assert list(web) == fastlb.config.check_keys("http")
    assert (web["expect-status"], web["flap-base"], web["port"]) == ("200,300-399", "5.0", "8081")
    redis = check_rows("redis")
    assert (redis["password"], redis["username"], redis["active"]) == ("(set)", "probe", "off")
    assert "secret" not in str(lines)
    kv = check_rows("kv")
    assert (kv["send"], kv["expect"], kv["expect-regex"]) == (
        "PING\\r\\n",
        "+PONG\\r\\n",
        r"^\+PONG",
    )
    assert "send-hex" not in kv and "path" not in kv
    assert "flap-base" not in check_rows("pg")  # no flap damping: its keys are not shown
    assert check_rows("pg")["database"] == "postgres"
    assert check_rows("my")["fast-interval"] == "the interval"
    assert set(check_rows("my")) == set(fastlb.config.check_keys("mysql")) - {
        "flap-base", "flap-max",
    }  # fmt: skip
    assert check_rows("agent")["port"] == "9999"
    assert ["pool", "web:", "panic-threshold", "=", "0.3"] in lines


def test_check_keys_of_each_type():
    common = [
        "type", "active", "interval", "fast-interval", "down-interval", "timeout", "rise", "fall",
        "jitter", "port",
    ]  # fmt: skip
    flap = ["flap-window", "flap-base", "flap-max"]
    own = {
        "tcp": [],
        "http": [
            "method",
            "path",
            "host",
            "expect-status",
            "expect-body",
            "expect-body-regex",
            "reuse-connection",
        ],
        "send-expect": ["send", "send-hex", "expect", "expect-hex", "expect-regex"],
        "redis": ["username", "password"],
        "postgres": ["ssl-request", "user", "database"],
        "mysql": [],
        "tls": ["sni"],
        "agent": [],
        "dns": ["query", "rcode"],
    }
    assert set(own) == set(model.CHECK_TYPES)
    for check_type, keys in own.items():
        assert fastlb.config.check_keys(check_type) == common + keys + flap


CHECK_P = POOL_P + "[pool.p.check]\n"


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (CHECK_P + 'type = "http"\nbogus = 1\n', 5,
         "unknown key 'bogus' in [pool.p.check] (a check of type http takes: type, active, "
         "interval, fast-interval, down-interval, timeout, rise, fall, jitter, port, method, "
         "path, host, expect-status, expect-body, expect-body-regex, reuse-connection, "
         "flap-window, flap-base, flap-max)"),
        (CHECK_P + 'check-interval = "1s"\n', 4,
         "unknown key 'check-interval' in [pool.p.check]; write interval (a check of type tcp"),
        (CHECK_P + 'expect-body = "ok"\n', 4,
         "expect-body is for type http, and [pool.p.check] has type tcp"),
        ('check-type = "redis"\n' + CHECK_P + 'path = "/"\n', 5,
         "path is for type http, and [pool.p.check] has type redis"),
        (CHECK_P + 'type = "redis"\nsend = "PING"\n', 5, "send is for type send-expect"),
        (CHECK_P + 'type = "ftp"\n', 4, "type ftp: choose from tcp, http, send-expect, redis"),
        (CHECK_P + "type = 1\n", 4, "type takes a string, not 1"),
        (CHECK_P + 'active = "yes"\n', 4, "active must be true or false"),
        (CHECK_P + 'interval = "0"\n', 4, "interval 0: must be more than 0"),
        (CHECK_P + 'timeout = "fast"\n', 4, "timeout fast: expected seconds"),
        (CHECK_P + "rise = 0\n", 4, "rise 0: must be at least 1 and at most 1000"),
        (CHECK_P + "fall = 2.5\n", 4, "fall 2.5: must be a whole number"),
        (CHECK_P + 'jitter = "-1"\n', 4, "jitter -1: must be 0 or more"),
        (CHECK_P + "port = 70000\n", 4, "port 70000: port must be between 1 and 65535"),
        (CHECK_P + 'fast-interval = "1s"\nfast_interval = "2s"\n', 5,
         "fast_interval is set twice"),
        (CHECK_P + 'type = "http"\nmethod = "GET /"\n', 5, "method GET /: expected a method name"),
        (CHECK_P + 'type = "http"\npath = "health"\n', 5, "path health: must start with /"),
        (CHECK_P + 'type = "http"\nhost = ""\n', 5, "host : must not be empty"),
        (CHECK_P + 'type = "http"\nexpect-status = [200, "3xy"]\n', 5,
         "expect-status 200,3xy: bad status range '3xy'"),
        (CHECK_P + 'type = "http"\nexpect-status = "200-299,301-300"\n', 5,
         "bad status range '301-300': it ends below its start"),
        (CHECK_P + 'type = "http"\nexpect-status = []\n', 5, "expect-status takes a string or"),
        (CHECK_P + 'type = "http"\nexpect-status = true\n', 5, "expect-status takes a string or"),
        (CHECK_P + 'type = "http"\nexpect-body-regex = "("\n', 5,
         "expect-body-regex (: not a regular expression: missing ), unterminated subpattern"),
        (CHECK_P + 'type = "send-expect"\nsend = "x"\nexpect-regex = "[a"\n', 6,
         "expect-regex [a: not a regular expression"),
        (CHECK_P + 'type = "send-expect"\nsend-hex = "0g"\n', 5,
         "send-hex 0g: expected pairs of hex digits"),
        (CHECK_P + 'type = "send-expect"\nexpect-hex = "abc"\n', 5,
         "expect-hex abc: expected pairs of hex digits"),
        (CHECK_P + 'type = "send-expect"\nsend = "a\\\\q"\n', 5, "send a\\q: unknown escape \\q"),
        (CHECK_P + 'type = "send-expect"\nsend = 5\n', 5, "send takes a string, not 5"),
        (CHECK_P + 'type = "send-expect"\nsend = "a"\nsend-hex = "61"\n', 6,
         "send and send-hex are both given; use one"),
        (CHECK_P + 'type = "send-expect"\nexpect-hex = "61"\nexpect = "a"\n', 6,
         "expect-hex and expect are both given; use one"),
        (CHECK_P + '\ntype = "send-expect"\n', 3,
         "pool p: a send-expect check needs something to send or expect"),
        (POOL_P + 'check = { type = "agent" }\n', 3,
         "pool p: an agent check needs the port its agent answers on"),
        (CHECK_P + 'type = "redis"\nusername = "u"\n', 3,
         "pool p: a redis check with a username needs its password"),
        (CHECK_P + 'type = "postgres"\nssl-request = "no"\n', 5,
         "ssl-request must be true or false"),
        (CHECK_P + 'type = "postgres"\nuser = ""\n', 5, "user : must not be empty"),
        (CHECK_P + 'type = "tls"\nsni = "*.example.test"\n', 5,
         "sni *.example.test: expected a host name"),
        (CHECK_P + "flap-base = 0\n", 4, "flap-base 0: must be more than 0"),
        (POOL_P + 'check = "yes"\n', 3,
         "check takes true, false or a table: [pool.p.check], not 'yes'"),
        (POOL_P + "rise = 3\n", 3,
         "rise in [pool.p] is a check setting: set rise in [pool.p.check]"),
        (POOL_P + 'check-interval = "1s"\n', 3,
         "check-interval in [pool.p] is a check setting: set interval in [pool.p.check]"),
        (POOL_P + '[frontend.a]\nlisten = "127.0.0.1:7001"\npool = "p"\nfall = 2\n', 6,
         "fall in [frontend.a] is a check setting: set fall in a [pool.NAME.check] table"),
        (POOL_P + 'observe = "last-byte"\n', 3, "--observe last-byte: choose from first-byte"),
        (POOL_P + 'on-down = "reset"\n', 3, "--on-down reset: choose from close"),
        (POOL_P + 'first-byte-timeout = "0s"\n', 3, "--first-byte-timeout 0s: must be more"),
        (POOL_P + 'slow-start = "later"\n', 3, "--slow-start later: expected seconds"),
        (POOL_P + 'panic-threshold = "150%"\n', 3, "--panic-threshold 150%: must be from 0 to 1"),
        (POOL_P + "panic-threshold = -0.1\n", 3, "--panic-threshold -0.1: must be from 0 to 1"),
    ],
)  # fmt: skip
def test_check_mistakes_name_the_file_and_line(tmp_path, text, line, expected):
    path = write(tmp_path, text + FRONT_A.replace("[frontend.a]", "[frontend.z]"))
    with pytest.raises(ConfigError) as caught:
        fastlb.config.load(flags(), path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message
    assert "\n" not in message


def test_the_readme_check_examples_are_valid(tmp_path):
    text = (HERE.parent / "README.md").read_text()
    section = text[text.index("## Health checks") : text.index("## How it works")]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 9  # a kind each, and the nginx one
    for block in blocks:
        names = re.findall(r"^\[pool\.([a-z]+)\.check\]", block, re.MULTILINE)
        assert names, block
        pools = "".join(f'[pool.{name}]\nbackend = "127.0.0.1:9"\n' for name in names)
        front = f'[frontend.f]\nlisten = "127.0.0.1:0"\npool = "{names[0]}"\n'
        config = fastlb.config.load({}, write(tmp_path, block + pools + front))
        assert all(pool.check.active for pool in config.pools)


def test_the_readme_nginx_check_as_toml_and_as_flags_is_one_check(tmp_path):
    text = (HERE.parent / "README.md").read_text()
    section = text[text.index("### From nginx and HAProxy") : text.index("## How it works")]
    (block,) = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    (argv,) = re.findall(r"With flags: `(.*?)`", section, re.DOTALL)
    service = '[pool.web]\nbackend = "127.0.0.1:9"\n' + FRONT_A.replace('"p"', '"web"')
    from_file = load(tmp_path, block + service)
    argv = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", *argv.split()]
    from_flags = fastlb.config.load(flags(*argv), None)
    assert from_file.pool("web").check == from_flags.pool("default").check
    assert from_flags.pool("default").check == model.CheckSpec(
        type="http", active=True, interval=3.0, rise=2, fall=3, timeout=1.0, path="/health",
        expect_status=((200, 299), (300, 399)),
    )  # fmt: skip
