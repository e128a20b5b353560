"""Fixtures for the black-box tests: fake backend processes with the real ``fastlb run`` in front.

The backends are ``tests/backends.py`` processes; the balancer is ``python -m fastlb run`` with a
``--stats`` endpoint that tells when every worker is ready. Both are started on free loopback
ports, waited for by reading a message from them (never by sleeping), and killed by PID at
teardown. The balancer's stderr goes to a file that is attached to the report of a failed test.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

BACKENDS_PROGRAM = Path(__file__).resolve().parent / "backends.py"
START_TIMEOUT = 20.0  # generous: the suite shares two cores with whatever else runs
STOP_TIMEOUT = 15.0
CLIENT_TIMEOUT = 10.0
TEST_TIMEOUT = 120  # per test, when pytest-timeout is installed

# A shell without job control starts background commands with Ctrl-C (SIGINT) ignored, and
# every process started from them inherits that: the tests of Ctrl-C need it back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config):
    import fastlb

    return f"fastlb: {fastlb.__file__}"


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("timeout"):
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for balancer in getattr(item, "fastlb_balancers", ()):
            report.sections.append((f"fastlb stderr (pid {balancer.pid})", balancer.log()))
        for peer in getattr(item, "peer_processes", ()):
            report.sections.append((f"{peer.name} log (pid {peer.pid})", peer.log()))
    return report


# ---- helpers for clients ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Polls ``predicate`` until it returns something true, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def connect(
    address: tuple[str, int], source: str | None = None, timeout: float = CLIENT_TIMEOUT
) -> socket.socket:
    """A TCP connection to ("host", port), IPv4 or IPv6, from the local address ``source``."""
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def assert_closed(sock: socket.socket) -> None:
    """Waits (up to the socket's timeout) for the peer to close, by EOF or by a reset, having sent
    nothing."""
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return
    assert data == b"", f"expected the connection closed, got {data!r}"


def recv_line(sock: socket.socket) -> str:
    """The first line the peer sends; raises EOFError if it closes before a whole line."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    return data.split(b"\n", 1)[0].decode()


def recv_all(sock: socket.socket) -> bytes:
    """Everything the peer sends until EOF."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def recv_until_eof(sock: socket.socket) -> tuple[int, str]:
    """Reads until EOF; returns (bytes read, sha256 hex digest)."""
    digest = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while n := sock.recv_into(buf):
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


class Attempt(NamedTuple):
    started: float
    name: str | None  # the backend that answered
    error: str | None  # e.g. "ConnectionRefusedError(111, 'Connection refused')"


class ClientLoop:
    """Threads that keep opening connections, each reading the backend's name and closing."""

    def __init__(self, lb, threads: int = 4):
        self.lb = lb
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[Attempt] = []
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                name, error = self.lb.ask_name(), None
            except (OSError, EOFError) as exc:
                name, error = None, repr(exc)
            with self.lock:
                self.results.append(Attempt(started, name, error))

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def wait_for_more(self, n: int, timeout: float = 20.0) -> None:
        target = self.count() + n
        wait_until(lambda: self.count() >= target, timeout, f"{n} more client connections")

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def failures(self, started_after: float = 0.0) -> list[Attempt]:
        return [a for a in self.results if a.error is not None and a.started >= started_after]


# ---- fake backends ------------------------------------------------------------------------------


class Backend:
    """One ``backends.py`` process; ``events`` receives its JSON event lines."""

    def __init__(
        self,
        mode: str,
        name: str,
        nbytes: int = 0,
        port: int = 0,
        status_file: str = "",
        host: str = "127.0.0.1",
    ):
        self.mode = mode
        self.name = name
        self.host = host
        self.proc = subprocess.Popen(
            [sys.executable, str(BACKENDS_PROGRAM), mode, "--name", name]
            + ["--bytes", str(nbytes), "--port", str(port), "--host", host]
            + (["--status-file", status_file] if status_file else []),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.pid = self.proc.pid
        lines: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        try:
            self.port = int(lines.get(timeout=START_TIMEOUT))
        except queue.Empty:
            self.kill()
            raise AssertionError(f"backend {name} ({mode}) did not start") from None

    def _read(self, lines: queue.Queue) -> None:
        first = True
        for line in self.proc.stdout:
            if first:
                lines.put(line)
                first = False
            else:
                self.events.put(json.loads(line))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def next_event(self, kind: str = "closed", timeout: float = CLIENT_TIMEOUT, **fields) -> dict:
        """The next event of this kind with these field values; earlier ones are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"backend {self.name}: no {kind!r} event {fields}") from None
            if event["event"] == kind and all(event[k] == v for k, v in fields.items()):
                return event

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def refused_address():
    """ "127.0.0.1:PORT" of a socket bound but never listening: every connect to it is refused,
    and no other process can take the port while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def backends():
    """``backends(mode, name=..., nbytes=..., port=...)`` starts one fake backend process."""
    started: list[Backend] = []
    counter = iter(range(1, 1000))

    def start(
        mode: str = "name",
        name: str | None = None,
        nbytes: int = 0,
        port: int = 0,
        status_file: str = "",
        host: str = "127.0.0.1",
    ):
        backend = Backend(mode, name or f"{mode}{next(counter)}", nbytes, port, status_file, host)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.kill()


# ---- the balancer -------------------------------------------------------------------------------


class Balancer:
    """A running ``fastlb run``; its client port is ``port``."""

    def __init__(self, backends: list, args: tuple[str, ...], workers: int, logdir: Path):
        self.port = free_port()
        self.stats_port = free_port()
        specs = []
        for backend in backends:
            specs += ["--backend", backend.address if isinstance(backend, Backend) else backend]
        argv = ["--listen", f"127.0.0.1:{self.port}", "--stats", f"127.0.0.1:{self.stats_port}"]
        self.start(argv + ["--workers", str(workers)] + specs + list(args), workers, logdir)

    def start(self, run_args: list[str], workers: int, logdir: Path) -> None:
        """Starts ``fastlb run`` with these arguments; its log is named after ``self.port``."""
        self.workers = workers
        self.stopped_by_test = False
        self.argv = [sys.executable, "-P", "-m", "fastlb", "run"] + run_args
        self.log_path = logdir / f"fastlb-{self.port}.log"
        with open(self.log_path, "wb") as log:
            # cwd away from the source tree: "-m" must import the installed package.
            self.proc = subprocess.Popen(
                self.argv, cwd=logdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.pid = self.proc.pid
        self.descendants: dict[int, psutil.Process] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fail(self, message: str):
        raise AssertionError(f"{message}\ncommand: {' '.join(self.argv)}\nstderr:\n{self.log()}")

    # -- state

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.stats_port, timeout=CLIENT_TIMEOUT)
        try:
            conn.request("GET", "/stats")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, f"GET /stats: {response.status} {body!r}"
            return json.loads(body)
        finally:
            conn.close()

    def backend(self, backend, stats: dict | None = None) -> dict:
        """The /stats entry of one backend (a Backend or a "host:port")."""
        address = backend.address if isinstance(backend, Backend) else backend
        for entry in (stats or self.stats())["backends"]:
            if entry["address"] == address:
                return entry
        raise AssertionError(f"{address} not in /stats")

    def active(self) -> int:
        return sum(entry["active"] for entry in self.stats()["backends"])

    def worker_pids(self) -> list[int]:
        return [worker["pid"] for worker in self.stats()["workers"]]

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "a /stats condition"):
        """Polls /stats until ``predicate(stats)`` holds; returns those stats."""
        last = {}

        def check():
            last["stats"] = self.stats()
            return predicate(last["stats"])

        try:
            wait_until(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last /stats: {last.get('stats')}") from None
        return last["stats"]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.fail(f"fastlb exited with {self.proc.returncode} while starting")
            try:
                workers = self.stats()["workers"]
                if len(workers) == self.workers and all(w["ready"] for w in workers):
                    break
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            if time.monotonic() > deadline:
                self.fail(f"fastlb not ready after {START_TIMEOUT}s")
            time.sleep(0.02)
        self.track_descendants()

    def track_descendants(self) -> None:
        for child in psutil.Process(self.pid).children(recursive=True):
            self.descendants.setdefault(child.pid, child)

    # -- clients

    def connect(
        self,
        source: str | None = None,
        timeout: float = CLIENT_TIMEOUT,
        address: tuple[str, int] | None = None,
    ) -> socket.socket:
        """A client connection from ``source`` (a local address) to ``address``, by default
        127.0.0.1 on ``port``."""
        return connect(address or ("127.0.0.1", self.port), source, timeout)

    def ask_name(self, source: str | None = None, address: tuple[str, int] | None = None) -> str:
        """Connects, reads the backend's name line and closes."""
        with self.connect(source, address=address) as sock:
            return recv_line(sock)

    # -- stopping

    def signal(self, signum: int) -> None:
        """Sends a signal; the test then owns how it exits (see wait_exit)."""
        self.track_descendants()
        self.stopped_by_test = True
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"fastlb still running after {timeout}s")

    def cleanup(self) -> None:
        """Stops it if still running, kills what is left, then checks nothing was left."""
        problems = []
        if self.proc.poll() is None:
            self.track_descendants()
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=STOP_TIMEOUT)
                if code != 0:
                    problems.append(f"exit status {code} after SIGTERM")
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
                problems.append(f"still running {STOP_TIMEOUT}s after SIGTERM")
        elif not self.stopped_by_test:
            problems.append(f"exited by itself with status {self.proc.returncode}")
        # Each worker that drained checks that its connections returned every buffer and pipe.
        problems += [line for line in self.log().splitlines() if " leaked " in line]

        def leftovers():
            alive = []
            for proc in self.descendants.values():
                try:
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(proc)
                except psutil.NoSuchProcess:
                    pass
            return alive

        try:
            wait_until(lambda: not leftovers(), 5.0, "the workers to exit")
        except AssertionError:
            left = leftovers()
            problems.append(f"processes left behind: {[p.pid for p in left]}")
            for proc in left:
                proc.kill()
        if problems:
            self.fail("; ".join(problems))


