"""``fastlb status``: a running balancer's /stats as a table, once or with ``--watch``."""

from __future__ import annotations

import fcntl
import os
import pty
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, recv_line, wait_until

FASTLB = [sys.executable, "-P", "-m", "fastlb"]  # -P: the installed package, from any folder

HERE = Path(__file__).resolve().parent


def status(address: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FASTLB, "status", address],
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


# ---- fastlb status --watch ----------------------------------------------------------------------


class Watch:
    """``fastlb status --watch`` in a subprocess, its stdout a pipe (no terminal) or the pty
    ``tty`` (master, slave), read line by line in a thread."""

    def __init__(self, address: str, tty: tuple[int, int] | None = None, interval: str = "0.2"):
        self.master = None
        self.raw = b""  # what came through the pty, escapes and all
        if tty is None:
            stdout, env = subprocess.PIPE, {**os.environ, "TERM": "dumb"}
        else:
            self.master, stdout = tty
            env = {**os.environ, "TERM": "xterm-256color"}
        self.proc = subprocess.Popen(
            [*FASTLB, "status", "--watch", "--interval", interval, address],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True,
            cwd=HERE, env=env,
        )  # fmt: skip
        if tty is not None:
            os.close(stdout)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        if self.master is None:
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
            return
        pending = b""
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the other side closed
                return
            if not chunk:
                return
            self.raw += chunk
            pending += chunk
            *lines, pending = re.split(rb"\r\n|\n", pending)
            for line in lines:
                # The redrawn view's cursor moves and colours are not text.
                self.lines.put(ANSI.sub("", line.decode(errors="replace")).replace("\r", ""))

    def wait_for(self, predicate, what: str, timeout: float = 20.0) -> str:
        """The first new line for which ``predicate(line)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what}; output:\n" + "\n".join(self.seen)) from None
            self.seen.append(line)
            if predicate(line):
                return line

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        if self.master is not None:
            os.close(self.master)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CURSOR_UP = b"\x1b[1A"


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("│")[1:-1]]


def backend_rate(watch: Watch, address: str, what: str) -> float:
    """The conn/s of the backend at ``address`` in the next view that shows a number there."""
    header = None

    def has_rate(line: str) -> bool:
        nonlocal header
        row = cells(line.replace("┃", "│"))
        if row[:1] == ["backend"]:
            header = row
        elif row[:1] == [address] and header and "conn/s" in header:
            rate = row[header.index("conn/s")]
            return rate != "-" and float(rate) > 0
        return False

    line = watch.wait_for(has_rate, what)
    return float(cells(line)[header.index("conn/s")])


def test_watch_shows_rates_until_ctrl_c(backends, balancer):
    named = backends("name", name="a")
    lb = balancer([named])
    watch = Watch(f"127.0.0.1:{lb.stats_port}")
    stop = threading.Event()

    def clients():
        while not stop.is_set():
            assert lb.ask_name() == "a"

    traffic = threading.Thread(target=clients)
    traffic.start()
    try:
        assert backend_rate(watch, named.address, "a conn/s above 0") > 0
        assert any("1/1 workers ready" in line for line in watch.seen)
        stop.set()
        traffic.join(timeout=20)
        assert watch.interrupt() == 0
        assert "Traceback" not in watch.proc.stderr.read()
    finally:
        stop.set()
        watch.kill()


def test_watch_redraws_in_place_on_a_terminal(backends, balancer):
    named = backends("name", name="a")
    lb = balancer([named])
    master, slave = pty.openpty()
    # A terminal wide enough for every column.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    watch = Watch(f"127.0.0.1:{lb.stats_port}", tty=(master, slave))
    try:
        watch.wait_for(lambda line: "1/1 workers ready" in line, "a first view")
        assert lb.ask_name() == "a"
        assert backend_rate(watch, named.address, "the connection's rate") > 0
        assert CURSOR_UP in watch.raw  # each view went over the one before
        assert watch.interrupt() == 0
        assert "Traceback" not in watch.proc.stderr.read()
    finally:
        watch.kill()


def test_watch_keeps_asking_a_balancer_that_is_not_there_yet(backends, configured):
    named = backends("name", name="a")
    stats, listen = free_ports(2)
    watch = Watch(f"127.0.0.1:{stats}")
    try:
        for _ in range(2):
            watch.wait_for(lambda line: "cannot read stats from" in line, "an error line")
        configured(f"""
            stats = "127.0.0.1:{stats}"
            [frontend.web]
            listen = ["127.0.0.1:{listen}"]
            pool = "web"
            [pool.web]
            backend = ["{named.address}"]
        """)  # fmt: skip
        watch.wait_for(lambda line: "1/1 workers ready" in line, "the balancer, once it runs")
        assert watch.interrupt() == 0
    finally:
        watch.kill()


def test_interval_is_for_watch_and_must_be_positive():
    for argv, message in (
        (["--interval", "1", "127.0.0.1:9"], "--interval is for --watch"),
        (["--watch", "--interval", "0", "127.0.0.1:9"], "--interval 0: must be more than 0"),
    ):
        result = subprocess.run(
            [*FASTLB, "status", *argv],
            capture_output=True, text=True, timeout=30, cwd=HERE,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"fastlb: error: {message}"]


def test_metrics_pass_promtool_and_carry_the_process_figures(backends, balancer):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (apt-get install prometheus)")
    a = backends("name", name="a")
    lb = balancer([a], "--check", "--check-interval", "0.1s", workers=2)
    assert lb.ask_name() == "a"
    lb.wait_for(lambda s: lb.backend(a, s)["history"]["last_check"] is not None)
    lb.wait_for(lambda s: s["frontends"][0]["ended"], what="the connection's end reported")
    with urllib.request.urlopen(f"http://127.0.0.1:{lb.stats_port}/metrics", timeout=10) as r:
        body = r.read()
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = body.decode()
    for family in (
        "fastlb_build_info",
        "fastlb_worker_restarts_total",
        'fastlb_reloads_total{result="failed"}',
        'fastlb_worker_open_fds{worker="1"}',
        'fastlb_worker_coalesced_waits_total{worker="1"} 0.0',  # idle: it never waited
        "fastlb_worker_resident_memory_bytes",
        "fastlb_worker_cpu_seconds_total",
        "fastlb_backend_check_status",
        "fastlb_backend_check_duration_seconds",
        "fastlb_backend_transitions_total",
        "fastlb_frontend_connections_total",
        "fastlb_access_log_dropped_total",
        "fastlb_backend_connect_seconds_bucket",
        'fastlb_backend_connection_duration_seconds_bucket{backend="',
        'fastlb_frontend_ended_total{frontend="default",reason="client-closed"} 1.0',
    ):
        assert family in text, family
    entry = lb.backend(a)
    assert sum(entry["connect_ms"]["counts"]) == 1 == sum(entry["duration_ms"]["counts"])
    assert lb.stats()["frontends"][0]["ended"] == {"client-closed": 1}
