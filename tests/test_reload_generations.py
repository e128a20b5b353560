"""Reloads, upgrades and restarts under load: a new generation of workers each time, and no
client refused, no stream cut, no byte corrupted.

A client loop keeps opening short connections (read the backend's name, close) while 50
long-lived connections stream random bytes through name-and-echo backends and check every byte
that comes back. Each reload changes the worker count, the algorithm and the pool's backends.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    CLIENT_TIMEOUT,
    Balancer,
    ClientLoop,
    free_ports,
    recv_line,
    run_balancers,
    toml_array,
    wait_until,
)

HERE = Path(__file__).resolve().parent
STREAMS = 50
CHUNK = 4096
RELOADS = 20
UPGRADES = 5
RESTARTS = 5  # of each kind
WORKERS = [1, 2, 3, 1]
ALGORITHMS = ["roundrobin", "leastconn", "random", "p2c"]


def config_text(port: int, stats: int, workers: int, algorithm: str, backends: list) -> str:
    return (
        f'listen = "127.0.0.1:{port}"\nstats = "127.0.0.1:{stats}"\nworkers = {workers}\n'
        f'algorithm = "{algorithm}"\ndrain-timeout = "60s"\n'
        f"backend = {toml_array(b.address for b in backends)}\n"
    )


class FileBalancer(Balancer):
    """``fastlb run --config FILE`` with every setting, the worker count too, in the file;
    ``prefix`` runs it under another program (activate.py, which plays systemd)."""

    def __init__(
        self,
        logdir: Path,
        workers: int,
        backends: list,
        port: int = 0,
        prefix: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
        extra: str = "",
    ):
        self.port, self.stats_port = free_ports(2)
        self.port = port or self.port
        self.extra = extra
        self.config_path = logdir / f"fastlb-{self.port}.toml"
        self.write(workers, "roundrobin", backends)
        self.workers = workers
        self.stopped_by_test = False
        self.argv = [*prefix, sys.executable, "-P", "-m", "fastlb", "run", "--config"]
        self.argv.append(str(self.config_path))
        self.log_path = logdir / f"fastlb-{self.port}.log"
        self.pass_fds = pass_fds
        self.descendants = {}
        self.launch()

    def launch(self) -> None:
        """Starts (again) ``fastlb run``, its log appended to the same file."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.config_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=self.pass_fds,
            )
        self.pid = self.proc.pid

    def write(self, workers: int, algorithm: str, backends: list) -> None:
        text = config_text(self.port, self.stats_port, workers, algorithm, backends)
        self.config_path.write_text(text + self.extra)

    def reload(self, generation: int, workers: int) -> None:
        """``fastlb reload``, then waits until generation ``generation`` alone accepts."""
        done = subprocess.run(
            [sys.executable, "-P", "-m", "fastlb", "reload", "--pid", str(self.pid)],
            cwd=self.config_path.parent,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        self.wait_generation(generation, workers)

    def wait_generation(self, generation: int, workers: int) -> dict:
        def done(stats):
            serving = [w for w in stats["workers"] if not w["draining"]]
            return (
                stats["generation"] == generation
                and stats["generation_active"]
                and len(serving) == workers
                and all(w["generation"] == generation and w["ready"] for w in serving)
            )

        stats = self.wait_for(done, 20.0, f"generation {generation} with {workers} workers")
        self.track_descendants()
        return stats


@pytest.fixture
def file_balancer(request, tmp_path):
    def make(workers: int, backends: list) -> FileBalancer:
        return FileBalancer(tmp_path, workers, backends)

    yield from run_balancers(request, make)


class Streams:
    """Long-lived connections that send random chunks and check each echoed byte, in a loop."""

    def __init__(self, lb, count: int = STREAMS):
        self.sockets = []
        for _ in range(count):
            sock = lb.connect()
            recv_line(sock)  # the backend's name; it echoes from here on
            self.sockets.append(sock)
        self.rounds = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        rng = random.Random(8)
        while not self.stop.is_set():
            for i, sock in enumerate(self.sockets):
                data = rng.randbytes(CHUNK)
                try:
                    sock.sendall(data)
                    echoed = bytearray()
                    while len(echoed) < CHUNK:
                        chunk = sock.recv(CHUNK - len(echoed))
                        if not chunk:
                            raise EOFError("closed")
                        echoed += chunk
                except (OSError, EOFError) as exc:
                    self.errors.append(f"stream {i}: {exc!r}")
                    self.stop.set()
                    return
                if echoed != data:
                    self.errors.append(f"stream {i}: corrupt bytes")
                    self.stop.set()
                    return
            self.rounds += 1

    def wait_rounds(self, n: int) -> None:
        target = self.rounds + n
        wait_until(lambda: self.rounds >= target or self.errors, 20.0, f"{n} stream rounds")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(timeout=30)
        for sock in self.sockets:
            sock.close()


def test_reloads_change_workers_algorithm_and_backends_without_a_failed_connect(
    backends, file_balancer
):
    names = [backends("name", name=n) for n in "abc"]
    lb = file_balancer(1, names)
    started = time.monotonic()
    with ClientLoop(lb) as clients, Streams(lb) as streams:
        clients.wait_for_more(200)
        for reload in range(RELOADS):
            workers = WORKERS[(reload + 1) % len(WORKERS)]
            pool = names[reload % 3 :] + names[: reload % 3][:1]  # a different list each time
            lb.write(workers, ALGORITHMS[reload % len(ALGORITHMS)], pool)
            lb.reload(reload + 2, workers)
            clients.wait_for_more(100)
            streams.wait_rounds(2)
        assert not streams.errors, streams.errors
        assert not clients.failures(), clients.failures()[:5]
        rate = clients.count() / (time.monotonic() - started)
    stats = lb.stats()
    assert stats["reloads"] == {"applied": RELOADS, "failed": 0}
    assert rate > 200, f"only {rate:.0f} connections/s: not under load"
    # Streams opened in generation 1 count in the totals while generation 1 drains.
    assert lb.wait_for(lambda s: all(w["generation"] == RELOADS + 1 for w in s["workers"]), 20)


def test_a_bad_file_refuses_the_reload_and_traffic_goes_on(backends, file_balancer):
    a = backends("name", name="a")
    lb = file_balancer(2, [a])
    with ClientLoop(lb) as clients:
        clients.wait_for_more(100)
        lb.config_path.write_text(lb.config_path.read_text() + "workers = = 3\n")
        done = subprocess.run(
            [sys.executable, "-P", "-m", "fastlb", "reload", "--pid", str(lb.pid)],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        clients.wait_for_more(100)
    assert done.returncode == 2
    assert done.stderr.startswith(f"fastlb: error: {lb.config_path}:7:"), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not clients.failures(), clients.failures()[:5]
    stats = lb.stats()
    assert stats["generation"] == 1 and stats["reloads"]["applied"] == 0
    # SIGHUP straight to the supervisor: refused there too, the settings stay.
    os.kill(lb.pid, signal.SIGHUP)
    wait_until(lambda: "reload failed" in lb.log(), 10, "the refused reload")
    assert lb.stats()["generation"] == 1


def upgrade(lb) -> None:
    """``fastlb upgrade``, then waits until the new supervisor's workers alone are listed."""
    old = set(lb.worker_pids())
    readies = lb.log().count("]: INFO ready:")
    done = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "upgrade", "--pid", str(lb.pid)],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    wait_until(lambda: lb.log().count("]: INFO ready:") > readies, 20, "the new supervisor")
    stats = lb.wait_for(lambda s: not old & {w["pid"] for w in s["workers"]}, 10)
    assert stats["pid"] == lb.pid  # the same process: systemd keeps following it
    lb.track_descendants()


def test_upgrades_exec_a_new_supervisor_that_takes_over_the_sockets(backends, file_balancer):
    names = [backends("name", name=n) for n in "ab"]
    lb = file_balancer(2, names)
    with ClientLoop(lb) as clients, Streams(lb, 10) as streams:
        clients.wait_for_more(100)
        for _ in range(UPGRADES):
            upgrade(lb)
            clients.wait_for_more(100)
            streams.wait_rounds(2)  # they were on the old workers, which drain
        assert not streams.errors, streams.errors
        assert not clients.failures(), clients.failures()[:5]
    assert "told 2 workers of the previous fastlb to drain" in lb.log()


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


@pytest.mark.parametrize("stop", ["restart", "kill"])
def test_restarts_on_systemd_sockets_refuse_no_client(backends, tmp_path, stop):
    """The test plays systemd: it holds the listening socket and starts each fastlb with it.
    A restart (SIGTERM, then a new one) or a killed supervisor (SIGKILL: its workers serve on
    until the next one's accept) refuses nobody."""
    a = backends("name", name="a")
    (port,) = free_ports(1)
    held = listening_socket(port)
    prefix = (sys.executable, str(HERE / "activate.py"), str(held.fileno()), "--")
    lb = FileBalancer(tmp_path, 2, [a], port, prefix, (held.fileno(),))
    try:
        lb.wait_ready()
        with ClientLoop(lb) as clients:
            clients.wait_for_more(100)
            for _ in range(RESTARTS):
                lb.track_descendants()
                lb.proc.send_signal(signal.SIGKILL if stop == "kill" else signal.SIGTERM)
                lb.proc.wait(timeout=20)
                lb.launch()
                lb.wait_ready()
                clients.wait_for_more(100)
            assert not clients.failures(), clients.failures()[:5]
        if stop == "kill":
            assert "told 2 workers of the previous fastlb to drain" in lb.log()
    finally:
        lb.cleanup()
        held.close()


def test_orphaned_workers_stop_after_the_orphan_timeout(backends, tmp_path):
    a = backends("name", name="a")
    lb = FileBalancer(tmp_path, 1, [a], extra='orphan-timeout = "500ms"\n')
    try:
        lb.wait_ready()
        (worker,) = lb.worker_pids()
        lb.track_descendants()
        lb.proc.kill()
        lb.proc.wait(timeout=10)
        assert lb.ask_name() == "a"  # served by the orphan
        wait_until(lambda: not _alive(worker), 10, "the orphan to exit")
        assert "no new supervisor after 0.5s: draining" in lb.log()
    finally:
        for proc in lb.descendants.values():
            if proc.is_running():
                proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_reload_binds_new_addresses_first_and_retires_removed_ones(backends, file_balancer):
    a = backends("name", name="a")
    lb = file_balancer(2, [a])
    second, third = free_ports(2)

    def listen_on(*ports: int) -> None:
        text = lb.config_path.read_text().splitlines()
        text[0] = f"listen = {toml_array(f'127.0.0.1:{p}' for p in ports)}"
        lb.config_path.write_text("\n".join(text) + "\n")

    with ClientLoop(lb) as clients:
        listen_on(lb.port, second)
        lb.reload(2, 2)
        assert lb.ask_name(address=("127.0.0.1", second)) == "a"
        listen_on(lb.port, third)
        lb.reload(3, 2)
        assert lb.ask_name(address=("127.0.0.1", third)) == "a"
        with pytest.raises(ConnectionRefusedError):
            lb.connect(address=("127.0.0.1", second))
        clients.wait_for_more(100)
    assert not clients.failures(), clients.failures()[:5]
    assert f"stopped listening on 127.0.0.1:{second}" in lb.log()
