"""Local backends for the load tests.

HTTP backends answer ``GET /`` with a short body that names the backend (``backend 1``) and
``GET /1m`` with 1 MiB, over keep-alive connections unless the request says ``Connection: close``.
nginx serves them when it is installed: one worker process listening on every backend port, fast
enough not to be the bottleneck in front of a C-speed proxy. Without nginx a Python asyncio server
takes its place (slower: the benchmark says so). nginx also serves two other kinds: ``proxy``
expects a PROXY header (v1 or v2) first on every connection and answers ``GET /`` with the client
address the header gave, and ``tls`` speaks HTTPS with a self-signed certificate made at start,
with neither session cache nor tickets, so that every connection is a full handshake.

The hold backend accepts connections, sends each one byte (so that a client that reads it knows
the connection reaches the backend) and keeps them open; the memory benchmark uses it.

Run alone::

    python loadtests/backend.py http --count 3        # prints the ports, serves until Ctrl-C
    python loadtests/backend.py hold --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import (
    HERE,
    LOOPBACK,
    HarnessError,
    Processes,
    free_port,
    free_ports,
    raise_nofile_limit,
    run_script,
    wait_for_port,
)

BULK_PATH = "/1m"
BULK_SIZE = 1 << 20
HOLD_GREETING = b"!"


def small_body(index: int) -> bytes:
    return f"backend {index}\n".encode()


@dataclass
class Backends:
    kind: str  # "nginx" or "python"
    ports: list[int]
    pids: list[int]


# What each kind of nginx backend adds to its listen lines, and the body of ``GET /``: the PROXY
# kind names the client address it was given, so a check can tell that the header went through.
LISTEN_OPTIONS = {"plain": "", "proxy": " proxy_protocol", "tls": " ssl"}
TLS_NAMES = ("bench.example.test", "*.example.test")  # the names the TLS backends' certificate has


def proxy_body(index: int, client: str) -> bytes:
    return f"backend {index} client {client}\n".encode()


def nginx_body(index: int, kind: str) -> str:
    if kind == "proxy":
        return proxy_body(index, "$proxy_protocol_addr:$proxy_protocol_port").decode().strip()
    return small_body(index).decode().strip()


def nginx_http_config(
    ports: list[int], prefix: Path, docroot: Path, kind: str = "plain", workers: int = 1
) -> str:
    servers = "\n".join(
        f"""\
    server {{
        listen {LOOPBACK}:{port}{LISTEN_OPTIONS[kind]} backlog=4096;
        root {docroot};
        location = / {{ return 200 "{nginx_body(i, kind)}\\n"; }}
    }}"""
        for i, port in enumerate(ports, 1)
    )
    # Neither session cache nor tickets: every TLS connection is a full handshake.
    tls = f"""\
    ssl_certificate {prefix}/cert.pem;
    ssl_certificate_key {prefix}/key.pem;
    ssl_session_cache off;
    ssl_session_tickets off;
"""
    return f"""\
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 16384;
}}

