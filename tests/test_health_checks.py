"""Health as operators see it: protocol checks that find a hung or broken backend, passive
detection of one that accepts and does no work, backups as the last try of a connection, on-down
resets, panic, flap damping and slow start. Every test also checks that no client fails while
one backend is up."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import CLIENT_TIMEOUT, free_ports, recv_all, recv_line, wait_until


def down(lb, backend, stats=None) -> bool:
    return not lb.backend(backend, stats)["up"]


def echo_once(lb, payload: bytes = b"ping\n") -> bytes:
    with lb.connect() as sock:
        sock.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_a_backend_that_accepts_and_closes_is_marked_down_and_its_clients_retried(
    backends, balancer
):
    a = backends("name", name="a")
    closing = backends("close", name="closing")
    lb = balancer([a, closing], "--fall", "3")
    names = [lb.ask_name() for _ in range(30)]
    assert names == ["a"] * 30  # every client that met the closing backend was retried
    stats = lb.wait_for(lambda s: down(lb, closing, s), what="the closing backend down")
    assert lb.backend(closing, stats)["failed"] >= 3
    assert "connects failed in a row" in lb.log()


def test_connections_fall_through_to_the_backup_when_every_primary_fails(
    backends, balancer, refused_address
):
    spare = backends("name", name="spare")
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))  # a second refused address, held for the test
        second = f"127.0.0.1:{other.getsockname()[1]}"
        # fall 1000: the primaries are never marked down while the clients come.
        lb = balancer([refused_address, second, f"{spare.address},backup"], "--fall", "1000")
        assert [lb.ask_name() for _ in range(20)] == ["spare"] * 20
        stats = lb.stats()
        assert lb.backend(refused_address, stats)["up"] and lb.backend(second, stats)["up"]


def test_first_byte_timeout_moves_clients_off_a_silent_backend(backends, balancer):
    silent = backends("silent", name="silent")
    echo = backends("echo", name="echo")
    lb = balancer(
        [silent, echo], "--observe", "first-byte", "--first-byte-timeout", "0.3s", "--fall", "2"
    )
    started = time.monotonic()
    answers = [echo_once(lb, f"ping {i}\n".encode()) for i in range(6)]
    assert answers == [f"ping {i}\n".encode() for i in range(6)]
    lb.wait_for(lambda s: down(lb, silent, s), what="the silent backend down")
    # Each retry waits out the timeout (and at most one scan of 100 ms) at most twice.
    assert time.monotonic() - started < 6 * 0.3 + 2 * 0.5 + 3.0


def test_a_stopped_backend_fails_its_http_check_in_time_and_on_down_resets_its_clients(
    backends, balancer
):
    a = backends("http", name="a")
    b = backends("http", name="b")
    interval, fall, timeout = 0.2, 2, 0.3
    lb = balancer(
        [a, b],
        *("--check", "--check-type", "http", "--check-path", "/health"),
        *("--check-interval", f"{interval}s", "--check-timeout", f"{timeout}s"),
        *("--fall", str(fall), "--rise", "1", "--on-down", "close"),
    )
    held = []
    for _ in range(4):  # roundrobin: two on each backend, their requests not yet sent
        sock = lb.connect()
        held.append(sock)
    lb.wait_for(lambda s: lb.backend(b, s)["active"] == 2, what="two connections on b")
    b.proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        lb.wait_for(lambda s: down(lb, b, s), timeout=10, what="b down")
        detected = time.monotonic() - stopped
        assert detected <= interval * fall + timeout + 1.0, detected
        # on-down close: b's clients were reset at once, a's keep going.
        outcomes = []
        for sock in held:
            sock.settimeout(CLIENT_TIMEOUT)
            try:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                outcomes.append(recv_all(sock).split(b"\r\n\r\n", 1)[-1].decode())
            except (ConnectionResetError, BrokenPipeError):
                outcomes.append("reset")
        assert sorted(outcomes) == ["a\n", "a\n", "reset", "reset"]
        assert time.monotonic() - stopped <= interval * fall + timeout + 1.0 + CLIENT_TIMEOUT
        assert lb.backend(b)["history"]["transitions"][-1]["to"] == "down"
    finally:
        b.proc.send_signal(signal.SIGCONT)
        for sock in held:
            sock.close()


def test_health_500_marks_down_and_200_brings_back_after_rise(backends, balancer, tmp_path):
    status = tmp_path / "status"
    status.write_text("200")
    a = backends("http", name="a")
    b = backends("http", name="b", status_file=str(status))
    lb = balancer(
        [a, b],
        *("--check", "--check-type", "http", "--check-path", "/health"),
        *("--check-interval", "0.1s", "--fall", "2", "--rise", "3"),
    )
    status.write_text("500")
    lb.wait_for(lambda s: down(lb, b, s), what="b down on 500")
    entry = lb.backend(b)
    assert entry["history"]["last_check"]["ok"] is False
    assert "500" in entry["history"]["last_check"]["reason"]
    status.write_text("200")
    lb.wait_for(lambda s: lb.backend(b, s)["up"], what="b up on 200")
    assert "3 checks passed in a row" in lb.log()


def test_panic_spreads_over_every_primary_when_too_few_are_up(backends, balancer):
    def run(threshold: str) -> int:
        a = backends("name", name="a")
        dead = [backends("name") for _ in range(2)]
        lb = balancer(
            [a, *dead],
            *("--check", "--check-interval", "0.1s", "--fall", "1"),
            *("--panic-threshold", threshold),
        )
        for backend in dead:
            backend.kill()
        lb.wait_for(
            lambda s: all(down(lb, d, s) for d in dead), what="both dead backends marked down"
        )
        failed = sum(lb.backend(d)["failed"] for d in dead)
        assert [lb.ask_name() for _ in range(20)] == ["a"] * 20
        stats = lb.wait_for(lambda s: lb.backend(a, s)["connections"] >= 20, what="the report")
        return sum(lb.backend(d, stats)["failed"] for d in dead) - failed

    assert run("0") == 0  # off: the down primaries are left alone
    assert run("50%") > 0  # 1 of 3 up is under half: every primary is tried, then retried


def test_slow_start_ramps_a_returning_backend_up(backends, balancer):
    a = backends("name", name="a")
    b = backends("name", name="b")
    lb = balancer(
        [a, b],
        *("--check", "--check-interval", "0.1s", "--fall", "1", "--rise", "1"),
        "--slow-start", "3s",
    )  # fmt: skip
    port = b.port
    b.kill()
    lb.wait_for(lambda s: down(lb, b, s), what="b down")
    b = backends("name", name="b", port=port)
    lb.wait_for(lambda s: lb.backend(b, s)["up"], what="b back up")
    came_back = time.monotonic()
    shares = []
    for second in range(4):
        names = []
        while time.monotonic() < came_back + second + 1:
            names.append(lb.ask_name())
        shares.append(names.count("b") / len(names))
    assert shares[0] < 0.3, shares
    assert shares[0] < shares[1] < shares[3], shares
    assert shares[3] > 0.4, shares


def test_a_flapping_backend_is_held_down_longer_each_time(backends, configured):
    a = backends("name", name="a")
    b = backends("name", name="b")
    stats, front = free_ports(2)
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.f]
        listen = ["127.0.0.1:{front}"]
        pool = "p"
        [pool.p]
        backend = ["{a.address}", "{b.address}"]
        [pool.p.check]
        interval = "50ms"
        fall = 1
        rise = 1
        flap-window = "30s"
        flap-base = "500ms"
        flap-max = "5s"
    """)
    port, address = b.port, b.address
    holds = []
    for _ in range(3):
        b.kill()
        lb.wait_for(lambda s: down(lb, address, s), what="b down")
        b = backends("name", name="b", port=port)
        lb.wait_for(lambda s: lb.backend(address, s)["up"], timeout=15, what="b back up")
        # How long it stayed down, by the supervisor's own record of the two transitions (the
        # test's polls see each of them a little late, by different amounts).
        fell, rose = lb.backend(address)["history"]["transitions"][-2:]
        assert (fell["to"], rose["to"]) == ("down", "up")
        holds.append(rose["at"] - fell["at"])
        assert lb.ask_name() in ("a", "b")
    # The first fall follows no rise: no flap. Each later one comes within the window of a
    # rise: held down flap-base x the flaps in a row, 0.5 s then 1 s.
    assert holds[1] >= 0.5 and holds[2] >= 1.0, holds
    assert holds[2] > holds[1], holds


