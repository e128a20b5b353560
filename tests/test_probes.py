"""The health-check probes of every kind, against real servers on loopback.

Each test drives a real ``selectors.DefaultSelector`` loop, the way the supervisor does, until
every result has come (bounded). The servers are threads of this process (HTTP, scripted TCP
replies), or real programs started on free ports and stopped by PID: ``redis-server``,
PostgreSQL (run as ``nobody`` when the tests run as root, since it refuses root) and ``openssl
s_server``; a test whose program is not installed is skipped, naming its Debian package.
"""

from __future__ import annotations

import glob
import http.server
import os
import pwd
import queue
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import START_TIMEOUT, free_port, free_ports
from peers import PeerProcess, RedisServer, accepts, require, self_signed_certificate

from fastlb.health import probes
from fastlb.health.probes import LOCAL_HEADERS, Checker, CheckResult, parse_agent_reply
from fastlb.model import Address, CheckSpec

LOOP_BOUND = 15.0  # seconds a test's checks may take, all together, before the test fails
HANDLER_TIMEOUT = 10.0  # a scripted server's connection never outlives a test


def run_checks(checks: list[tuple[Address, CheckSpec, str | None]]) -> list[CheckResult]:
    """Runs the checks at once in a selectors loop; their results, in order."""
    selector = selectors.DefaultSelector()
    results: dict[int, CheckResult] = {}
    checker = Checker(selector, results.__setitem__)
    for key, (address, spec, send_proxy) in enumerate(checks):
        checker.check(key, address, spec, send_proxy)
    drive(checker, selector, results, len(checks))
    assert not checker.pending
    checker.close()  # kept http connections too
    assert not selector.get_map()
    selector.close()
    return [results[key] for key in range(len(checks))]


def drive(checker: Checker, selector: selectors.BaseSelector, results: dict, count: int) -> None:
    """Runs the selectors loop until ``results`` has ``count`` entries (bounded)."""
    give_up = time.monotonic() + LOOP_BOUND
    while len(results) < count:
        now = time.monotonic()
        assert now < give_up, f"only {len(results)} of {count} checks ended"
        wake = min(checker.next_deadline() or give_up, give_up)
        for key, mask in selector.select(max(0.0, wake - now)):
            key.data(mask)
        checker.expire(time.monotonic())


def check_one(address: Address, spec: CheckSpec, send_proxy: str | None = None) -> CheckResult:
    return run_checks([(address, spec, send_proxy)])[0]


# ---- scripted TCP servers -------------------------------------------------------------------


class ScriptedServer:
    """Listens on 127.0.0.1 and runs ``handler(conn, server)`` in a thread per connection;
    handlers put what they saw in ``server.seen``."""

    def __init__(self, handler, backlog: int = 64, host: str = "127.0.0.1"):
        self.handler = handler
        self.seen: queue.Queue = queue.Queue()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family, backlog=backlog)
        self.address = Address(host, self.listener.getsockname()[1])
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # shut down
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(HANDLER_TIMEOUT)
        with conn:
            try:
                self.handler(conn, self)
            except OSError:  # the checker closes with a reset
                pass

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.thread.join(timeout=HANDLER_TIMEOUT)


