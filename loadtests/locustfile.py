"""Locust users that load a balancer: HTTP over keep-alive connections, and raw TCP connections.

``KeepAliveHttpUser`` sends ``GET /`` over keep-alive connections (locust's FastHttpUser).
``TcpUser`` opens a TCP connection per request, sends an HTTP request, reads the reply to the end
and closes; each such exchange is timed and reported through locust's request events, so it
appears in the statistics, the CSV files and the web UI like any other request (type ``tcp``).

Both aim at ``--host``, e.g. in front of ``fastlb demo``::

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 TcpUser    # only one kind
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from locust import FastHttpUser, User, constant, task


class KeepAliveHttpUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def index(self) -> None:
        self.client.get("/")  # a status other than 2xx/3xx counts as a failure


class BadReply(Exception):
    pass


class TcpUser(User):
    """One TCP connection per request: connect, send, read until the server closes, close."""

    wait_time = constant(0)
    name = "connect, GET /, close"

    def on_start(self) -> None:
        target = urlsplit(self.host if "://" in self.host else f"tcp://{self.host}")
        self.address = (target.hostname, target.port or 80)
        self.request_bytes = (
            f"GET / HTTP/1.1\r\nHost: {target.netloc}\r\nConnection: close\r\n\r\n".encode()
        )

    @task
    def exchange(self) -> None:
        started = time.perf_counter()
        received = bytearray()
        exception = None
        try:
            with socket.create_connection(self.address, timeout=10) as sock:
                sock.sendall(self.request_bytes)
                while chunk := sock.recv(65536):
                    received += chunk
            status_line = bytes(received).split(b"\r\n", 1)[0]
            if not status_line.startswith(b"HTTP/1.1 2"):
                raise BadReply(f"reply starts with {status_line[:60]!r}")
        except (OSError, BadReply) as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="tcp",
            name=self.name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=len(received),
            exception=exception,
            context={},
        )