http {{
    default_type text/plain;
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{tls if kind == "tls" else ""}{servers}
}}
"""


def make_certificate(directory: Path) -> None:
    """A self-signed ECDSA P-256 certificate for :data:`TLS_NAMES`: cert.pem and key.pem."""
    names = ",".join(f"DNS:{name}" for name in TLS_NAMES)
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    cmd += ["-nodes", "-days", "2", "-subj", f"/CN={TLS_NAMES[0]}"]
    cmd += ["-addext", f"subjectAltName={names}"]
    cmd += ["-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise HarnessError(f"openssl req failed ({done.returncode}): {done.stderr.strip()}")


def start_nginx_backends(
    procs: Processes, count: int, tmp: Path, kind: str = "plain", workers: int = 1
) -> Backends:
    """``kind`` is ``plain`` (HTTP), ``proxy`` (HTTP after a PROXY header) or ``tls`` (HTTPS)."""
    suffix = "" if kind == "plain" else f"-{kind}"
    prefix = tmp / f"nginx-backend{suffix}"
    docroot = prefix / "www"
    docroot.mkdir(parents=True)
    (docroot / BULK_PATH.lstrip("/")).write_bytes(b"x" * BULK_SIZE)
    # nginx started by root runs its worker as nobody, which must read the document root.
    for path in (tmp, prefix, docroot):
        path.chmod(0o755)
    (docroot / BULK_PATH.lstrip("/")).chmod(0o644)
    if kind == "tls":
        make_certificate(prefix)
    ports = free_ports(count)
    config = prefix / "nginx.conf"
    config.write_text(nginx_http_config(ports, prefix, docroot, kind, workers))
    cmd = ["nginx", "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
    proc = procs.start(f"backend-nginx{suffix}", [*cmd, "-g", "daemon off;"])
    for port in ports:
        wait_for_port(port, proc)
    return Backends("nginx", ports, [proc.pid])


def start_python_backends(procs: Processes, count: int) -> Backends:
    ports = free_ports(count)
    cmd = [sys.executable, str(HERE / "backend.py"), "python-http"]
    for port in ports:
        cmd += ["--port", str(port)]
    proc = procs.start("backend-python", cmd)
    for port in ports:
        wait_for_port(port, proc)
    return Backends("python", ports, [proc.pid])


def start_http_backends(procs: Processes, count: int, tmp: Path, kind: str = "auto") -> Backends:
    """Start ``count`` HTTP backends: nginx if installed (or ``kind`` says so), else Python."""
    if kind == "nginx" or (kind == "auto" and shutil.which("nginx")):
        return start_nginx_backends(procs, count, tmp)
    return start_python_backends(procs, count)


def start_hold_backend(procs: Processes) -> tuple[int, int]:
    """Start the hold backend; return its port and PID."""
    port = free_port()
    proc = procs.start(
        "backend-hold", [sys.executable, str(HERE / "backend.py"), "hold", "--port", str(port)]
    )
    wait_for_port(port, proc)
    return port, proc.pid


# --- the Python servers --------------------------------------------------------------------------


def http_response(body: bytes, keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\nConnection: %s\r\n\r\n" % (len(body), connection)
    )
    return head + body


class HttpProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 for GET requests without a body: enough for wrk and locust."""

    def __init__(self, index: int, bulk: bytes):
        self.index = index
        self.bulk = bulk
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split()
            path = parts[1] if len(parts) > 1 else b"/"
            keep_alive = b"connection: close" not in headers.lower()
            body = self.bulk if path == BULK_PATH.encode() else small_body(self.index)
            self.transport.write(http_response(body, keep_alive))
            if not keep_alive:
                self.transport.close()
                return


class HoldProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(HOLD_GREETING)

    def data_received(self, data: bytes) -> None:
        pass


async def serve(factories: list[tuple[int, object]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = [
        await loop.create_server(factory, LOOPBACK, port, backlog=4096, reuse_address=True)
        for port, factory in factories
    ]
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    http = modes.add_parser("http", help="start HTTP backends and serve until Ctrl-C")
    http.add_argument("--count", type=int, default=3, help="number of backends (default 3)")
    http.add_argument("--kind", choices=["auto", "nginx", "python"], default="auto")
    python_http = modes.add_parser("python-http", help="the Python HTTP backend itself")
    python_http.add_argument("--port", type=int, action="append", required=True)
    hold = modes.add_parser("hold", help="accept connections, send one byte, hold them open")
    hold.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    raise_nofile_limit()
    if args.mode == "python-http":
        bulk = b"x" * BULK_SIZE
        factories = [
            (port, lambda i=i: HttpProtocol(i, bulk)) for i, port in enumerate(args.port, 1)
        ]
        asyncio.run(serve(factories))
    elif args.mode == "hold":
        asyncio.run(serve([(args.port, HoldProtocol)]))
    else:
        with (
            tempfile.TemporaryDirectory(prefix="fastlb-backend-") as tmp,
            Processes(Path(tmp)) as procs,
        ):
            backends = start_http_backends(procs, args.count, Path(tmp), args.kind)
            for port in backends.ports:
                print(f"{LOOPBACK}:{port}", flush=True)
            print(f"{backends.kind} backends ready; Ctrl-C stops them", file=sys.stderr)
            stop_signals = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            signal.sigwait(stop_signals)


if __name__ == "__main__":
    run_script(main)