@pytest.fixture
def serve():
    """``serve(handler, backlog, host)``: a :class:`ScriptedServer`, stopped at teardown."""
    started = []

    def start(handler, backlog: int = 64, host: str = "127.0.0.1") -> ScriptedServer:
        server = ScriptedServer(handler, backlog, host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def replies(data: bytes):
    """A handler that speaks first: sends ``data`` and closes."""
    return lambda conn, server: conn.sendall(data)


def answers(data: bytes):
    """A handler that reads the request (so that closing sends no reset), answers ``data`` and
    closes."""

    def answer(conn, server):
        conn.recv(4096)
        conn.sendall(data)

    return answer


def close_at_once(conn, server) -> None:
    pass


def closes_after_reading(conn, server) -> None:
    conn.recv(4096)  # closing with unread data would send a reset rather than the end of stream


def never_answers(conn, server) -> None:
    while conn.recv(4096):
        pass


def echoes(conn, server) -> None:
    while data := conn.recv(4096):
        conn.sendall(data)


def read_all(conn, server) -> None:
    """Reports everything read until the end of the stream or a reset."""
    data = b""
    try:
        while chunk := conn.recv(4096):
            data += chunk
    finally:
        server.seen.put(data)


BOUND_NOT_LISTENING: list[socket.socket] = []  # kept bound, so that no one else takes the ports


def refused_address() -> Address:
    """A loopback port that is bound but not listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    BOUND_NOT_LISTENING.append(sock)
    return Address("127.0.0.1", sock.getsockname()[1])


# ---- tcp ----------------------------------------------------------------------------------------


def test_tcp_passes_on_connect_and_fails_when_refused(serve):
    server = serve(close_at_once)
    ok, refused = run_checks(
        [(server.address, CheckSpec(), None), (refused_address(), CheckSpec(), None)]
    )
    assert (ok.ok, ok.reason) == (True, "connected")
    assert (refused.ok, refused.reason) == (False, "refused")
    assert 0 <= ok.duration < CheckSpec().timeout


def test_tcp_times_out_when_the_accept_queue_is_full():
    # With a backlog of 0, Linux queues one connection; SYNs beyond it are dropped.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT):
            result = check_one(Address("127.0.0.1", port), CheckSpec(timeout=0.3))
    assert (result.ok, result.reason) == (False, "timeout")
    assert 0.3 <= result.duration < 2.0


def test_a_check_whose_connect_is_pending_sends_its_request_once_connected():
    # The accept queue is full, so the check's SYN is dropped and its connect stays pending;
    # once the queue has room, the SYN sent again (a second later) gets through.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        address = Address("127.0.0.1", listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", address.port), timeout=START_TIMEOUT):
            selector = selectors.DefaultSelector()
            results: dict[int, CheckResult] = {}
            checker = Checker(selector, results.__setitem__)
            checker.check(0, address, CheckSpec(type="http", path="/late", timeout=10.0))
            assert checker.busy(0) and not checker.pending[0].connected
            listener.accept()[0].close()  # the connection that filled the queue
            listener.settimeout(HANDLER_TIMEOUT)
            seen = queue.Queue()

            def answer():
                conn, _ = listener.accept()
                with conn:
                    seen.put(conn.recv(4096))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

            server = threading.Thread(target=answer, daemon=True)
            server.start()
            drive(checker, selector, results, 1)
            server.join(timeout=HANDLER_TIMEOUT)
    assert (results[0].ok, results[0].reason) == (True, "HTTP 200")
    assert seen.get(timeout=HANDLER_TIMEOUT).startswith(b"GET /late HTTP/1.1\r\n")
    assert not checker.pending
    checker.close()
    assert not selector.get_map()
    selector.close()


def test_the_check_port_overrides_the_backend_port(serve):
    server = serve(close_at_once)
    result = check_one(refused_address(), CheckSpec(port=server.address.port))
    assert result.ok


def test_proxy_local_headers_come_first(serve):
    server = serve(read_all)
    for send_proxy in ("v1", "v2"):
        assert check_one(server.address, CheckSpec(), send_proxy).ok
        assert server.seen.get(timeout=HANDLER_TIMEOUT) == LOCAL_HEADERS[send_proxy]
    assert LOCAL_HEADERS["v2"] == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def test_proxy_local_header_before_an_http_request(serve):
    def header_then_request(conn, server):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(4096)
        server.seen.put(data)
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = serve(header_then_request)
    result = check_one(server.address, CheckSpec(type="http", path="/ping"), "v2")
    assert (result.ok, result.reason) == (True, "HTTP 204")
    seen = server.seen.get(timeout=HANDLER_TIMEOUT)
    assert seen.startswith(LOCAL_HEADERS["v2"] + b"GET /ping HTTP/1.1\r\n"), seen


# ---- http ---------------------------------------------------------------------------------------

ROUTES = {
    "/health": (200, b"ok"),
    "/bad": (500, b"broken"),
    "/moved": (301, b""),
    "/status": (200, b'{"db": "up", "cache": "warm", "version": "4.2.1"}'),
    "/big": (200, b"x" * 70000 + b"needle"),
}


class HealthHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.answer(with_body=True)

    def do_HEAD(self):
        self.answer(with_body=False)

    def answer(self, with_body: bool) -> None:
        self.server.requests.put((self.command, self.path, dict(self.headers)))
        status, body = ROUTES.get(self.path, (404, b"not found"))
        self.send_response(status)
        if status == 301:
            self.send_header("Location", "/health")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class HealthServer(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # the checks of a test connect all at once
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a kept check connection is closed with a reset: not an error worth a traceback


@pytest.fixture
def http_server():
    server = HealthServer(("127.0.0.1", 0), HealthHandler)
    server.requests = queue.Queue()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=HANDLER_TIMEOUT)


def http_spec(path: str, **settings) -> CheckSpec:
    return CheckSpec(type="http", path=path, **settings)


def test_http_status_ranges(http_server):
    address = Address("127.0.0.1", http_server.server_address[1])
    results = run_checks(
        [
            (address, http_spec("/health"), None),
            (address, http_spec("/bad"), None),
            (address, http_spec("/moved"), None),
            (address, http_spec("/moved", expect_status=((200, 299),)), None),
            (address, http_spec("/bad", expect_status=((200, 204), (500, 503))), None),
            (address, http_spec("/missing"), None),
        ]
    )
    assert [(r.ok, r.reason) for r in results] == [
        (True, "HTTP 200"),
        (False, "HTTP 500"),
        (True, "HTTP 301"),
        (False, "HTTP 301"),
        (True, "HTTP 500"),
        (False, "HTTP 404"),
    ]


def test_http_body_substring_and_regex(http_server):
    address = Address("127.0.0.1", http_server.server_address[1])
    results = run_checks(
        [
            (address, http_spec("/status", expect_body='"db": "up"'), None),
            (address, http_spec("/status", expect_body='"db": "down"'), None),
            (address, http_spec("/status", expect_body_regex=r'"version": "4\.\d+'), None),
            (address, http_spec("/status", expect_body_regex=r'"version": "5\.'), None),
            (address, http_spec("/status", expect_body="cache", expect_body_regex="^x"), None),
            # Only the first 64 KiB of a body are read: the needle is past them.
            (address, http_spec("/big", expect_body="needle"), None),
            (address, http_spec("/big", expect_body="xxx"), None),
            # A status outside the ranges fails whatever the body says.
            (address, http_spec("/bad", expect_body="broken"), None),
        ]
    )
    assert [(r.ok, r.reason) for r in results] == [
        (True, "HTTP 200"),
        (False, "HTTP 200, body does not match"),
        (True, "HTTP 200"),
        (False, "HTTP 200, body does not match"),
        (False, "HTTP 200, body does not match"),
        (False, "HTTP 200, body does not match"),
        (True, "HTTP 200"),
        (False, "HTTP 500"),
    ]


def test_http_request_line_and_headers(http_server):
    port = http_server.server_address[1]
    address = Address("127.0.0.1", port)
    assert check_one(address, http_spec("/health")).ok
    assert check_one(address, http_spec("/health", method="HEAD", host="app.example")).ok
    first = http_server.requests.get(timeout=HANDLER_TIMEOUT)
    second = http_server.requests.get(timeout=HANDLER_TIMEOUT)
    assert first[:2] == ("GET", "/health")
    assert first[2]["Host"] == f"127.0.0.1:{port}"
    assert first[2]["User-Agent"] == "fastlb-check"
    assert "Connection" not in first[2]  # HTTP/1.1: kept open for the next check
    assert second[:2] == ("HEAD", "/health")
    assert second[2]["Host"] == "app.example"
    assert check_one(address, http_spec("/health", reuse_connection=False)).ok
    assert http_server.requests.get(timeout=HANDLER_TIMEOUT)[2]["Connection"] == "close"


def test_each_check_of_a_backend_follows_its_latest_spec_and_address(http_server):
    selector = selectors.DefaultSelector()
    results: dict[int, CheckResult] = {}
    checker = Checker(selector, results.__setitem__)
    port = http_server.server_address[1]
    checks = [
        (Address("127.0.0.1", port), http_spec("/health")),
        (Address("127.0.0.1", port), http_spec("/bad")),
        (Address("127.0.0.1", port), http_spec("/health", host="app.example")),
        (Address("127.0.0.2", port), http_spec("/health")),  # nothing listens there
    ]
    reasons = []
    for address, spec in checks:
        results.clear()
        checker.check(7, address, spec)
        drive(checker, selector, results, 1)
        reasons.append(results[7].reason)
    assert reasons == ["HTTP 200", "HTTP 500", "HTTP 200", "refused"]
    hosts = [http_server.requests.get(timeout=HANDLER_TIMEOUT)[2]["Host"] for _ in range(3)]
    assert hosts == [f"127.0.0.1:{port}", f"127.0.0.1:{port}", "app.example"]
    selector.close()


def test_http_over_ipv6_names_the_bracketed_address(serve):
    def reads_the_request(conn, server):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(4096)
        server.seen.put(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    try:
        server = serve(reads_the_request, host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    result = check_one(server.address, http_spec("/"))
    assert (result.ok, result.reason) == (True, "HTTP 200")
    request = server.seen.get(timeout=HANDLER_TIMEOUT)
    assert f"\r\nhost: [::1]:{server.address.port}\r\n".encode() in request.lower(), request


def test_http_fails_on_a_closed_connection_a_timeout_and_garbage(serve):
    closing = serve(closes_after_reading)
    silent = serve(never_answers)
    garbage = serve(answers(b"SSH-2.0-OpenSSH_9.2\r\n"))
    truncated = serve(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    spec = http_spec("/", timeout=0.3)
    results = run_checks(
        [
            (closing.address, spec, None),
            (silent.address, spec, None),
            (garbage.address, spec, None),
            (truncated.address, http_spec("/", expect_body="abcdef"), None),
        ]
    )
    assert (results[0].ok, results[0].reason) == (False, "closed before reply")
    assert (results[1].ok, results[1].reason) == (False, "timeout")
    assert 0.3 <= results[1].duration < 2.0
    assert not results[2].ok and results[2].reason.startswith("bad HTTP reply")
    assert not results[3].ok and results[3].reason.startswith("bad HTTP reply")


def test_http_passes_after_an_informational_response_and_over_http_1_0(serve):
    continued = serve(answers(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"))
    old = serve(answers(b"HTTP/1.0 200 OK\r\n\r\nall good"))
    results = run_checks(
        [
            (continued.address, http_spec("/"), None),
            (old.address, http_spec("/", expect_body="good"), None),
        ]
    )
    assert [(r.ok, r.reason) for r in results] == [(True, "HTTP 200"), (True, "HTTP 200")]


def checks_in_turn(address: Address, specs: list[CheckSpec], between=None) -> list[CheckResult]:
    """Checks of one backend (one key) one after the other, as the supervisor makes them;
    ``between(n)`` runs before the n-th check after the first."""
    selector = selectors.DefaultSelector()
    results: dict[int, CheckResult] = {}
    done: list[CheckResult] = []
    checker = Checker(selector, results.__setitem__)
    for n, spec in enumerate(specs):
        if n and between is not None:
            between(n)
        checker.check(0, address, spec)
        drive(checker, selector, results, 1)
        done.append(results.pop(0))
    assert not checker.pending
    checker.close()
    assert not selector.get_map()
    selector.close()
    return done


OK_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
NO_ANSWER = None


def keeps_alive(*answers: bytes | None):
    """A handler answering the requests of one connection in turn (``NO_ANSWER``: it reads and
    never answers), then closing; it reports "connection" when it starts and "closed" once it
    has closed."""

    def handler(conn, server):
        server.seen.put("connection")
        try:
            for answer in answers:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                if answer is NO_ANSWER:
                    never_answers(conn, server)
                    return
                conn.sendall(answer)
        finally:
            conn.close()
            server.seen.put("closed")

    return handler


def seen_all(server: ScriptedServer) -> list:
    seen = []
    while not server.seen.empty():
        seen.append(server.seen.get())
    return seen


def test_http_checks_reuse_a_connection_the_server_keeps(serve):
    server = serve(keeps_alive(OK_KEEP_ALIVE, OK_KEEP_ALIVE, OK_KEEP_ALIVE))
    results = checks_in_turn(server.address, [http_spec("/")] * 3)
    assert [(r.ok, r.reason) for r in results] == [(True, "HTTP 200")] * 3
    assert server.seen.get(timeout=HANDLER_TIMEOUT) == "connection"
    assert server.seen.get(timeout=HANDLER_TIMEOUT) == "closed"  # by the checker's close()
    assert seen_all(server) == []  # one connection for the three checks


def test_a_kept_connection_the_server_closed_is_retried_on_a_new_one(serve):
    # The server closes after its first answer without saying so (a keep-alive timeout); the
    # second check is sent on the kept connection before its end is read, gets nothing back,
    # and is made again on a new connection, which passes.
    server = serve(keeps_alive(OK_KEEP_ALIVE))

    def wait_for_close(n):
        assert server.seen.get(timeout=HANDLER_TIMEOUT) == "connection"
        assert server.seen.get(timeout=HANDLER_TIMEOUT) == "closed"

    results = checks_in_turn(server.address, [http_spec("/")] * 2, wait_for_close)
    assert [(r.ok, r.reason) for r in results] == [(True, "HTTP 200")] * 2
    assert server.seen.get(timeout=HANDLER_TIMEOUT) == "connection"


def test_a_kept_connection_is_not_retried_when_its_backend_answers_badly_or_hangs(serve):
    failing = serve(keeps_alive(OK_KEEP_ALIVE, b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"))
    hung = serve(keeps_alive(OK_KEEP_ALIVE, NO_ANSWER))
    spec = http_spec("/", timeout=0.3)
    first, second = checks_in_turn(failing.address, [spec, spec])
    assert (first.ok, second.ok, second.reason) == (True, False, "HTTP 503")
    first, second = checks_in_turn(hung.address, [spec, spec])
    assert (first.ok, second.ok, second.reason) == (True, False, "timeout")
    assert 0.3 <= second.duration < 2.0
    for server in (failing, hung):
        assert server.seen.get(timeout=HANDLER_TIMEOUT) == "connection"
        assert server.seen.get(timeout=HANDLER_TIMEOUT) == "closed"
        assert seen_all(server) == []  # no second connection


def test_a_reply_that_asks_to_close_or_is_still_coming_is_not_kept(serve):
    closing = serve(
        keeps_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    )

    def body_still_coming(conn, server):
        server.seen.put("connection")
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        never_answers(conn, server)

    slow = serve(body_still_coming)
    for server in (closing, slow):
        results = checks_in_turn(server.address, [http_spec("/")] * 2)
        assert [(r.ok, r.reason) for r in results] == [(True, "HTTP 200")] * 2
    assert [closing.seen.get(timeout=HANDLER_TIMEOUT) for _ in range(4)].count("connection") == 2
    assert [slow.seen.get(timeout=HANDLER_TIMEOUT) for _ in range(2)] == ["connection"] * 2


# ---- send-expect --------------------------------------------------------------------------------


def test_send_expect_against_an_echo_server(serve):
    echo = serve(echoes)
    binary = bytes.fromhex("00ff10e0c0ffee")

    def spec(**settings):
        return CheckSpec(type="send-expect", timeout=0.5, **settings)

    results = run_checks(
        [
            (echo.address, spec(send=b"HELLO fastlb\r\n", expect=b"fastlb"), None),
            (echo.address, spec(send=binary, expect=bytes.fromhex("c0ffee")), None),
            (echo.address, spec(send=b"id=4711\n", expect_regex=r"id=\d{4}\n"), None),
            (echo.address, spec(send=binary, expect_regex=r"\x10[\xe0-\xef]"), None),
            (echo.address, spec(send=b"hello", expect=b"bye"), None),
            (echo.address, spec(send=b"ping"), None),
            (echo.address, spec(send=b"abc", expect=b"abc", expect_regex="c$"), None),
        ]
    )
    assert [r.ok for r in results] == [True, True, True, True, False, True, True]
    assert results[0].reason == "reply matches"
    assert results[4].reason == "timeout"
    assert results[5].reason == "sent"


def test_send_expect_fails_when_the_reply_ends_without_a_match(serve):
    banner = serve(replies(b"220 mail.example ESMTP\r\n"))
    spec = CheckSpec(type="send-expect", expect=b"220 ")
    wrong = CheckSpec(type="send-expect", expect=b"+OK")
    ok, fail = run_checks([(banner.address, spec, None), (banner.address, wrong, None)])
    assert ok.ok
    assert (fail.ok, fail.reason) == (False, "closed after 24 bytes, no match")


# ---- agent --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "ok", "state", "weight"),
    [
        ("up 75%", True, "up", 75),
        ("drain", True, "drain", None),
        ("down", False, "down", None),
        ("maint", True, "maint", None),
        ("ready,50%", True, "ready", 50),
        ("UP\t100%", True, "up", 100),
        ("stopped#disk full", False, "down", None),
        ("failed, 10%", False, "down", 10),
        ("fail", False, "down", None),
        ("25%", True, None, 25),
        ("256%", True, None, 256),
        ("maxconn:30 up", True, "up", None),
        ("drain up", True, "up", None),
        ("hello", False, None, None),
        ("300%", False, None, None),
    ],
)
def test_agent_reply_words(line, ok, state, weight):
    result = parse_agent_reply(line)
    assert (result.ok, result.agent_state, result.agent_weight) == (ok, state, weight)


def test_agent_checks_read_one_line(serve):
    lines = [b"up 75%\n", b"drain\n", b"down\n", b"maint\r\n", b"ready,50%\n", b"up", b""]
    servers = [serve(replies(line)) for line in lines]
    results = run_checks([(s.address, CheckSpec(type="agent"), None) for s in servers])
    assert [(r.ok, r.agent_state, r.agent_weight) for r in results] == [
        (True, "up", 75),
        (True, "drain", None),
        (False, "down", None),
        (True, "maint", None),
        (True, "ready", 50),
        (True, "up", None),  # the end of the stream ends the line too
        (False, None, None),
    ]
    assert results[1].reason == "agent: drain"
    assert results[-1].reason == "agent: empty reply"


def test_agent_sends_first_and_uses_the_check_port(serve):
    def answers_what_is_asked(conn, server):
        question = conn.recv(4096)
        conn.sendall(b"up 40%\n" if question == b"status\n" else b"down\n")

    agent = serve(answers_what_is_asked)
    spec = CheckSpec(type="agent", port=agent.address.port, send=b"status\n")
    result = check_one(refused_address(), spec)
    assert (result.ok, result.agent_state, result.agent_weight) == (True, "up", 40)
    assert result.reason == "agent: up 40%"


# ---- mysql (fake servers written from the protocol's description) ----------------------------


def mysql_packet(payload: bytes, sequence: int = 0) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([sequence]) + payload


def mysql_greeting(version: bytes) -> bytes:
    """A HandshakeV10 packet, field by field."""
    capabilities = 0xF7FF | (0x81BF << 16)
    payload = (
        bytes([10])  # protocol version
        + version
        + b"\0"
        + struct.pack("<I", 42)  # connection id
        + b"abcdefgh"  # auth-plugin-data, first 8 bytes
        + b"\0"  # filler
        + struct.pack("<H", capabilities & 0xFFFF)
        + bytes([255])  # character set: utf8mb4_0900_ai_ci
        + struct.pack("<H", 0x0002)  # status: autocommit
        + struct.pack("<H", capabilities >> 16)
        + bytes([21])  # length of auth-plugin-data
        + b"\0" * 10  # reserved
        + b"ijklmnopqrst\0"  # auth-plugin-data, the rest
        + b"caching_sha2_password\0"
    )
    return mysql_packet(payload)


def mysql_error(code: int, message: bytes) -> bytes:
    return mysql_packet(b"\xff" + struct.pack("<H", code) + message)


def test_mysql_greeting_and_error_packets(serve):
    def greets_in_pieces(conn, server):
        greeting = mysql_greeting(b"8.0.36")
        conn.sendall(greeting[:3])
        conn.sendall(greeting[3:])
        conn.recv(1)  # holds the connection open until the checker closes it

    servers = [
        serve(greets_in_pieces),
        serve(replies(mysql_greeting(b"10.11.6-MariaDB-0+deb12u1"))),
        serve(replies(mysql_error(1129, b"Host '127.0.0.1' is blocked because of many errors"))),
        serve(replies(mysql_error(1040, b"#08004Too many connections"))),
        serve(close_at_once),
        serve(replies(mysql_packet(b"\x09" + b"4.0\0", 0))),
        serve(replies(mysql_packet(b"\x0a5.7\0", 1))),
    ]
    results = run_checks([(s.address, CheckSpec(type="mysql"), None) for s in servers])
    assert [(r.ok, r.reason) for r in results] == [
        (True, "mysql 8.0.36"),
        (True, "mysql 10.11.6-MariaDB-0+deb12u1"),
        (False, "mysql error 1129: Host '127.0.0.1' is blocked because of many errors"),
        (False, "mysql error 1040: Too many connections"),
        (False, "no greeting"),
        (False, "mysql: unsupported protocol 9"),
        (False, "mysql: bad greeting"),
    ]


# ---- tls ----------------------------------------------------------------------------------------


def test_tls_handshake_with_openssl_s_server(peers, serve):
    server = peers.tls_server("backend")
    echo = serve(echoes)
    closing = serve(closes_after_reading)
    spec = CheckSpec(type="tls")
    results = run_checks(
        [
            (Address("127.0.0.1", server.port), spec, None),
            (echo.address, CheckSpec(type="tls", timeout=0.5), None),
            (closing.address, spec, None),
        ]
    )
    assert results[0].ok and results[0].reason.startswith("TLSv1."), results[0]
    assert not results[1].ok and results[1].reason.startswith("tls: "), results[1]
    assert (results[2].ok, results[2].reason) == (False, "closed during handshake")


class SniServer(PeerProcess):
    """``openssl s_server`` that ends, with a fatal alert, a handshake naming another server
    than ``name``."""

    def __init__(self, workdir: Path, name: str):
        program = require("openssl", "openssl")
        cert, key = self_signed_certificate(workdir, name)
        other_cert, other_key = self_signed_certificate(workdir, "default")
        self.port = free_port()
        argv = [program, "s_server", "-accept", f"127.0.0.1:{self.port}", "-www"]
        argv += ["-cert", str(other_cert), "-key", str(other_key)]
        argv += ["-cert2", str(cert), "-key2", str(key), "-servername", name, "-servername_fatal"]
        super().__init__("s_server-sni", argv, workdir)
        self.wait_ready()

    def ready(self) -> bool:
        return accepts("127.0.0.1", self.port)


def test_tls_sends_the_configured_server_name(tmp_path, request):
    server = SniServer(tmp_path, "app.example")
    request.node.peer_processes = [server]
    try:
        address = Address("127.0.0.1", server.port)
        right, wrong = run_checks(
            [
                (address, CheckSpec(type="tls", sni="app.example"), None),
                (address, CheckSpec(type="tls", sni="other.example"), None),
            ]
        )
    finally:
        server.stop()
    assert right.ok, right
    assert not wrong.ok and wrong.reason == "tls: TLSV1_UNRECOGNIZED_NAME", wrong


def test_tls_client_hello_follows_the_proxy_header(serve):
    def reads_the_hello(conn, server):
        data = b""
        while b"app.example" not in data and (chunk := conn.recv(4096)):
            data += chunk
        server.seen.put(data)

    server = serve(reads_the_hello)
    result = check_one(server.address, CheckSpec(type="tls", sni="app.example"), "v1")
    assert not result.ok  # the server closed without an answer
    seen = server.seen.get(timeout=HANDLER_TIMEOUT)
    header = LOCAL_HEADERS["v1"]
    assert seen.startswith(header + b"\x16\x03")  # a TLS handshake record after the header
    assert b"app.example" in seen[len(header) :]


# ---- redis --------------------------------------------------------------------------------------


@pytest.fixture
def redis_servers(tmp_path, request):
    """``start(password=None)``: a ``redis-server`` of its own, stopped at teardown."""
    started = []
    request.node.peer_processes = started

    def start(password: str | None = None) -> RedisServer:
        started.append(RedisServer(tmp_path, password))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_redis_ping_and_auth(redis_servers):
    open_server = redis_servers()
    locked = redis_servers(password="s3cret")

    def spec(**settings):
        return CheckSpec(type="redis", **settings)

    results = run_checks(
        [
            (open_server.address, spec(), None),
            (locked.address, spec(password="s3cret"), None),
            (locked.address, spec(username="default", password="s3cret"), None),
            (locked.address, spec(password="wrong"), None),
            (locked.address, spec(), None),
        ]
    )
    assert [(r.ok, r.reason) for r in results[:3]] == [(True, "+PONG")] * 3
    assert not results[3].ok and results[3].reason.startswith("-WRONGPASS"), results[3]
    assert not results[4].ok and results[4].reason.startswith("-NOAUTH"), results[4]


def test_redis_stopped_times_out_and_gone_is_refused(redis_servers):
    server = redis_servers()
    spec = CheckSpec(type="redis", timeout=0.3)
    assert check_one(server.address, spec).ok
    os.kill(server.pid, signal.SIGSTOP)  # the kernel still accepts; nothing answers
    try:
        stopped = check_one(server.address, spec)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert (stopped.ok, stopped.reason) == (False, "timeout")
    server.stop()
    gone = check_one(server.address, spec)
    assert (gone.ok, gone.reason) == (False, "refused")


# ---- postgres -----------------------------------------------------------------------------------


def postgres_programs() -> Path:
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if not found:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    return Path(max(found, key=lambda path: int(path.split("/")[4]))).parent


def as_postgres_user() -> list[str]:
    """The command prefix that runs PostgreSQL's programs: it refuses to run as root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture(scope="module")
def postgres_cluster():
    """A database cluster made by ``initdb`` (trust authentication, superuser ``fastlb``), in a
    directory of its own that ``nobody`` owns when the tests run as root."""
    programs = postgres_programs()
    workdir = Path(tempfile.mkdtemp(prefix="fastlb-postgres-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    data = workdir / "data"
    subprocess.run(
        as_postgres_user()
        + [str(programs / "initdb"), "-D", str(data), "-A", "trust", "-U", "fastlb"]
        + ["-E", "UTF8", "--locale=C"],
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=60,
    )
    yield programs, workdir, data
    shutil.rmtree(workdir)


class PostgresServer(PeerProcess):
    def __init__(self, programs: Path, workdir: Path, data: Path):
        self.programs = programs
        self.port = free_port()
        argv = as_postgres_user() + [str(programs / "postgres"), "-D", str(data)]
        argv += ["-k", str(workdir), "-h", "127.0.0.1", "-p", str(self.port), "-F"]
        super().__init__(f"postgres-{self.port}", argv, workdir)
        self.wait_ready()

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    def ready(self) -> bool:
        # Accepting is not enough: while starting up it turns clients away.
        isready = [str(self.programs / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(isready, timeout=START_TIMEOUT).returncode == 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # in case a test left it stopped
            os.kill(self.pid, signal.SIGINT)  # a fast shutdown
        super().stop()


@pytest.fixture
def postgres(postgres_cluster, request):
    server = PostgresServer(*postgres_cluster)
    request.node.peer_processes = [server]
    yield server
    server.stop()


def test_postgres_ssl_request_and_startup(postgres):
    results = run_checks(
        [
            (postgres.address, CheckSpec(type="postgres"), None),
            (postgres.address, CheckSpec(type="postgres", ssl_request=False), None),
            (postgres.address, CheckSpec(type="postgres", ssl_request=False, database="x"), None),
        ]
    )
    assert [(r.ok, r.reason) for r in results] == [
        (True, "postgres SSLRequest: N"),  # no TLS configured
        (True, "postgres: authentication ok"),
        (True, "postgres: authentication ok"),  # trust: the database is looked up afterwards
    ]


def test_postgres_stopped_times_out_and_gone_is_refused(postgres):
    spec = CheckSpec(type="postgres", ssl_request=False, timeout=0.3)
    os.kill(postgres.pid, signal.SIGSTOP)
    try:
        stopped = check_one(postgres.address, spec)
    finally:
        os.kill(postgres.pid, signal.SIGCONT)
    assert (stopped.ok, stopped.reason) == (False, "timeout")
    postgres.stop()
    gone = check_one(postgres.address, spec)
    assert (gone.ok, gone.reason) == (False, "refused")


def postgres_error(sqlstate: str, message: str) -> bytes:
    fields = b"SFATAL\0C%s\0M%s\0\0" % (sqlstate.encode(), message.encode())
    return b"E" + struct.pack("!I", 4 + len(fields)) + fields


def test_postgres_error_responses(serve):
    """What a server says before authentication: the errors of a server that turns clients
    away fail; the others mean it is up and speaking the protocol."""
    servers = [
        serve(answers(postgres_error("57P03", "the database system is starting up"))),
        serve(answers(postgres_error("53300", "sorry, too many clients already"))),
        serve(answers(postgres_error("28000", 'no pg_hba.conf entry for host "127.0.0.1"'))),
        serve(answers(b"R\0\0\0\x0c\0\0\0\x05salt")),  # MD5 password request
        serve(answers(b"HTTP/1.1 400 Bad Request\r\n\r\n")),
        serve(answers(b"S")),
    ]
    startup = CheckSpec(type="postgres", ssl_request=False)
    results = run_checks([(s.address, startup, None) for s in servers[:5]])
    results.append(check_one(servers[5].address, CheckSpec(type="postgres")))
    assert [(r.ok, r.reason) for r in results] == [
        (False, "postgres error: the database system is starting up (57P03)"),
        (False, "postgres error: sorry, too many clients already (53300)"),
        (True, 'postgres error: no pg_hba.conf entry for host "127.0.0.1" (28000)'),
        (True, "postgres: authentication request"),
        (False, "postgres: unexpected message b'H'"),
        (True, "postgres SSLRequest: S"),
    ]


# ---- the checker itself -------------------------------------------------------------------------

ASYNC_HTTP_SERVERS = r"""
import asyncio, sys

async def answer(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main(count):
    servers = [
        await asyncio.start_server(answer, "127.0.0.1", 0, backlog=4096) for _ in range(count)
    ]
    print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_thousand_checks_at_once_end_and_leave_no_descriptor_behind():
    server = subprocess.Popen(
        [sys.executable, "-c", ASYNC_HTTP_SERVERS, "4"], stdout=subprocess.PIPE, text=True
    )
    try:
        ports = [int(port) for port in server.stdout.readline().split()]
        assert len(ports) == 4, "the HTTP servers did not start"
        before = open_fds()
        tcp, http = CheckSpec(timeout=10.0), CheckSpec(type="http", timeout=10.0)
        checks = [
            (Address("127.0.0.1", ports[key % 4]), tcp if key % 2 else http, None)
            for key in range(1000)
        ]
        results = run_checks(checks)
        assert open_fds() == before
    finally:
        server.kill()
        server.wait(timeout=START_TIMEOUT)
    failures = [r for r in results if not r.ok]
    assert not failures, failures[:5]
    assert {r.reason for r in results} == {"connected", "HTTP 200"}


def test_cancel_close_and_a_new_check_of_a_busy_key(serve):
    silent = serve(never_answers)
    selector = selectors.DefaultSelector()
    results = []
    checker = Checker(selector, lambda key, result: results.append((key, result)))
    spec = CheckSpec(type="http", timeout=5.0)
    checker.check(1, silent.address, spec)
    checker.check(2, silent.address, spec)
    assert checker.busy(1) and checker.busy(2) and not checker.busy(3)
    replaced = checker.pending[1].sock
    # Replaces the one in flight; a tcp check may end at once (connected by the time connect()
    # returns), so only its result tells that it ran.
    checker.check(1, silent.address, CheckSpec(timeout=5.0))
    assert replaced.fileno() == -1 and checker.busy(2)
    cancelled = checker.pending[2].sock
    checker.cancel(2)
    assert cancelled.fileno() == -1 and not checker.busy(2)
    give_up = time.monotonic() + LOOP_BOUND
    while not results:
        assert time.monotonic() < give_up
        for key, mask in selector.select(give_up - time.monotonic()):
            key.data(mask)
    assert [(key, result.reason) for key, result in results] == [(1, "connected")]
    checker.check(3, silent.address, spec)
    closed = checker.pending[3].sock
    checker.close()
    assert closed.fileno() == -1 and not checker.pending and not selector.get_map()
    assert checker.next_deadline() is None
    checker.expire(time.monotonic() + 60)
    assert len(results) == 1  # cancelled and closed checks report nothing
    selector.close()


def test_close_after_fork_closes_the_sockets_and_leaves_the_selector(serve):
    silent = serve(never_answers)
    selector = selectors.DefaultSelector()
    checker = Checker(selector, lambda key, result: None)
    checker.check(1, silent.address, CheckSpec(type="http", timeout=5.0))
    sock = checker.pending[1].sock
    checker.close_after_fork()
    assert sock.fileno() == -1 and not checker.pending and checker.next_deadline() is None
    assert len(selector.get_map()) == 1  # the supervisor's copy of the selector is not ours
    selector.close()


def test_a_setting_the_configuration_should_have_refused_fails_the_check():
    results = run_checks(
        [
            (Address("127.0.0.1", 9), CheckSpec(type="http", path="/a b"), None),
            (Address("127.0.0.1", 9), CheckSpec(type="gopher"), None),
        ]
    )
    assert not results[0].ok and results[0].reason.startswith("invalid HTTP request")
    assert (results[1].ok, results[1].reason) == (False, "unknown check type 'gopher'")


def test_a_stopped_postgres_is_marked_down_by_fastlb(postgres, configured, backends):
    # Through the real balancer: the postgres check of a pool, one server stopped.
    spare = backends("name", name="spare")
    stats, front = free_ports(2)
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.db]
        listen = ["127.0.0.1:{front}"]
        pool = "db"
        [pool.db]
        backend = ["{postgres.address}", "{spare.address}"]
        [pool.db.check]
        type = "postgres"
        interval = "200ms"
        timeout = "300ms"
        fall = 2
    """)
    address = str(postgres.address)
    lb.wait_for(lambda s: lb.backend(address, s)["history"]["last_check"] is not None)
    assert lb.backend(address)["history"]["last_check"]["ok"] is True
    postgres.proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        lb.wait_for(lambda s: not lb.backend(address, s)["up"], what="postgres down")
        assert time.monotonic() - stopped <= 0.2 * 2 + 0.3 + 1.0 + 0.5
        assert lb.backend(address)["history"]["last_check"]["reason"] == "timeout"
    finally:
        postgres.proc.send_signal(signal.SIGCONT)


def test_a_dns_query_asks_for_the_a_records_of_its_name():
    query = probes.dns_query("who.example.test.", 0x1234)
    assert query[:12] == bytes.fromhex("1234 0100 0001 0000 0000 0000")
    assert query[12:] == b"\x03who\x07example\x04test\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("flags", "expect", "verdict"),
    [
        (0x8180, "NOERROR", (True, "DNS NOERROR")),
        (0x8183, "NOERROR", (False, "DNS NXDOMAIN")),
        (0x8183, "NXDOMAIN", (True, "DNS NXDOMAIN")),
        (0x818B, "NOERROR", (False, "DNS rcode 11")),
    ],
)
def test_a_dns_check_judges_the_answers_rcode(flags, expect, verdict):
    conversation = probes.DnsQuery(CheckSpec(type="dns", query="example.test", rcode=expect))
    ident = int.from_bytes(conversation.opening()[:2])
    assert conversation.feed(ident.to_bytes(2) + flags.to_bytes(2) + bytes(8))[:2] == verdict


def test_a_dns_check_waits_past_answers_to_other_queries():
    conversation = probes.DnsQuery(CheckSpec(type="dns", query="example.test"))
    other = (int.from_bytes(conversation.opening()[:2]) ^ 1).to_bytes(2)
    assert conversation.feed(other + b"\x81\x80" + bytes(8)) is None
    assert not conversation.feed(b"\x00").ok  # too short for a DNS header