def test_the_idle_timeout_has_a_default_and_closes_hung_connections(backends, balancer):
    # The default (10 minutes) is too long to wait for here: that it is there, and that an
    # idle timeout closes a connection to a hung backend.
    checked = subprocess.run(
        [sys.executable, "-P", "-m", "fastlb", "check", "--listen", "127.0.0.1:0", "--backend",
         "127.0.0.1:9"],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent,
    )  # fmt: skip
    assert re.search(r"idle-timeout\s*=\s*600(\.0)?$", checked.stdout, re.M), checked.stdout
    silent = backends("silent", name="silent")
    lb = balancer([silent], "--idle-timeout", "0.3s")
    with lb.connect() as sock:
        sock.sendall(b"hello")
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 2.0
    wait_until(lambda: lb.active() == 0, 5, "the connection counted closed")


class Agent:
    """An agent-check server on ``host``: answers every connection with ``reply`` + "\\n"."""

    def __init__(self, host: str, port: int = 0):
        self.reply = "up"
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.sendall(self.reply.encode() + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def agents_on_one_port(hosts: list[str]) -> list[Agent]:
    """An agent on each address, all on one port (an agent check has one port per pool)."""
    for _ in range(20):
        agents = [Agent(hosts[0])]
        try:
            agents += [Agent(host, agents[0].port) for host in hosts[1:]]
            return agents
        except OSError:  # that port is taken on another address: try another
            for agent in agents:
                agent.close()
    raise AssertionError("no port free on every address")


def test_an_agent_drives_weight_and_drain(backends, configured):
    # Each backend on a loopback address of its own, its agent on the same port there.
    a = backends("name", name="a", host="127.0.0.1")
    b = backends("name", name="b", host="127.0.0.2")
    agents = dict(zip("ab", agents_on_one_port(["127.0.0.1", "127.0.0.2"]), strict=True))
    try:
        stats, front = free_ports(2)
        lb = configured(f"""
            stats = "127.0.0.1:{stats}"
            [frontend.f]
            listen = ["127.0.0.1:{front}"]
            pool = "p"
            [pool.p]
            backend = ["{a.address}", "{b.address}"]
            [pool.p.check]
            type = "agent"
            port = {agents["a"].port}
            interval = "50ms"
        """)
        lb.wait_for(lambda s: all(e["history"]["last_check"] for e in s["backends"]))
        held = lb.connect()  # one connection on each backend, from the first two clients
        held_name = recv_line(held)
        other = lb.connect()
        assert {held_name, recv_line(other)} == {"a", "b"}
        other.close()
        drained = {"a": a, "b": b}[held_name]
        agents[held_name].reply = "drain"
        lb.wait_for(lambda s: lb.backend(drained, s)["history"]["state"] == "drain")
        assert lb.backend(drained)["effective_weight"] == 0
        names = [lb.ask_name() for _ in range(10)]
        assert drained.name not in names  # no new connections while it drains
        held.sendall(b"still here\n")
        assert recv_line(held) == "still here"  # the open one goes on
        held.close()
        agents[held_name].reply = "ready 25%"
        lb.wait_for(lambda s: lb.backend(drained, s)["effective_weight"] == 0.25)
        assert lb.backend(drained)["history"]["state"] == "up"
        names = [lb.ask_name() for _ in range(50)]
        assert names.count(drained.name) in (9, 10, 11)  # weights 1 : 0.25, smooth round robin
    finally:
        for agent in agents.values():
            agent.close()


def test_a_stopped_redis_server_fails_its_redis_check(backends, configured, peers):
    first, second = peers.redis_server(), peers.redis_server()
    stats, front = free_ports(2)
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.redis]
        listen = ["127.0.0.1:{front}"]
        pool = "redis"
        [pool.redis]
        backend = ["{first.text}", "{second.text}"]
        on-down = "close"
        [pool.redis.check]
        type = "redis"
        interval = "200ms"
        timeout = "300ms"
        fall = 2
    """)
    lb.wait_for(lambda s: all(b["history"]["last_check"] for b in s["backends"]))

    def ping() -> bytes:
        with lb.connect() as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)

    assert [ping() for _ in range(4)] == [b"+PONG\r\n"] * 4
    second.proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        lb.wait_for(lambda s: not lb.backend(second.text, s)["up"], what="the stopped one down")
        assert time.monotonic() - stopped <= 0.2 * 2 + 0.3 + 1.0 + 0.5
        assert lb.backend(second.text)["history"]["last_check"]["reason"] == "timeout"
        assert [ping() for _ in range(4)] == [b"+PONG\r\n"] * 4
    finally:
        second.proc.send_signal(signal.SIGCONT)
