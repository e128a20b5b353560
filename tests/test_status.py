"""``fastlb status``: a running balancer's /stats as a table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import free_ports, recv_line, wait_until

HERE = Path(__file__).resolve().parent


def status(address: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlb", "status", address],
        capture_output=True, text=True, timeout=30, cwd=HERE,
    )  # fmt: skip


def test_status_shows_every_backend(backends, balancer):
    named = backends("name", name="a")
    lb = balancer([named, "127.0.0.1:9,weight=3,backup"], workers=2)
    with lb.connect() as sock:
        assert recv_line(sock) == "a"
    # The backend sent its name ("a\n") and the client nothing.
    wait_until(lambda: lb.stats()["backends"][0]["down_bytes"] == 2, 10, "the report")
    result = status(f"127.0.0.1:{lb.stats_port}")
    assert result.returncode == 0, result.stderr
    assert "2/2 workers ready" in result.stdout
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    primary = [cell.strip() for cell in rows[named.address].split("│")[2:10]]
    assert primary == ["1", "primary", "up", "0", "1", "0", "0 B", "2 B"]
    assert [cell.strip() for cell in rows["127.0.0.1:9"].split("│")[2:4]] == ["3", "backup"]


def test_status_of_nothing_is_one_error_line(refused_address):
    result = status(refused_address)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("fastlb: error: cannot read stats from 127.0.0.1:")


def test_status_shows_frontends_and_each_pool(backends, configured):
    a, b = backends("name", name="a"), backends("name", name="b")
    stats, one, two = free_ports(3)
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.one]
        listen = ["127.0.0.1:{one}"]
        pool = "first"
        [frontend.two]
        listen = ["127.0.0.1:{two}"]
        pool = "second"
        [pool.first]
        backend = ["{a.address}"]
        [pool.second]
        algorithm = "leastconn"
        send-proxy = "v2"
        backend = ["{b.address}"]
    """)
    assert lb.ask_name(address=("127.0.0.1", one)) == "a"
    wait_until(lambda: lb.frontend_stats("one")["connections"] == 1, 10, "the report")
    result = status(f"127.0.0.1:{stats}")
    assert result.returncode == 0, result.stderr
    assert "pool first (roundrobin)" in result.stdout
    assert "pool second (leastconn, send-proxy v2)" in result.stdout
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    cells = [cell.strip() for cell in rows["one"].split("│")[2:7]]
    assert cells == [f"127.0.0.1:{one}", "first", "0", "1", "0"]
    assert [cell.strip() for cell in rows["two"].split("│")[3:6]] == ["second", "0", "0"]
    assert [cell.strip() for cell in rows[a.address].split("│")[2:7]] == [
        "1", "primary", "up", "0", "1",
    ]  # fmt: skip
    assert rows[b.address].split("│")[6].strip() == "0"
