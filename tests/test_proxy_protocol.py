"""PROXY protocol v1 and v2 against real peers: HAProxy sending headers to fastlb, fastlb sending
them to nginx and HAProxy, headers fastlb must refuse or must not read, and the PROXY source as
the key of iphash.

Addresses inside hand-written headers are documentation ones (198.51.100.0/24, 203.0.113.0/24):
they are only bytes, nothing is ever sent to them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

import pytest
from conftest import (
    assert_closed,
    connect,
    free_port,
    free_ports,
    ipv6_loopback,
    recv_all,
    recv_line,
    toml_array,
)
from peers import haproxy_relay, haproxy_source_reporter

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_PROXY = 0x21  # version 2, command PROXY
PROXY_V2_LOCAL = 0x20  # version 2, command LOCAL: the sender's own connection (a health check)
PROXY_V2_TCP4, PROXY_V2_TCP6 = 0x11, 0x21
HTTP_GET = b"GET / HTTP/1.0\r\n\r\n"


def proxy_header(version: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The PROXY header (v1 text or v2 binary) of a TCP connection from source to destination."""
    ipv6 = ":" in source[0]
    if version == "v1":
        family = "TCP6" if ipv6 else "TCP4"
        return (
            f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()
        )
    addresses = b"".join(ipaddress.ip_address(a[0]).packed for a in (source, destination))
    addresses += struct.pack("!HH", source[1], destination[1])
    family = PROXY_V2_TCP6 if ipv6 else PROXY_V2_TCP4
    return (
        PROXY_V2_SIGNATURE + struct.pack("!BBH", PROXY_V2_PROXY, family, len(addresses)) + addresses
    )


def split_proxy_v2(data: bytes) -> tuple[int, int, bytes, bytes]:
    """(command, family, address block with any TLVs, what follows) of a v2 header."""
    assert data[:12] == PROXY_V2_SIGNATURE, f"no v2 signature: {data!r}"
    command, family, length = struct.unpack("!BBH", data[12:16])
    assert len(data) >= 16 + length, f"a header cut short: {data!r}"
    return command, family, data[16 : 16 + length], data[16 + length :]


def address_line(sock: socket.socket) -> str:
    """This socket's local address as nginx and HAProxy print a client's: HOST:PORT."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def trusting(
    configured,
    backend,
    inspect_timeout: str = "5s",
    trusted: str = "127.0.0.0/8",
    send_proxy: str | None = None,
):
    """fastlb reading PROXY headers from ``trusted`` senders, in front of ``backend``."""
    stats, front = free_ports(2)
    sends = f'send-proxy = "{send_proxy}"' if send_proxy else ""
    return configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.proxied]
        listen = ["127.0.0.1:{front}"]
        pool = "backend"
        accept-proxy = ["{trusted}"]
        inspect-timeout = "{inspect_timeout}"
        [pool.backend]
        backend = ["{backend.address}"]
        {sends}
    """)


