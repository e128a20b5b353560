"""The TOML configuration file: errors that name FILE:LINE, what check and run make of it, and
reloads on SIGHUP."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import recv_line, wait_until

import fastlb.config
from fastlb import settings
from fastlb.errors import ConfigError

HERE = Path(__file__).resolve().parent

GOOD = """\
# fastlb in front of three servers
listen = "127.0.0.1:8000"
algorithm = "leastconn"
workers = 3
connect-timeout = "250ms"
max_conn = 500
check = true
backend = [
    "127.0.0.1:9001",
    "127.0.0.1:9002,weight=2",
    "127.0.0.1:9003,backup",
]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fastlb.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def flags(*argv: str) -> dict:
    """Raw values by option name, as the command line gives them to config.load."""
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return vars(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('listen = "127.0.0.1:8000"\nworkers = = 3\n', ":2: "),
        ('listen = "127.0.0.1:8000"\n\nworkrs = 3\n', ":3: unknown setting 'workrs'"),
        ('listen = "127.0.0.1:8000"\nworkers = "many"\n', ":2: --workers many: must be a whole"),
        ('listen = "127.0.0.1:8000"\ncheck = "yes"\n', ":2: check must be true or false"),
        ('listen = "127.0.0.1:8000"\nworkers = true\n', ":2: workers takes a string or a number"),
        ('backend = [\n  "127.0.0.1:1",\n  "127.0.0.1",\n]\n', ":1: --backend 127.0.0.1: expected"),
        ('listen = "127.0.0.1:1"\n[poool]\nx = 1\n', ":2: unknown setting 'poool'"),
        ("max-conn = 5\nmax_conn = 6\n", ":2: max_conn is set twice"),
        (
            'check-path = "/health"\n',
            ":1: --check-path is for type http, and the check type is tcp",
        ),
        ('check-type = "http"\n\ncheck-send = "x"\n', ":3: --check-send is for type send-expect"),
        (
            'check-type = "send-expect"\ncheck-send = "a"\ncheck-send-hex = "61"\n',
            ":3: --check-send and check-send-hex are both given; use one",
        ),
        (
            'check-type = "postgres"\ncheck-ssl-request = "no"\n',
            ":2: check-ssl-request must be true or false",
        ),
        ('check-jitter = "soon"\n', ":1: check-jitter soon: expected seconds"),
        ('check-type = "http"\ncheck-method = "GET /"\n', ":2: check-method GET /: expected a"),
        ('check-type = "tls"\ncheck-sni = "a_b.test"\n', ":2: check-sni a_b.test: expected a"),
        (
            'check-type = "agent"\nlisten = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\n',
            ":1: pool default: an agent check needs the port its agent answers on",
        ),
        ("observe = 1\n", ":1: observe takes a string, not 1"),
        ("panic-threshold = true\n", ":1: panic-threshold takes a string or a number"),
    ],
)
def test_mistakes_name_the_file_and_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        fastlb.config.load(flags(), path)
    message = str(caught.value)
    assert message.startswith(path + ":")
    assert expected in message
    assert "\n" not in message


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="--config .*: No such file or directory"):
        fastlb.config.load(flags(), str(tmp_path / "absent.toml"))


def test_the_command_line_reports_a_bad_file_in_one_line(tmp_path):
    path = write(
        tmp_path, 'listen = "127.0.0.1:8000"\nbackend = ["127.0.0.1:9001"]\nretries = -1\n'
    )
    result = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "run", "--config", path],
        capture_output=True, text=True, timeout=30, cwd=HERE,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"fastlb: error: {path}:3: --retries -1: must be at least 0 and at most 15"
    ]


def test_check_prints_the_settings_of_a_file(tmp_path):
    path = write(tmp_path, GOOD)
    result = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "check", "--config", path],
        capture_output=True, text=True, timeout=30, cwd=HERE,
    )  # fmt: skip
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["pool", "default:", "algorithm", "=", "leastconn"] in lines
    assert ["pool", "default:", "backend", "=", "127.0.0.1:9002,weight=2"] in lines
    assert ["pool", "default:", "check.active", "=", "on"] in lines


def test_sighup_reloads_the_backends_and_keeps_open_connections(backends, balancer, tmp_path):
    a, b = backends("name", name="a"), backends("name", name="b")
    path = tmp_path / "lb.toml"
    path.write_text(f'backend = ["{a.address}"]\n')
    lb = balancer([], "--config", str(path))
    held = lb.connect()
    assert recv_line(held) == "a"

    path.write_text(f'backend = ["{a.address}", "{b.address}"]\n')
    os.kill(lb.pid, signal.SIGHUP)
    lb.wait_for(reloaded(2, lambda s: len(s["backends"]) == 2), what="the reload to add b")
    names = []
    for _ in range(4):
        with lb.connect() as sock:
            names.append(recv_line(sock))
    assert sorted(names) == ["a", "a", "b", "b"]

    # A mistake in the file: one error line, and the running settings stay.
    path.write_text('backend = ["nowhere"]\n')
    os.kill(lb.pid, signal.SIGHUP)
    wait_until(lambda: "reload failed" in lb.log(), 10, "the failed reload")
    assert [row["address"] for row in lb.stats()["backends"]] == [a.address, b.address]

    # Weight 0 drains b: no new connections.
    path.write_text(f'backend = ["{a.address}", "{b.address},weight=0"]\n')
    os.kill(lb.pid, signal.SIGHUP)
    lb.wait_for(reloaded(3, lambda s: s["backends"][1]["weight"] == 0), what="b drained")
    for _ in range(3):
        with lb.connect() as sock:
            assert recv_line(sock) == "a"

    path.write_text(f'backend = ["{b.address}"]\n')
    os.kill(lb.pid, signal.SIGHUP)
    lb.wait_for(reloaded(4, lambda s: len(s["backends"]) == 1), what="the reload to remove a")
    for _ in range(3):
        with lb.connect() as sock:
            assert recv_line(sock) == "b"
    # The connection opened before all of this still reaches a, which echoes.
    held.sendall(b"still here\n")
    assert recv_line(held) == "still here"
    held.close()


def reloaded(generation: int, predicate):
    """A /stats condition: the reload to ``generation`` is done (its workers alone accept) and
    ``predicate`` holds."""
    return lambda stats: (
        stats["generation"] == generation and stats["generation_active"] and predicate(stats)
    )


def test_top_level_check_keys_and_flags_describe_the_default_pools_check(tmp_path):
    path = write(
        tmp_path,
        """\
        listen = "127.0.0.1:8000"
        backend = ["127.0.0.1:9001"]
        check-type = "send-expect"
        check-send-hex = "50494e470d0a"
        check-expect = "+PONG"
        check-jitter = "100ms"
        check-flap-window = "1m"
        slow-start = "30s"
        panic-threshold = "40%"
        idle-timeout = 0
    """,
    )
    config = fastlb.config.load(flags(), path)
    pool = config.pool("default")
    check = pool.check
    assert (check.type, check.send, check.expect) == ("send-expect", b"PING\r\n", b"+PONG")
    assert (check.jitter, check.flap_window, check.active) == (0.1, 60.0, False)
    assert (pool.slow_start, pool.panic_threshold) == (30.0, 0.4)
    assert config.frontends[0].idle_timeout == 0.0
    # A flag wins over the file, over either spelling of the same value.
    check = fastlb.config.load(flags("--check-send", "HI", "--check"), path).pool("default").check
    assert (check.send, check.active) == (b"HI", True)
