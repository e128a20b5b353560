"""The ``fastlb`` command as a user runs it: flags and errors, and short end-to-end runs.

Every fastlb here is ``python -m fastlb`` in a subprocess on loopback. Tests wait for what it
says on stderr (``ready: ...``, ``backend ... is down``) or for a port that answers, never for
a fixed time, and every process they start is stopped by PID.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from fastlb import settings
from fastlb.config import check_keys
from fastlb.errors import EXIT_UNREACHABLE

TIMEOUT = 20.0  # generous: the machine is shared
FASTLB = [sys.executable, "-P", "-m", "fastlb"]
# Run from tests/, not the checkout's root, so `-m fastlb` imports the installed, compiled
# package rather than the source tree.
HERE = os.path.dirname(os.path.abspath(__file__))


def fastlb(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FASTLB, *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE, **kwargs
    )


# ---- flags and errors ------------------------------------------------------------------------

CHECK_1 = ["check", "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:9"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "choose a command"),
        (["run"], "--listen is required (or a [frontend.NAME] in the --config file)"),
        (["run", "--listen", "127.0.0.1:8000", "--backend", "127.0.0.1:9", "--bogus"], "--bogus"),
        (["run", "--listen", "127.0.0.1:80000", "--backend", "127.0.0.1:9"], "--listen"),
        (["run", "--listen", "::1:8000", "--backend", "127.0.0.1:9"], "in brackets"),
        (["run", "--listen", "127.0.0.1:8000", "--backend", "nowhere.invalid:9"], "resolve"),
        (["run", "--listen", "127.0.0.1:8000", "--backend", "127.0.0.1:9,weight=-2"], "weight"),
        (
            ["run", "--listen", "127.0.0.1:8000", "--backend", "127.0.0.1:9", "--algorithm", "x"],
            "--algorithm x: choose from roundrobin",
        ),
        (["check", "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:9", "--workers", "0"], "0"),
        (["demo", "--listen", "127.0.0.1"], "--listen 127.0.0.1: expected HOST:PORT"),
        (
            [*CHECK_1, "--check-path", "/"],
            "--check-path is for type http, and the check type is tcp (--check-type)",
        ),
        (
            [*CHECK_1, "--check-type", "agent"],
            "pool default: an agent check needs the port its agent answers on (port)",
        ),
        ([*CHECK_1, "--panic-threshold", "2"], "--panic-threshold 2: must be from 0 to 1"),
        ([*CHECK_1, "--cpu-affinity", "3-1"], "--cpu-affinity 3-1: the range 3-1 runs backwards"),
        ([*CHECK_1, "--cpu-affinity", "4095"], "CPU 4095 is not one this process may run on"),
    ],
)
def test_a_bad_command_line_is_one_error_line_and_status_2(argv, expected):
    result = fastlb(*argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastlb: error: ")
    assert expected in lines[0]


def test_check_prints_the_resolved_settings():
    port = free_port()
    result = fastlb(
        "check", "--listen", f"localhost:{port}", "--backend", "127.0.0.1:9000,weight=3",
        "--backend", "[::1]:9001,backup", "--algorithm", "leastconn", "--workers", "3", "--check",
    )  # fmt: skip
    # Nothing listens on those backends: the settings are printed all the same.
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    frontend, pool = ["frontend", "default:"], ["pool", "default:"]
    localhost = (f"127.0.0.1:{port}", f"[::1]:{port}")
    assert any([*frontend, "listen", "=", address] in lines for address in localhost)
    assert [*pool, "backend", "=", "127.0.0.1:9000,weight=3"] in lines
    assert [*pool, "backend", "=", "[::1]:9001,weight=1,backup"] in lines
    assert [*pool, "algorithm", "=", "leastconn"] in lines
    assert ["workers", "=", "3"] in lines
    assert [*pool, "check.active", "=", "on"] in lines
    assert [*pool, "check.type", "=", "tcp"] in lines
    assert [*frontend, "idle-timeout", "=", "600.0"] in lines
    # Every option once (of the check, those a tcp check has but flap damping's base and max),
    # the second backend, and the frontend's pool, sni and sni-required.
    others = [option for option in settings.OPTIONS if option.scope != settings.CHECK]
    check = [line for line in lines if line[2].startswith("check.")]
    assert len(check) == len(check_keys("tcp")) - 2
    assert len(lines) == len(others) + len(check) + 1 + 3


def test_check_prints_the_settings_of_the_check_type():
    result = fastlb(
        "check", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--check-type", "http",
        "--check-path", "/health", "--check-expect-status", "2xx,3xx", "--check-port", "8081",
        "--check-host", "www.example.test", "--observe", "first-byte", "--on-down", "close",
        "--slow-start", "30s", "--panic-threshold", "50%", "--first-byte-timeout", "2s",
    )  # fmt: skip
    lines = [line.split() for line in result.stdout.splitlines()]
    pool = ["pool", "default:"]
    for key, value in [
        ("check.type", "http"), ("check.path", "/health"), ("check.port", "8081"),
        ("check.expect-status", "200-299,300-399"), ("check.host", "www.example.test"),
        ("check.method", "GET"),
        ("observe", "first-byte"), ("on-down", "close"), ("slow-start", "30.0"),
        ("panic-threshold", "0.5"), ("first-byte-timeout", "2.0"),
    ]:  # fmt: skip
        assert [*pool, key, "=", value] in lines, key
    assert not any(line[2] in ("check.send", "check.sni") for line in lines)
    result = fastlb(
        "check", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--check-type",
        "send-expect", "--check-send", "PING\\r\\n", "--check-expect", "+PONG",
    )  # fmt: skip
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [*pool, "check.send", "=", "PING\\r\\n"] in lines
    assert [*pool, "check.expect", "=", "+PONG"] in lines
    assert not any(line[2] == "check.path" for line in lines)


def test_check_probes_every_backend(echo_backend, refused_address):
    # A small --max-conn keeps the open-file note out of stderr.
    result = fastlb("check", "--listen", "127.0.0.1:0", "--max-conn", "100",
                    "--backend", echo_backend, "--backend", refused_address)  # fmt: skip
    assert result.returncode == EXIT_UNREACHABLE
    assert result.stderr.splitlines() == [
        f"fastlb: error: pool default backend {refused_address} is unreachable: Connection refused"
    ]
    result = fastlb(
        "check", "--listen", "127.0.0.1:0", "--max-conn", "100", "--backend", echo_backend
    )
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["check", "--help"]])
def test_help_mentions_every_flag(argv):
    result = fastlb(*argv)
    assert result.returncode == 0
    for option in settings.OPTIONS:
        # The check settings without a flag are keys of the file only.
        assert (f"{option.flag} " in result.stdout) == option.command_line, option.flag
    if argv != ["--help"]:
        text = " ".join(result.stdout.split())
        assert "[default: 10m]" in text  # --idle-timeout
        assert "from 5% to full" in text  # % survives argparse's formatting


def test_a_port_in_use_is_one_error_line_and_status_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        for argv in (
            ["run", "--listen", address, "--backend", "127.0.0.1:9"],
            ["demo", "--listen", address],
        ):
            result = fastlb(*argv)
            assert result.returncode == 2, result.stderr
            assert result.stderr.splitlines() == [
                f"fastlb: error: cannot listen on {address}: Address already in use"
            ]


def test_check_binds_every_listen_and_stats_address_and_still_probes(refused_address):
    with socket.socket() as taken, socket.socket() as stats_taken:
        for sock in (taken, stats_taken):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        stats = f"127.0.0.1:{stats_taken.getsockname()[1]}"
        result = fastlb("check", "--listen", address, "--stats", stats, "--max-conn", "100",
                        "--backend", refused_address)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"fastlb: error: frontend default cannot listen on {address}: Address already in use",
        f"fastlb: error: stats cannot listen on {stats}: Address already in use",
        f"fastlb: error: pool default backend {refused_address} is unreachable: Connection refused",
    ]
    # Once the addresses are free, the check binds them (and lets go) and only the backend fails.
    result = fastlb("check", "--listen", address, "--stats", stats, "--max-conn", "100",
                    "--backend", refused_address)  # fmt: skip
    assert result.returncode == EXIT_UNREACHABLE, result.stderr


def test_check_names_the_frontend_whose_address_is_in_use(tmp_path, echo_backend):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = tmp_path / "fastlb.toml"
        config.write_text(
            f'max-conn = 100\n[frontend.free]\nlisten = "127.0.0.1:0"\npool = "p"\n'
            f'[frontend.busy]\nlisten = ["{address}"]\npool = "p"\n'
            f'[pool.p]\nbackend = ["{echo_backend}"]\n'
        )
        result = fastlb("check", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"fastlb: error: frontend busy cannot listen on {address}: Address already in use"
    ]


def unprivileged_port_start() -> int:
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        return int(f.read())


@pytest.mark.skipif(
    os.geteuid() != 0 or unprivileged_port_start() == 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv, to run the check without CAP_NET_BIND_SERVICE",
)
def test_check_says_a_privileged_port_needs_the_capability(echo_backend):
    # Without the capability in its bounding set, root's bind is refused as anyone's.
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_bind_service", *FASTLB, "check",
         "--listen", "127.0.0.1:1", "--max-conn", "100", "--backend", echo_backend],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "fastlb: error: frontend default cannot listen on 127.0.0.1:1: Permission denied (a "
        f"port below {unprivileged_port_start()} needs root or CAP_NET_BIND_SERVICE)"
    ]


# ---- the log --------------------------------------------------------------------------------

ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)"


def first_log_line(env: dict[str, str], journal_stream: bool) -> str:
    """The first line ``fastlb run`` logs, with ``env``; with ``journal_stream``, its stderr is
    a pipe whose DEVICE:INODE is in JOURNAL_STREAM, as systemd gives the journal's stream."""
    read_end, write_end = os.pipe()
    if journal_stream:
        stat = os.fstat(write_end)
        env = {**env, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    proc = subprocess.Popen(
        [*FASTLB, "run", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--workers", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end, env=env, cwd=HERE,
    )  # fmt: skip
    os.close(write_end)
    try:
        with os.fdopen(read_end) as stderr:
            line = stderr.readline().rstrip("\n")
            proc.kill()
            return line
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


@pytest.mark.parametrize("journal_stream, elsewhere", [(False, False), (True, False), (True, True)])
def test_log_lines_have_a_time_unless_journald_adds_one(journal_stream, elsewhere):
    env = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
    if elsewhere:  # JOURNAL_STREAM inherited, but stderr redirected: not the journal
        env["JOURNAL_STREAM"] = "1:1"
        journal_stream = False
    line = first_log_line(env, journal_stream)
    if journal_stream:
        assert re.fullmatch(r"fastlb\[\d+\]: INFO .+", line), line
    else:
        assert re.fullmatch(ISO_TIME + r" fastlb\[\d+\]: INFO .+", line), line


# ---- a running fastlb ------------------------------------------------------------------------


class Running:
    """A ``fastlb`` subprocess whose stderr lines can be waited for."""

    def __init__(self, *args: str, env: dict | None = None, stdout=subprocess.DEVNULL):
        self.proc = subprocess.Popen(
            [*FASTLB, *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=HERE,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The first new stderr line that matches ``pattern`` (a regular expression)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r}; stderr:\n" + self.log()
                ) from None
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match

    def log(self) -> str:
        return "\n".join(self.seen)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for child in self.descendants():
                child.kill()
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)


class BalancerRun(Running):
    """``fastlb run`` on a free port with stats; ready once every worker accepts."""

    def __init__(self, *args: str, env: dict | None = None, host: str = "127.0.0.1"):
        listen = f"[{host}]:0" if ":" in host else f"{host}:0"
        super().__init__("run", "--listen", listen, "--stats", "127.0.0.1:0", *args, env=env)
        self.host = host
        self.port = int(self.wait_for(r"listening on \S+:(\d+)")[1])
        self.stats_port = int(self.wait_for(r"stats on http://127\.0\.0\.1:(\d+)/stats")[1])
        self.wait_for(r"ready: \d+ workers accepting")

    def get(self, path: str) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.stats_port, timeout=TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type"), response.read()
        finally:
            conn.close()

    def stats(self) -> dict:
        status, _, body = self.get("/stats")
        assert status == 200
        return json.loads(body)

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=TIMEOUT)


