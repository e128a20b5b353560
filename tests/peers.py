"""Real peer programs around fastlb: HAProxy, nginx (stream) and ``openssl s_server``.

Each runs as its own process on a free loopback port, with its configuration and its log
(stdout and stderr together) under the test's directory; it is waited for by its port (never by
sleeping) and stopped by PID, its children too. A test that needs a program that is not installed
is skipped, naming the Debian package that provides it.

- :class:`HAProxy` takes ``frontend``/``backend`` sections made by :func:`haproxy_relay` (TCP,
  optionally sending a PROXY header to its server) and :func:`haproxy_source_reporter` (accepts a
  PROXY header and answers an HTTP request with the source address it was given).
- :class:`NginxProxyEcho` accepts a PROXY header and answers with the address it was given.
- :class:`TlsServer` is ``openssl s_server -www`` with its own self-signed certificate, so a
  client tells which server answered by the certificate it sees.
- :class:`Unbound` and :class:`Nsd` serve the zone ``example.test`` over UDP, each answering
  ``who.example.test`` with an address of its own (:data:`UNBOUND_ANSWER`,
  :data:`NSD_ANSWER`); :func:`dig` asks through anything in between.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import START_TIMEOUT, STOP_TIMEOUT, free_port, wait_until

from fastlb.model import Address

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
DNS_ZONE = "example.test"
WHO = f"who.{DNS_ZONE}"  # answered with the server's own address below
UNBOUND_ANSWER = "192.0.2.1"
NSD_ANSWER = "192.0.2.2"


def require(program: str, package: str) -> str:
    """The path of ``program``; skips the test when it is not installed."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (Debian package {package})")
    return path


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False


class PeerProcess:
    """One program started with ``argv``; ``ready()`` says when it serves."""

    def __init__(self, name: str, argv: list[str], workdir: Path, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=cwd or workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.pid = self.proc.pid
        self.descendants: dict[int, psutil.Process] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fail(self, message: str):
        raise AssertionError(f"{self.name}: {message}\ncommand: {self.argv}\nlog:\n{self.log()}")

    def ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self) -> None:
        def serving():
            if self.proc.poll() is not None:
                self.fail(f"exited with {self.proc.returncode} while starting")
            return self.ready()

        try:
            wait_until(serving, START_TIMEOUT, f"{self.name} to serve", interval=0.05)
        except AssertionError as exc:
            self.stop()
            self.fail(str(exc))
        # nginx serves from a worker it forked: remembered, so that stop() can check it left.
        for child in psutil.Process(self.pid).children(recursive=True):
            self.descendants.setdefault(child.pid, child)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        for child in self.descendants.values():
            try:
                child.wait(timeout=STOP_TIMEOUT)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.NoSuchProcess:
                pass


# ---- HAProxy ------------------------------------------------------------------------------------

HAPROXY_SEND_PROXY = {None: "", "v1": " send-proxy", "v2": " send-proxy-v2"}


def haproxy_relay(name: str, port: int, server: str, send_proxy: str | None = None) -> str:
    """TCP from 127.0.0.1:``port`` to ``server`` ("host:port"), with a PROXY header v1 or v2
    first when ``send_proxy`` says so."""
    return (
        f"frontend {name}\n"
        f"    mode tcp\n"
        f"    bind 127.0.0.1:{port}\n"
        f"    default_backend {name}_servers\n"
        f"backend {name}_servers\n"
        f"    mode tcp\n"
        f"    server s {server}{HAPROXY_SEND_PROXY[send_proxy]}\n"
    )


def haproxy_source_reporter(name: str, port: int) -> str:
    """On 127.0.0.1:``port``, a PROXY header (v1 or v2) then an HTTP request, answered with
    ``ADDRESS:PORT`` + newline: the source the header gave."""
    return (
        f"frontend {name}\n"
        f"    mode http\n"
        f"    bind 127.0.0.1:{port} accept-proxy\n"
        "    http-request return status 200 content-type text/plain"
        ' lf-string "%[src]:%[src_port]\\n"\n'
    )


