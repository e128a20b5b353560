"""TLS SNI routing to real ``openssl s_server`` backends, each with a certificate of its own: the
certificate a client sees says which server answered, so fastlb passed the TLS through untouched.

Clients are Python's ssl on a plain socket (the ClientHello made with a memory BIO, so a test
chooses how its bytes are cut), ``openssl s_client`` and ``curl``.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time

import pytest
from conftest import CLIENT_TIMEOUT, assert_closed, free_ports, recv_all
from peers import require

ROUTES = '{ "api.example.test" = "api", "*.example.test" = "web" }'
TLS_RECORD_HEADER = 5  # content type, version, length
TLS_HANDSHAKE = 22


class TlsClient:
    """A TLS client whose ClientHello (``hello``) is made before it connects."""

    def __init__(self, server_name: str | None, alpn: list[str] | None = None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the certificate is compared, not verified
        if alpn:
            context.set_alpn_protocols(alpn)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        self.hello = self.outgoing.read()

    def finish_handshake(self, sock: socket.socket) -> bytes:
        """Completes the handshake over ``sock`` once the hello was sent; returns the server's
        certificate (DER). Raises EOFError if the connection closes first."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(self.outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise EOFError("closed during the TLS handshake") from None
                self.incoming.write(data)
        sock.sendall(self.outgoing.read())
        return self.tls.getpeercert(binary_form=True)


def in_two_records(hello: bytes, split_at: int) -> bytes:
    """The one-record ``hello`` as two handshake records, the first with ``split_at`` bytes."""
    length = int.from_bytes(hello[3:5])
    assert hello[0] == TLS_HANDSHAKE and len(hello) == TLS_RECORD_HEADER + length, "not one record"
    version, message = hello[1:3], hello[TLS_RECORD_HEADER:]
    records = b""
    for part in (message[:split_at], message[split_at:]):
        records += bytes([TLS_HANDSHAKE]) + version + len(part).to_bytes(2) + part
    return records


class SniSetup:
    """Three TLS servers, api, web and fallback, behind one fastlb frontend (``lb``) that routes
    api.example.test to api, *.example.test to web and everything else to fallback."""

    def __init__(self, configured, peers, sni_required: bool = False):
        self.servers = {name: peers.tls_server(name) for name in ("api", "web", "fallback")}
        stats, front = free_ports(2)
        pools = "".join(
            f'[pool.{name}]\nbackend = ["{server.address}"]\n'
            for name, server in self.servers.items()
        )
        self.lb = configured(f"""
            stats = "127.0.0.1:{stats}"
            [frontend.tls]
            listen = ["127.0.0.1:{front}"]
            pool = "fallback"
            sni = {ROUTES}
            sni-required = {"true" if sni_required else "false"}
            {pools}
        """)
        self.by_certificate = {server.der: name for name, server in self.servers.items()}

    def answered_by(self, certificate: bytes) -> str:
        return self.by_certificate.get(certificate, "a certificate of no server here")

    def ask(self, server_name: str | None) -> str:
        """Which server completes a handshake for ``server_name``; "closed" if none does."""
        client = TlsClient(server_name)
        with self.lb.connect() as sock:
            sock.sendall(client.hello)
            try:
                return self.answered_by(client.finish_handshake(sock))
            except (EOFError, ConnectionResetError):
                return "closed"


def test_exact_names_win_over_wildcards_and_the_rest_goes_to_the_frontend_pool(configured, peers):
    setup = SniSetup(configured, peers)
    names = [
        "api.example.test",
        "API.Example.TEST",
        "www.example.test",
        "WWW.EXAMPLE.TEST",
        "deep.www.example.test",
        "example.test",  # the bare suffix is not a match of *.example.test
        "api.example.test.other",
        "other.test",
        None,
    ]
    assert {name: setup.ask(name) for name in names} == {
        "api.example.test": "api",
        "API.Example.TEST": "api",
        "www.example.test": "web",
        "WWW.EXAMPLE.TEST": "web",
        "deep.www.example.test": "web",
        "example.test": "fallback",
        "api.example.test.other": "fallback",
        "other.test": "fallback",
        None: "fallback",
    }