@pytest.fixture
def start():
    """``start(*args)`` runs ``fastlb run`` with those flags; whatever is left is killed."""
    started: list[Running] = []

    def run(*args: str, **kwargs) -> BalancerRun:
        started.append(None)
        balancer = BalancerRun(*args, **kwargs)
        started[-1] = balancer
        return balancer

    yield run
    for balancer in started:
        if balancer is not None:
            balancer.kill()


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_backend():
    """An echo server on a free loopback port, in a thread; yields "host:port"."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_run_forwards_reports_stats_and_stops_on_sigterm(start, echo_backend):
    lb = start("--workers", "2", "--backend", echo_backend)
    payload = os.urandom(200_000)
    for _ in range(4):
        with lb.connect() as sock:
            assert round_trip(sock, payload) == payload

    stats = lb.stats()
    assert stats["pid"] == lb.proc.pid
    assert len(stats["workers"]) == 2
    assert all(worker["ready"] for worker in stats["workers"])
    assert sorted(worker["id"] for worker in stats["workers"]) == [0, 1]
    (backend,) = stats["backends"]
    assert backend["address"] == echo_backend
    assert backend["up"] is True and backend["weight"] == 1 and backend["backup"] is False
    assert set(backend) >= {"active", "connections", "failed", "up_bytes", "down_bytes"}

    status, content_type, body = lb.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert f'fastlb_backend_up{{backend="{echo_backend}",pool="default"}} 1.0' in body.decode()
    assert 'fastlb_frontend_connections_total{frontend="default"}' in body.decode()
    assert lb.get("/nothing")[0] == 404

    workers = lb.descendants()
    assert len(workers) == 2
    started = time.monotonic()
    assert lb.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_counters_add_up_over_workers(start, echo_backend):
    lb = start("--workers", "2", "--backend", echo_backend)
    sockets = [lb.connect() for _ in range(6)]
    for sock in sockets:
        assert round_trip(sock, b"x" * 10) == b"x" * 10
    deadline = time.monotonic() + TIMEOUT
    while (backend := lb.stats()["backends"][0])["active"] != 6:
        assert time.monotonic() < deadline, backend
        time.sleep(0.02)
    for sock in sockets:
        sock.close()
    # Counts travel at once, the other counters with the next full report (every second).
    while (backend := lb.stats()["backends"][0])["active"] != 0 or backend["connections"] < 6:
        assert time.monotonic() < deadline, backend
        time.sleep(0.02)
    assert backend["connections"] == 6
    assert backend["up_bytes"] == backend["down_bytes"] == 60


def test_a_killed_worker_is_replaced_and_its_queue_kept(start, echo_backend):
    lb = start("--workers", "1", "--backend", echo_backend)
    (worker,) = lb.stats()["workers"]
    killed_at = time.monotonic()
    os.kill(worker["pid"], signal.SIGKILL)
    # Connect at once: the supervisor still holds the listening socket, so the connection
    # waits in its queue for the replacement instead of being refused.
    with lb.connect() as sock:
        assert round_trip(sock, b"still here") == b"still here"
    replaced_in = time.monotonic() - killed_at
    assert replaced_in < 1.0
    lb.wait_for(rf"worker 0 \(pid {worker['pid']}\) was killed by SIGKILL")
    new_pid = int(lb.wait_for(r"worker 0 \(pid (\d+)\) is accepting")[1])
    (replacement,) = lb.stats()["workers"]
    assert (replacement["id"], replacement["pid"], replacement["ready"]) == (0, new_pid, True)
    assert lb.stats()["worker_restarts"] == 1
    assert new_pid != worker["pid"]


def test_a_worker_that_keeps_dying_is_restarted_ever_later(start, echo_backend):
    lb = start("--workers", "1", "--backend", echo_backend)
    pid = lb.stats()["workers"][0]["pid"]
    delays = []
    for _ in range(4):
        os.kill(pid, signal.SIGKILL)
        line = lb.wait_for(rf"worker 0 \(pid {pid}\) was killed by SIGKILL").string
        if match := re.search(r"restarting it in ([\d.]+)s", line):
            delays.append(float(match[1]))
        pid = int(lb.wait_for(r"worker 0 \(pid (\d+)\) is accepting")[1])
    # The first restart is immediate; quick deaths after it wait 0.1s, 0.2s, ... (a loaded
    # machine may let a worker live past the 1s that makes a death "quick": fewer delays).
    assert delays and delays == sorted(delays) and delays[0] == 0.1, lb.log()
    with lb.connect() as sock:
        assert round_trip(sock, b"alive") == b"alive"


def test_ipv6_listener(start, echo_backend):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    lb = start("--workers", "1", "--backend", echo_backend, host="::1")
    with lb.connect() as sock:
        assert sock.family == socket.AF_INET6
        assert round_trip(sock, b"six") == b"six"


def test_a_second_signal_stops_at_once(start, echo_backend):
    lb = start("--workers", "1", "--backend", echo_backend, "--drain-timeout", "60")
    with lb.connect() as sock:
        assert round_trip(sock, b"hold") == b"hold"
        lb.proc.send_signal(signal.SIGINT)
        lb.wait_for("draining")
        assert lb.proc.poll() is None  # waiting for our connection
        # A repeat within half a second counts as the same request: signal until it stops.
        deadline = time.monotonic() + 5
        while lb.proc.poll() is None:
            assert time.monotonic() < deadline, lb.log()
            lb.proc.send_signal(signal.SIGINT)
            try:
                lb.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        assert lb.proc.returncode == 1
        lb.wait_for("second stop signal")


def test_a_signal_to_both_process_and_group_still_drains(start, echo_backend):
    # What timeout(1) does: the same SIGTERM twice, at once.
    lb = start("--workers", "1", "--backend", echo_backend, "--drain-timeout", "60")
    with lb.connect() as sock:
        assert round_trip(sock, b"hold") == b"hold"
        lb.proc.send_signal(signal.SIGTERM)
        lb.proc.send_signal(signal.SIGTERM)
        lb.wait_for("draining")
        assert round_trip(sock, b"still served") == b"still served"
    assert lb.proc.wait(timeout=TIMEOUT) == 0


def test_the_drain_timeout_ends_a_drain(start, echo_backend):
    lb = start("--workers", "1", "--backend", echo_backend, "--drain-timeout", "0.3")
    with lb.connect() as sock:
        assert round_trip(sock, b"hold") == b"hold"
        assert lb.stop(signal.SIGTERM, timeout=10) == 0
        assert sock.recv(10) == b""  # closed by the drain timeout
    lb.wait_for("drain timeout: killing 1 workers")


def test_failed_connects_mark_a_backend_down_and_checks_bring_it_back(start, echo_backend):
    # Bound but not listening: connects are refused, and the port stays ours for later.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
        lb = start(
            "--workers", "2", "--backend", dead_address, "--backend", echo_backend,
            "--fall", "2", "--rise", "2", "--check-interval", "0.1",
        )  # fmt: skip
        for _ in range(4):  # retries hide the failures from the clients
            with lb.connect() as sock:
                assert round_trip(sock, b"ping") == b"ping"
        lb.wait_for(rf"backend {dead_address} is down: \d+ connects failed in a row")
        stats = lb.stats()
        assert [b["up"] for b in stats["backends"]] == [False, True]
        assert stats["table_version"] >= 2
        assert stats["backends"][0]["failed"] >= 2

        dead.listen()
        lb.wait_for(rf"backend {dead_address} is up: 2 checks passed")
        assert [b["up"] for b in lb.stats()["backends"]] == [True, True]


def test_active_checks_find_a_dead_backend_without_traffic(start, echo_backend):
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
        lb = start(
            "--workers", "1", "--backend", echo_backend, "--backend", dead_address, "--check",
            "--fall", "2", "--rise", "1", "--check-interval", "0.1",
        )  # fmt: skip
        lb.wait_for(rf"backend {dead_address} is down: 2 checks failed in a row")
        assert lb.stats()["backends"][0]["up"] is True
        dead.listen()
        lb.wait_for(rf"backend {dead_address} is up")


@pytest.mark.parametrize("abstract", [False, True])
def test_systemd_hears_ready_once_workers_accept_and_stopping_on_drain(
    start, echo_backend, abstract
):
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        tempfile.TemporaryDirectory() as tmp,
    ):
        if abstract:
            name = f"fastlb-test-{os.getpid()}-{time.monotonic_ns()}"
            notify.bind("\0" + name)
            address = "@" + name
        else:
            address = str(Path(tmp) / "notify")
            notify.bind(address)
        notify.settimeout(TIMEOUT)
        lb = start(
            "--workers",
            "2",
            "--backend",
            echo_backend,
            env={**os.environ, "NOTIFY_SOCKET": address},
        )
        assert notify.recv(100) == b"READY=1"
        assert all(worker["ready"] for worker in lb.stats()["workers"])
        with lb.connect() as sock:  # serving, as READY=1 promised
            assert round_trip(sock, b"up") == b"up"
        lb.proc.send_signal(signal.SIGTERM)
        assert notify.recv(100) == b"STOPPING=1"
        assert lb.proc.wait(timeout=TIMEOUT) == 0


# ---- fastlb demo -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


def test_demo_answers_from_three_backends_in_turn_and_ctrl_c_stops_everything():
    port = free_port()
    demo = Running(
        "demo", "--listen", f"127.0.0.1:{port}", "--workers", "1", stdout=subprocess.PIPE
    )
    try:
        text = ""
        while "Ctrl-C" not in text:
            line = demo.proc.stdout.readline()
            assert line, "demo exited before it was ready:\n" + demo.log()
            text += line
        assert f"curl http://127.0.0.1:{port}/" in text
        stats_url = re.search(r"curl (http://127\.0\.0\.1:\d+/stats)", text)[1]

        answers = [http_get(port) for _ in range(6)]
        assert answers[:3] == answers[3:]
        assert sorted(answers[:3]) == [f"hello from backend-{i}\n" for i in (1, 2, 3)]
        stats_port = int(stats_url.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", stats_port, timeout=TIMEOUT)
        conn.request("GET", "/stats")
        assert len(json.loads(conn.getresponse().read())["backends"]) == 3
        conn.close()

        children = demo.descendants()
        assert len(children) == 4  # three backends and one worker
        assert demo.stop(signal.SIGINT) == 0
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
    finally:
        demo.kill()


def test_demo_answers_keep_alive_requests_without_the_nagle_delay():
    # A backend that wrote headers and body apart, with Nagle on, held the body for the ACK of
    # the headers, which delayed ACK sends after 40 ms: every answer after the first few.
    port = free_port()
    demo = Running(
        "demo", "--listen", f"127.0.0.1:{port}", "--workers", "1", stdout=subprocess.PIPE
    )
    try:
        while "Ctrl-C" not in (line := demo.proc.stdout.readline()):
            assert line, "demo exited before it was ready:\n" + demo.log()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        took = []
        for _ in range(20):
            started = time.perf_counter()
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.read().startswith(b"hello from backend-")
            took.append(time.perf_counter() - started)
        conn.close()
        milliseconds = [f"{seconds * 1000:.1f}" for seconds in took]
        assert statistics.median(took) < 0.010, milliseconds
        assert demo.stop(signal.SIGINT) == 0
    finally:
        demo.kill()