class HAProxy(PeerProcess):
    """``haproxy -db -f FILE`` with the given sections, plus an HTTP frontend of its own that tells
    when it serves: a probe of the sections' ports would open connections through them."""

    def __init__(self, workdir: Path, sections: list[str], name: str = "haproxy"):
        program = require("haproxy", "haproxy")
        self.ready_port = free_port()
        self.config_path = workdir / f"{name}.cfg"
        self.config_path.write_text(
            "global\n"
            "    maxconn 4000\n"
            "defaults\n"
            "    timeout connect 5s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n"
            "frontend ready\n"
            "    mode http\n"
            f"    bind 127.0.0.1:{self.ready_port}\n"
            "    http-request return status 200\n" + "".join(sections)
        )
        super().__init__(name, [program, "-db", "-f", str(self.config_path)], workdir)
        self.wait_ready()

    def ready(self) -> bool:
        # Answered from the event loop, so every listener of the file is bound by then.
        try:
            with socket.create_connection(("127.0.0.1", self.ready_port), timeout=1.0) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return sock.recv(64).split(b" ")[1:2] == [b"200"]
        except OSError:
            return False


# ---- nginx --------------------------------------------------------------------------------------


class NginxProxyEcho(PeerProcess):
    """nginx stream on 127.0.0.1:``port``: reads a PROXY header (v1 or v2) and answers
    ``ADDRESS:PORT`` + newline, the source the header gave, then closes."""

    def __init__(self, workdir: Path, name: str = "nginx"):
        program = require("nginx", "nginx")
        if not NGINX_STREAM_MODULE.exists():
            pytest.skip(f"{NGINX_STREAM_MODULE} is missing (Debian package libnginx-mod-stream)")
        self.port = free_port()
        prefix = workdir / name
        prefix.mkdir()
        config_path = prefix / "nginx.conf"
        config_path.write_text(
            f"load_module {NGINX_STREAM_MODULE};\n"
            "worker_processes 1;\n"
            "events { worker_connections 1024; }\n"
            "stream {\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port} proxy_protocol;\n"
            '        return "$proxy_protocol_addr:$proxy_protocol_port\\n";\n'
            "    }\n"
            "}\n"
        )
        # -e: the log of startup, before the file is read, is stderr too (not /var/log/nginx).
        settings = f"daemon off; pid {prefix / 'nginx.pid'}; error_log stderr;"
        argv = [program, "-e", "stderr", "-p", str(prefix), "-c", str(config_path)]
        super().__init__(name, argv + ["-g", settings], workdir)
        self.wait_ready()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return accepts("127.0.0.1", self.port)


# ---- openssl s_server ---------------------------------------------------------------------------


