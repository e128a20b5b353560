"""The access log: one line per connection when it ends, in text or JSON, to a file reopened on
SIGUSR1 or to stderr; and the line the supervisor logs when clients find every backend down."""

from __future__ import annotations

import json
import os
import re
import signal
import socket

from conftest import CLIENT_TIMEOUT, Balancer, free_ports, recv_line, wait_until

TEXT_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) client=(?P<client>\S+) "
    r"frontend=(?P<frontend>\S+) pool=(?P<pool>\S+) backend=(?P<backend>\S+) "
    r"connect_ms=(?P<connect_ms>-?\d+) duration_ms=(?P<duration_ms>\d+) up=(?P<up>\d+) "
    r"down=(?P<down>\d+) retries=(?P<retries>\d+) end=(?P<end>\S+)$"
)


def closed_without_answer(lb) -> None:
    """A client the balancer closes with a reset (no backend could be had): the reset can come
    before connect() returns, or before the first read."""
    try:
        with lb.connect() as sock:
            assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def lines(path, count: int) -> list[str]:
    def enough():
        if not os.path.exists(path):
            return None
        with open(path) as f:
            got = f.read().splitlines()
        return got if len(got) >= count else None

    return wait_until(enough, 10, f"{count} access log lines in {path}")


def test_each_connection_is_one_text_line_when_it_ends(backends, balancer, tmp_path):
    a = backends("name", name="a")
    path = tmp_path / "access.log"
    lb = balancer([a], "--access-log", str(path))
    clients = []
    for _ in range(3):
        with lb.connect() as sock:
            clients.append(f"127.0.0.1:{sock.getsockname()[1]}")
            assert recv_line(sock) == "a"
            sock.sendall(b"hello\n")
            assert recv_line(sock) == "hello"
    got = [TEXT_LINE.match(line) for line in lines(path, 3)]
    assert all(got), got
    assert [m["client"] for m in got] == clients
    for m in got:
        assert (m["frontend"], m["pool"], m["backend"]) == ("default", "default", a.address)
        assert int(m["up"]) == 6 and int(m["down"]) == 2 + 6
        assert m["retries"] == "0" and m["end"] == "client-closed"
        assert 0 <= int(m["connect_ms"]) <= int(m["duration_ms"])


def test_json_lines_say_why_a_connection_ended(backends, balancer, tmp_path, refused_address):
    source = backends("source", name="source", nbytes=1000)
    path = tmp_path / "access.json"
    lb = balancer(
        [refused_address, source], "--access-log", str(path), "--access-log-format", "json"
    )
    for _ in range(2):  # roundrobin: each client meets the refusing backend first or second
        with lb.connect() as sock:
            assert len(b"".join(iter(lambda: sock.recv(65536), b""))) == 1000
    records = [json.loads(line) for line in lines(path, 2)]
    assert {record["end"] for record in records} == {"backend-closed"}
    assert sorted(record["retries"] for record in records) == [0, 1]
    assert all(record["down"] == 1000 and record["backend"] == source.address for record in records)
    assert all(record["time"].endswith("Z") for record in records)


def test_every_connect_failing_is_logged_and_said_once_by_the_supervisor(
    balancer, tmp_path, refused_address
):
    path = tmp_path / "access.log"
    lb = balancer([refused_address], "--access-log", str(path), "--retries", "0")
    for _ in range(3):
        closed_without_answer(lb)
    got = [TEXT_LINE.match(line) for line in lines(path, 3)]
    assert [m["end"] for m in got] == ["connect-failed"] * 3
    assert all(m["connect_ms"] == "-1" for m in got)
    said = re.compile(r"frontend default: \d+ clients closed, every backend tried failed")
    wait_until(lambda: said.search(lb.log()), 10, "the supervisor's line")
    for _ in range(3):  # more, within 10 s of that line
        closed_without_answer(lb)
    lines(path, 6)
    assert len(said.findall(lb.log())) < 6  # six clients, fewer lines: at most one per 10 s


def test_a_rejected_proxy_sender_and_the_proxy_source_are_logged(backends, configured, tmp_path):
    a = backends("name", name="a")
    stats, front = free_ports(2)
    path = tmp_path / "access.log"
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        access-log = "{path}"
        [frontend.f]
        listen = ["127.0.0.1:{front}"]
        pool = "p"
        accept-proxy = ["127.0.0.0/8"]
        inspect-timeout = "2s"
        [pool.p]
        backend = ["{a.address}"]
    """)
    with lb.connect() as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.7 192.0.2.1 51234 443\r\n")
        assert recv_line(sock) == "a"
    with lb.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # a trusted sender without a header
        assert sock.recv(1) == b""
    # The two end in either order: by why they ended.
    by_end = {m["end"]: m for m in (TEXT_LINE.match(line) for line in lines(path, 2))}
    assert by_end["client-closed"]["client"] == "192.0.2.7:51234"
    rejected = by_end["rejected"]
    assert rejected["backend"] == "-" and rejected["pool"] == "-"
    assert rejected["client"].startswith("127.0.0.1:")


def test_sigusr1_reopens_the_file_after_logrotate_moved_it(backends, balancer, tmp_path):
    a = backends("name", name="a")
    path = tmp_path / "access.log"
    lb = balancer([a], "--access-log", str(path), workers=2)
    assert lb.ask_name() == "a"
    lines(path, 1)
    os.rename(path, tmp_path / "access.log.1")
    lb.proc.send_signal(signal.SIGUSR1)
    # The workers reopen at their next slice; until then lines still go to the moved file.
    wait_until(lambda: lb.ask_name() == "a" and path.exists(), 10, "a new access.log")
    assert TEXT_LINE.match(lines(path, 1)[0])
    assert lb.proc.poll() is None and len(lb.stats()["workers"]) == 2


def test_under_journald_stderr_lines_carry_no_timestamp(backends, tmp_path):
    a = backends("name", name="a")
    os.environ["JOURNAL_STREAM"] = "8:12345"  # as systemd sets it for a service's stderr
    try:
        lb = Balancer([a], ("--access-log", "-"), 1, tmp_path)
        try:
            lb.wait_ready()
            with socket.create_connection(("127.0.0.1", lb.port), timeout=CLIENT_TIMEOUT) as s:
                assert recv_line(s) == "a"
            line = wait_until(
                lambda: next((x for x in lb.log().splitlines() if " frontend=" in x), None),
                10,
                "the access log line on stderr",
            )
            assert line.startswith("client=127.0.0.1:"), line
        finally:
            lb.cleanup()
    finally:
        del os.environ["JOURNAL_STREAM"]