def assert_only_the_next_connection_reaches(lb, echo) -> None:
    """A connection with a header reaches ``echo``, header stripped, and is the only one that
    ever did: counters are reported in order, so earlier ones would be in by then."""
    with lb.connect() as sock:
        sock.sendall(proxy_header("v1", ("198.51.100.7", 4567), ("127.0.0.1", lb.port)) + b"ok\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"ok\n"
    stats = lb.wait_for(lambda s: lb.backend(echo, s)["connections"] > 0)
    assert lb.backend(echo, stats)["connections"] == 1


# ---- fastlb between real PROXY senders and receivers --------------------------------------------


@pytest.mark.parametrize("haproxy_sends", ["v1", "v2"])
def test_client_address_reaches_nginx_through_haproxy_and_fastlb(configured, peers, haproxy_sends):
    nginx = peers.nginx_proxy_echo()
    lb = trusting(configured, nginx, send_proxy="v2")
    relay = free_port()
    peers.haproxy(haproxy_relay("clients", relay, f"127.0.0.1:{lb.port}", haproxy_sends))
    for source in ("127.0.0.2", "127.0.0.3"):
        with connect(("127.0.0.1", relay), source) as sock:
            assert recv_line(sock) == address_line(sock)


@pytest.mark.parametrize("source", ["127.0.0.2", "::1"])
@pytest.mark.parametrize("fastlb_sends", ["v1", "v2"])
def test_haproxy_accept_proxy_behind_fastlb_sees_the_client(
    configured, peers, fastlb_sends, source
):
    if source == "::1" and not ipv6_loopback():
        pytest.skip("::1 cannot be bound here")
    stats, front, reporter = free_ports(3)
    peers.haproxy(haproxy_source_reporter("reporter", reporter))
    listen = f"[::1]:{front}" if source == "::1" else f"127.0.0.1:{front}"
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.clients]
        listen = ["{listen}"]
        pool = "reporter"
        [pool.reporter]
        backend = ["127.0.0.1:{reporter}"]
        send-proxy = "{fastlb_sends}"
    """)
    with lb.connect(source, address=lb.address("clients")) as sock:
        sock.sendall(HTTP_GET)
        response = recv_all(sock)
        expected = address_line(sock)
    status, _, body = response.partition(b"\r\n\r\n")
    assert status.split(b" ")[1:2] == [b"200"], response
    assert body.decode() == expected + "\n"


def test_flags_accept_and_send_proxy_like_the_file(balancer, peers):
    nginx = peers.nginx_proxy_echo()
    lb = balancer(
        [nginx.address],
        *("--accept-proxy", "127.0.0.0/8", "--send-proxy", "v2", "--inspect-timeout", "2s"),
    )
    with lb.connect() as sock:
        sock.sendall(proxy_header("v1", ("198.51.100.7", 4567), ("127.0.0.1", lb.port)))
        assert recv_line(sock) == "198.51.100.7:4567"


# ---- what a trusted sender must send, and what an untrusted one may ---------------------------


def test_a_trusted_sender_without_a_header_is_closed_after_inspect_timeout(configured, backends):
    echo = backends("echo")
    lb = trusting(configured, echo, inspect_timeout="1s")
    with lb.connect() as sock:
        started = time.monotonic()
        assert_closed(sock)
        waited = time.monotonic() - started
    assert 0.5 <= waited <= 3.0, f"closed after {waited:.2f}s, inspect-timeout is 1s"
    assert_only_the_next_connection_reaches(lb, echo)


def test_a_trusted_sender_sending_data_instead_of_a_header_is_closed_at_once(configured, backends):
    echo = backends("echo")
    lb = trusting(configured, echo, inspect_timeout="20s")
    with lb.connect() as sock:
        started = time.monotonic()
        sock.sendall(HTTP_GET)
        assert_closed(sock)
        waited = time.monotonic() - started
    # "GET " can never start a header: no reason to wait for more.
    assert waited < 5.0, f"closed after {waited:.2f}s"
    assert_only_the_next_connection_reaches(lb, echo)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_untrusted_sender_has_its_header_forwarded_as_data(configured, backends, version):
    echo = backends("echo")
    lb = trusting(configured, echo, trusted="127.0.0.9/32")
    sent = proxy_header(version, ("198.51.100.7", 4567), ("203.0.113.8", 80)) + b"hello\n"
    with lb.connect("127.0.0.1") as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == sent


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_sent_byte_by_byte_is_read_whole(configured, peers, version):
    nginx = peers.nginx_proxy_echo()
    lb = trusting(configured, nginx, send_proxy="v2")
    header = proxy_header(version, ("198.51.100.7", 4567), ("127.0.0.1", lb.port))
    with lb.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in header:
            sock.send(bytes([byte]))
        assert recv_line(sock) == "198.51.100.7:4567"


# ---- what fastlb sends to its backends ----------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_header_names_the_client_and_the_frontend_address(configured, backends, version):
    first = backends("firstbytes")
    stats, front = free_ports(2)
    configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.clients]
        listen = ["127.0.0.1:{front}"]
        pool = "first"
        [pool.first]
        backend = ["{first.address}"]
        send-proxy = "{version}"
    """)
    with connect(("127.0.0.1", front), "127.0.0.2") as sock:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        client = sock.getsockname()
        assert recv_all(sock) == b""
    received = bytes.fromhex(first.next_event("firstbytes")["hex"])
    expected = proxy_header(version, client, ("127.0.0.1", front))
    if version == "v1":
        assert received == expected + b"hello"
    else:  # TLVs may follow the addresses
        command, family, addresses, rest = split_proxy_v2(received)
        assert (command, family, rest) == (PROXY_V2_PROXY, PROXY_V2_TCP4, b"hello"), received
        assert addresses[:12] == expected[16:], received


def test_health_checks_of_a_send_proxy_pool_send_a_v2_local_header(configured, backends):
    first = backends("firstbytes")
    stats, front = free_ports(2)
    lb = configured(f"""
        stats = "127.0.0.1:{stats}"
        [frontend.clients]
        listen = ["127.0.0.1:{front}"]
        pool = "checked"
        [pool.checked]
        backend = ["{first.address}"]
        send-proxy = "v2"
        [pool.checked.check]
        interval = "200ms"
    """)
    # No client connects: every connection the backend sees is a check.
    for _ in range(3):
        received = bytes.fromhex(first.next_event("firstbytes")["hex"])
        command, _, _, rest = split_proxy_v2(received)
        assert (command, rest) == (PROXY_V2_LOCAL, b""), received
    assert lb.backend(first)["up"]


# ---- the PROXY source as the key of iphash ------------------------------------------------------


def test_iphash_keys_on_the_proxy_source(configured, backends, peers):
    names = toml_array(backends("name", name=f"n{i}").address for i in range(1, 5))
    stats_direct, direct, stats_behind, proxied, unaccepted, *relays = free_ports(7)
    configured(f"""
        stats = "127.0.0.1:{stats_direct}"
        [frontend.direct]
        listen = ["127.0.0.1:{direct}"]
        pool = "names"
        [pool.names]
        algorithm = "iphash"
        backend = {names}
    """)
    configured(f"""
        stats = "127.0.0.1:{stats_behind}"
        [frontend.proxied]
        listen = ["127.0.0.1:{proxied}"]
        pool = "names"
        accept-proxy = ["127.0.0.0/8"]
        [frontend.unaccepted]
        listen = ["127.0.0.1:{unaccepted}"]
        pool = "names"
        [pool.names]
        algorithm = "iphash"
        backend = {names}
    """)
    relay_proxied, relay_unaccepted = relays
    peers.haproxy(
        haproxy_relay("proxied", relay_proxied, f"127.0.0.1:{proxied}", "v2"),
        haproxy_relay("unaccepted", relay_unaccepted, f"127.0.0.1:{unaccepted}", "v2"),
    )

    def names_by_source(port: int) -> dict[str, str]:
        answers = {}
        for x in range(2, 41):
            with connect(("127.0.0.1", port), f"127.0.0.{x}") as sock:
                answers[f"127.0.0.{x}"] = recv_line(sock)
        return answers

    by_direct = names_by_source(direct)
    assert len(set(by_direct.values())) > 1, f"39 sources, one backend: {by_direct}"
    assert names_by_source(relay_proxied) == by_direct
    # Without accept-proxy every connection comes from HAProxy's one address: one key.
    assert len(set(names_by_source(relay_unaccepted).values())) == 1
