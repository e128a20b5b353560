"""The backends of ``fastlb demo``: small HTTP servers on loopback that say who they are.

Each backend is a child process that answers any request with its name, ``hello from
backend-1``, over HTTP/1.1 with Content-Length, so keep-alive works. Its listening socket is
bound by the parent before it forks (no race for a port), and it watches a pipe from the parent:
if the parent dies, even by SIGKILL, the pipe reads EOF and the backend exits.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DemoBackend:
    def __init__(self, name: str):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        host, port = self.sock.getsockname()
        self.address = f"{host}:{port}"
        self.pid: int | None = None
        self.lifeline: int | None = None  # write end of the pipe the child watches


def bind_backends(count: int) -> list[DemoBackend]:
    return [DemoBackend(f"backend-{i}") for i in range(1, count + 1)]


def start_backends(backends: list[DemoBackend]) -> None:
    """Forks one process per backend."""
    for backend in backends:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(write_end)
                for other in backends:
                    if other is not backend:
                        other.sock.close()
                        if other.lifeline is not None:
                            os.close(other.lifeline)
                serve(backend.sock, backend.name, read_end)
            finally:
                os._exit(0)
        os.close(read_end)
        # Only the child may hold the socket: if it dies, clients are refused, not queued.
        backend.sock.close()
        backend.pid = pid
        backend.lifeline = write_end


def stop_backends(backends: list[DemoBackend]) -> None:
    """Stops the backend processes by PID and waits for them."""
    for backend in backends:
        if backend.pid is not None:
            try:
                os.kill(backend.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for backend in backends:
        if backend.pid is not None:
            try:
                os.waitpid(backend.pid, 0)
            except ChildProcessError:
                pass
            backend.pid = None
        if backend.lifeline is not None:
            os.close(backend.lifeline)
            backend.lifeline = None
        backend.sock.close()


class NameHandler(BaseHTTPRequestHandler):
    """Answers every request with the server's name."""

    protocol_version = "HTTP/1.1"
    server_version = "fastlb-demo"
    # Nagle's algorithm would hold a second small write until the first is acknowledged, which
    # a delayed ACK puts off by 40 ms. So: TCP_NODELAY, and the answer in one send: headers and
    # body collect in a buffered wfile that handle_one_request flushes once it has answered.
    disable_nagle_algorithm = True
    wbufsize = 16 * 1024

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)
        body = f"hello from {self.server.name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = answer

    def log_message(self, format, *args) -> None:
        pass  # the balancer's log is the interesting one


def serve(sock: socket.socket, name: str, lifeline: int) -> None:
    """Serves HTTP on ``sock`` until killed or until ``lifeline`` reads EOF. In the child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent: it stops us
    server = ThreadingHTTPServer(sock.getsockname(), NameHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    server.name = name

    def exit_with_parent() -> None:
        os.read(lifeline, 1)  # returns at EOF: the parent is gone
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    server.serve_forever()


def instructions(url: str, stats_url: str, workers: int) -> str:
    return (
        f"fastlb demo: 3 backends behind {url} (roundrobin, {workers} workers)\n"
        "\n"
        f"  curl {url}\n"
        "      run it a few times: the backends take turns (fastlb balances connections, so\n"
        "      requests on one keep-alive connection all go to the same backend)\n"
        f"  curl {stats_url}\n"
        "      what the balancer knows (JSON); /metrics has the same for Prometheus\n"
        "\n"
        "Press Ctrl-C to stop.\n"
    )