def test_openssl_s_client_reaches_the_route_of_its_servername(configured, peers):
    openssl = require("openssl", "openssl")
    setup = SniSetup(configured, peers)
    result = subprocess.run(
        [openssl, "s_client", "-servername", "api.example.test"]
        + ["-connect", f"127.0.0.1:{setup.lb.port}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    subject = re.search(r"^subject=.*\bCN\s*=\s*(\w+)", result.stdout, re.MULTILINE)
    assert subject, f"no subject in s_client's output:\n{result.stdout}\n{result.stderr}"
    assert subject.group(1) == "api"


def test_curl_reaches_the_route_of_its_host_name(configured, peers):
    curl = require("curl", "curl")
    setup = SniSetup(configured, peers)
    port = setup.lb.port
    answered = {}
    for name in ("api.example.test", "www.example.test"):
        result = subprocess.run(
            [curl, "-sS", "-v", "-k", "--max-time", str(CLIENT_TIMEOUT)]
            + ["--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT + 5,
        )
        assert result.returncode == 0, result.stderr
        assert "s_server" in result.stdout, result.stdout  # the page of s_server -www
        subject = re.search(r"^\*\s+subject:.*\bCN\s*=\s*(\w+)", result.stderr, re.MULTILINE)
        assert subject, f"no subject in curl's output:\n{result.stderr}"
        answered[name] = subject.group(1)
    assert answered == {"api.example.test": "api", "www.example.test": "web"}


def test_a_client_hello_sent_in_two_pieces_50ms_apart(configured, peers):
    setup = SniSetup(configured, peers)
    client = TlsClient("api.example.test")
    half = len(client.hello) // 2
    with setup.lb.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(client.hello[:half])
        time.sleep(0.05)  # the scenario: the rest of the hello comes later, in its own segment
        sock.sendall(client.hello[half:])
        assert setup.answered_by(client.finish_handshake(sock)) == "api"


@pytest.mark.parametrize("split", ["before-the-extensions", "in-the-middle"])
def test_a_client_hello_over_1700_bytes_in_two_records(configured, peers, split):
    setup = SniSetup(configured, peers)
    # Many ALPN protocols make the hello big; the server picks none of them, which is allowed.
    client = TlsClient("api.example.test", alpn=[f"protocol-{i:03d}" for i in range(150)])
    assert len(client.hello) > 1700
    # 40 bytes end inside the session id: the server name is all in the second record.
    split_at = 40 if split == "before-the-extensions" else len(client.hello) // 2
    with setup.lb.connect() as sock:
        sock.sendall(in_two_records(client.hello, split_at))
        assert setup.answered_by(client.finish_handshake(sock)) == "api"


def test_sni_required_closes_what_no_route_matches(configured, peers):
    setup = SniSetup(configured, peers, sni_required=True)
    names = ["api.example.test", "www.example.test", "other.test", "example.test", None]
    assert {name: setup.ask(name) for name in names} == {
        "api.example.test": "api",
        "www.example.test": "web",
        "other.test": "closed",
        "example.test": "closed",
        None: "closed",
    }
    with setup.lb.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not TLS: no name at all
        assert_closed(sock)


def test_a_client_that_is_not_tls_goes_to_the_frontend_pool(configured, peers, backends):
    api = peers.tls_server("api")
    plain = backends("name", name="plain")
    stats, front = free_ports(2)
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.mixed]
        listen = ["127.0.0.1:{front}"]
        pool = "plain"
        sni = {{ "api.example.test" = "api" }}
        [pool.plain]
        backend = ["{plain.address}"]
        [pool.api]
        backend = ["{api.address}"]
    """)
    with lb.connect() as sock:
        sock.sendall(b"hello\n")
        sock.shutdown(socket.SHUT_WR)
        # What fastlb read to decide is forwarded too: the backend echoes it after its name.
        assert recv_all(sock) == b"plain\nhello\n"