def run_balancers(request, make):
    """The fixture body of ``balancer`` and ``configured``: ``start(...)`` makes one with
    ``make(...)`` and waits until it is ready; at teardown each is stopped and checked."""
    started: list[Balancer] = []
    if not hasattr(request.node, "fastlb_balancers"):
        request.node.fastlb_balancers = []

    def start(*args, **kwargs) -> Balancer:
        lb = make(*args, **kwargs)
        started.append(lb)
        request.node.fastlb_balancers.append(lb)
        lb.wait_ready()
        return lb

    yield start
    errors = []
    for lb in started:
        try:
            lb.cleanup()
        except AssertionError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture
def balancer(request, tmp_path):
    """``balancer(backends, *flags, workers=1)`` runs ``fastlb run`` and waits until it is ready.

    backends are Backend handles or "host:port[,weight=N][,backup]" strings."""

    def make(backends: list, *args: str, workers: int = 1) -> Balancer:
        return Balancer(backends, args, workers, tmp_path)

    yield from run_balancers(request, make)


# ---- a balancer from a configuration file: frontends, pools, PROXY protocol, SNI ---------------


def loopback_listener() -> socket.socket:
    """A listening socket on 127.0.0.1 and a free port, with a 5 s timeout: a backend or
    frontend for tests that drive fastlb._dataplane.Worker directly."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.settimeout(5)
    return sock


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different ports, each free on ``host`` when returned."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(family)
            held.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (containers often have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port_on_both_loopbacks() -> int:
    """A port free on 127.0.0.1 and on ::1 alike."""
    while True:
        with socket.socket(socket.AF_INET6) as v6, socket.socket() as v4:
            v6.bind(("::1", 0))
            port = v6.getsockname()[1]
            try:
                v4.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue  # taken on 127.0.0.1: another try


def toml_array(values) -> str:
    """A TOML array of strings, e.g. the backends of a pool (JSON writes them as TOML does)."""
    return json.dumps([str(value) for value in values])


def split_address(text: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class ConfiguredBalancer(Balancer):
    """``fastlb run --config FILE``, the file being ``toml_text``; the stats address is the
    file's ``stats``. ``listen`` maps each frontend to its addresses, in the file's order;
    ``port`` is the first frontend's first port, where ``connect()`` goes by default."""

    def __init__(self, toml_text: str, workers: int, logdir: Path):
        document = tomllib.loads(toml_text)
        frontends = document.get("frontend", {})
        pools = document.get("pool", {})
        assert frontends and "stats" in document, "the file needs stats and a [frontend.NAME]"
        for name, frontend in frontends.items():
            for pool in [frontend["pool"], *frontend.get("sni", {}).values()]:
                assert pool in pools, f"frontend {name} routes to {pool}: no [pool.{pool}]"
        self.listen = {
            name: [split_address(address) for address in frontend["listen"]]
            for name, frontend in frontends.items()
        }
        self.port = next(iter(self.listen.values()))[0][1]
        self.stats_port = split_address(document["stats"])[1]
        self.config_path = logdir / f"fastlb-{self.port}.toml"
        self.config_path.write_text(toml_text)
        self.start(["--config", str(self.config_path), "--workers", str(workers)], workers, logdir)

    def address(self, frontend: str, index: int = 0) -> tuple[str, int]:
        """The ``index``-th listen address of ``frontend``, for ``connect(address=...)``."""
        return self.listen[frontend][index]

    def frontend_stats(self, name: str, stats: dict | None = None) -> dict:
        for entry in (stats or self.stats())["frontends"]:
            if entry["name"] == name:
                return entry
        raise AssertionError(f"frontend {name} not in /stats")

    def fail(self, message: str):
        super().fail(f"{message}\n--config {self.config_path}:\n{self.config_path.read_text()}")


@pytest.fixture
def configured(request, tmp_path):
    """``configured(toml_text, workers=1)`` runs ``fastlb run --config FILE`` and waits until it
    is ready. The text sets ``stats`` (see ``free_ports``); ``workers`` goes on the command line,
    which wins over the file."""

    def make(toml_text: str, workers: int = 1) -> ConfiguredBalancer:
        return ConfiguredBalancer(toml_text, workers, tmp_path)

    yield from run_balancers(request, make)


@pytest.fixture
def peers(request, tmp_path):
    """A ``peers.Peers``: HAProxy, nginx and ``openssl s_server`` processes, stopped at teardown."""
    from peers import Peers  # peers.py builds on the helpers of this file

    started = Peers(tmp_path)
    request.node.peer_processes = started.started
    yield started
    started.stop_all()