def self_signed_certificate(workdir: Path, common_name: str) -> tuple[Path, Path]:
    """(certificate, key) PEM files of a new P-256 self-signed certificate for CN=common_name."""
    program = require("openssl", "openssl")
    cert, key = workdir / f"{common_name}.crt", workdir / f"{common_name}.key"
    subprocess.run(
        [program, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-nodes", "-subj", f"/CN={common_name}", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=START_TIMEOUT,
    )
    return cert, key


class TlsServer(PeerProcess):
    """``openssl s_server -www`` on 127.0.0.1:``port`` with a certificate of its own, CN=``name``;
    ``der`` is that certificate, as a client's ``getpeercert(binary_form=True)`` returns it."""

    def __init__(self, workdir: Path, name: str):
        program = require("openssl", "openssl")
        cert, key = self_signed_certificate(workdir, name)
        self.der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        self.port = free_port()
        argv = [program, "s_server", "-accept", f"127.0.0.1:{self.port}"]
        argv += ["-cert", str(cert), "-key", str(key), "-www"]
        super().__init__(f"s_server-{name}", argv, workdir)
        self.wait_ready()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return accepts("127.0.0.1", self.port)


# ---- DNS servers ---------------------------------------------------------------------------------


def dig(port: int, name: str = WHO, source_port: int | None = None, host: str = "127.0.0.1"):
    """The A records of ``name`` that ``dig`` gets over UDP from host:port (one try, 2 s), or
    None without an answer; ``source_port`` fixes the client's port."""
    argv = [require("dig", "bind9-dnsutils"), "+short", "+time=2", "+tries=1", "+notcp"]
    if source_port is not None:
        argv += ["-b", f"127.0.0.1#{source_port}"]
    argv += [f"@{host}", "-p", str(port), name, "A"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT)
    if done.returncode != 0:
        return None
    return done.stdout.split()


def answers_dns(port: int) -> bool:
    return bool(dig(port))


class DnsServer(PeerProcess):
    """A DNS server on 127.0.0.1, ready once it answers a query on its port."""

    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return answers_dns(self.port)


class Unbound(DnsServer):
    """unbound on 127.0.0.1, with example.test as local data."""

    def __init__(self, workdir: Path, name: str = "unbound"):
        program = require("unbound", "unbound")
        self.port = free_port()
        config_path = workdir / f"{name}.conf"
        config_path.write_text(
            "server:\n"
            f"    interface: 127.0.0.1@{self.port}\n"
            "    do-daemonize: no\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    directory: "{workdir}"\n'
            f'    pidfile: "{workdir / name}.pid"\n'
            "    use-syslog: no\n"
            '    logfile: ""\n'
            "    num-threads: 1\n"
            "    access-control: 127.0.0.0/8 allow\n"
            f'    local-zone: "{DNS_ZONE}." static\n'
            f'    local-data: "{DNS_ZONE}. A {UNBOUND_ANSWER}"\n'
            f'    local-data: "{WHO}. A {UNBOUND_ANSWER}"\n'
            "remote-control:\n"
            "    control-enable: no\n"
        )
        super().__init__(name, [program, "-d", "-c", str(config_path)], workdir)
        self.wait_ready()


class Nsd(DnsServer):
    """nsd on 127.0.0.1, authoritative for example.test; response rate limiting off (a load
    test from one address would meet it)."""

    def __init__(self, workdir: Path, name: str = "nsd"):
        program = require("nsd", "nsd")
        self.port = free_port()
        home = workdir / name
        home.mkdir()
        (home / "zone").write_text(
            f"$ORIGIN {DNS_ZONE}.\n$TTL 60\n"
            "@ IN SOA ns hostmaster 1 3600 600 86400 60\n"
            "@ IN NS ns\n"
            f"@ IN A {NSD_ANSWER}\nns IN A {NSD_ANSWER}\nwho IN A {NSD_ANSWER}\n"
        )
        config_path = home / "nsd.conf"
        config_path.write_text(
            "server:\n"
            f"    ip-address: 127.0.0.1@{self.port}\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    zonesdir: "{home}"\n'
            '    database: ""\n'
            f'    pidfile: "{home}/nsd.pid"\n'
            f'    xfrdfile: "{home}/xfrd.state"\n'
            f'    xfrdir: "{home}"\n'
            f'    zonelistfile: "{home}/zone.list"\n'
            "    server-count: 1\n"
            "    rrl-ratelimit: 0\n"
            "remote-control:\n"
            "    control-enable: no\n"
            "zone:\n"
            f"    name: {DNS_ZONE}\n"
            "    zonefile: zone\n"
        )
        super().__init__(name, [program, "-d", "-c", str(config_path)], workdir)
        self.wait_ready()


# ---- redis-server --------------------------------------------------------------------------------


class RedisServer(PeerProcess):
    def __init__(self, workdir: Path, password: str | None = None):
        program = require("redis-server", "redis-server")
        self.port = free_port()
        argv = [program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(workdir)]
        if password is not None:
            argv += ["--requirepass", password]
        super().__init__(f"redis-{self.port}", argv, workdir)
        self.wait_ready()

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    @property
    def text(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return accepts("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # in case a test left it stopped
        super().stop()


class Peers:
    """Starts peers under ``workdir`` and stops every one of them at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[PeerProcess] = []

    def _started(self, peer):
        self.started.append(peer)
        return peer

    def haproxy(self, *sections: str) -> HAProxy:
        return self._started(HAProxy(self.workdir, list(sections), f"haproxy{len(self.started)}"))

    def nginx_proxy_echo(self) -> NginxProxyEcho:
        return self._started(NginxProxyEcho(self.workdir, f"nginx{len(self.started)}"))

    def tls_server(self, name: str) -> TlsServer:
        return self._started(TlsServer(self.workdir, name))

    def redis_server(self) -> RedisServer:
        return self._started(RedisServer(self.workdir))

    def unbound(self) -> Unbound:
        return self._started(Unbound(self.workdir, f"unbound{len(self.started)}"))

    def nsd(self) -> Nsd:
        return self._started(Nsd(self.workdir, f"nsd{len(self.started)}"))

    def stop_all(self) -> None:
        for peer in self.started:
            peer.stop()
