"""Bytes pass through unchanged both ways, half-closes and resets are propagated."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time

import pytest
from conftest import recv_all, recv_line, recv_until_eof

KiB = 1024
MiB = 1024 * KiB

# (size, splice mode): every size with the default mode, the large ones with every mode.
CASES = [(n, "auto") for n in (1, KiB, 100 * KiB)] + [
    (n, mode) for n in (MiB, 64 * MiB) for mode in ("never", "always", "auto")
]
CASE_IDS = [f"{size}B-splice-{mode}" for size, mode in CASES]


def random_payload(size: int) -> bytes:
    """``size`` random bytes; large payloads repeat a random block of an odd length."""
    block = os.urandom(min(size, MiB + 13))
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize(("size", "splice"), CASES, ids=CASE_IDS)
def test_upload_arrives_intact(backends, balancer, size, splice):
    sink = backends("sink")
    lb = balancer([sink], "--splice", splice)
    payload = random_payload(size)
    with lb.connect() as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock)
    assert reply.decode() == hashlib.sha256(payload).hexdigest()
    closed = sink.next_event()
    assert (closed["received"], closed["error"]) == (size, None)


def test_a_fin_alone_reaches_the_backend_as_a_fin(backends, balancer, monkeypatch):
    """A read that gets only the client's FIN leaves its new buffer empty: the FIN goes on, not
    whatever the allocator left there. MALLOC_PERTURB_ fills new memory with junk, as memory
    freed and reused under load holds."""
    monkeypatch.setenv("MALLOC_PERTURB_", "165")
    sink = backends("sink")
    lb = balancer([sink], "--splice", "never")
    for _ in range(3):
        with lb.connect() as sock:
            sock.shutdown(socket.SHUT_WR)
            reply = recv_all(sock)
        assert reply.decode() == hashlib.sha256(b"").hexdigest()
        closed = sink.next_event()
        assert (closed["received"], closed["error"]) == (0, None)


@pytest.mark.parametrize(("size", "splice"), CASES, ids=CASE_IDS)
def test_download_arrives_intact(backends, balancer, size, splice):
    source = backends("source", nbytes=size)
    lb = balancer([source], "--splice", splice)
    with lb.connect() as sock:
        received, digest = recv_until_eof(sock)
    closed = source.next_event()
    assert closed["sent"] == size
    assert (received, digest) == (size, closed["sha256_out"])


@pytest.mark.parametrize("splice", ["never", "always"])
def test_both_directions_at_once(backends, balancer, splice):
    """A client that streams 16 MiB while reading the echo back: no deadlock, nothing changed."""
    echo = backends("echo")
    lb = balancer([echo], "--splice", splice)
    payload = random_payload(16 * MiB)
    with lb.connect() as sock:

        def upload():
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=upload)
        sender.start()
        received, digest = recv_until_eof(sock)
        sender.join(timeout=30)
    assert (received, digest) == (len(payload), hashlib.sha256(payload).hexdigest())


@pytest.mark.parametrize("splice", ["never", "always", "auto"])
def test_bulk_replies_complete_on_an_open_connection(backends, balancer, splice):
    """Each 1 MiB reply, written by the backend in small segments, arrives whole while the
    connection stays open (keep-alive): the end of a reply must not wait for the backend to
    close. Small segments fill a splice pipe's slots before its bytes: a short splice is not a
    drained socket."""
    replies = backends("replies", nbytes=MiB)
    lb = balancer([replies], "--splice", splice)
    received = hashlib.sha256()
    with lb.connect() as sock:
        sock.settimeout(10)
        for round_ in range(1, 4):
            sock.sendall(b"?")
            # Read only once the whole reply is on its way: it then waits in the balancer as
            # many small segments, with nothing more to come from the backend.
            replies.next_event("replied", sent=round_ * MiB)
            got = 0
            while got < MiB:
                chunk = sock.recv(MiB - got)
                assert chunk, f"EOF after {got} of {MiB} bytes"
                got += len(chunk)
                received.update(chunk)
    closed = replies.next_event()
    assert (closed["sent"], closed["sha256_out"]) == (3 * MiB, received.hexdigest())


def test_client_half_close_reaches_the_backend_which_can_still_answer(backends, balancer):
    sink = backends("sink")
    lb = balancer([sink])
    with lb.connect() as sock:
        sock.sendall(b"first part, ")
        sock.sendall(b"second part")
        sock.shutdown(socket.SHUT_WR)
        # The sink answers only after it has read EOF.
        answer = recv_all(sock)
    assert answer.decode() == hashlib.sha256(b"first part, second part").hexdigest()
    closed = sink.next_event()
    assert (closed["received"], closed["error"]) == (23, None)


def test_backend_half_close_reaches_the_client_which_can_still_send(backends, balancer):
    halfclose = backends("halfclose", name="early-closer")
    lb = balancer([halfclose])
    payload = random_payload(3 * MiB)
    with lb.connect() as sock:
        assert recv_line(sock) == "early-closer"
        assert sock.recv(1) == b""  # EOF from the backend
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    closed = halfclose.next_event()
    assert closed["error"] is None
    assert closed["received"] == len(payload)
    assert closed["sha256_in"] == hashlib.sha256(payload).hexdigest()


ETH_P_ALL = 0x0003
ETH_P_IP = b"\x08\x00"
ETH_HEADER = 14  # lo's frames carry an Ethernet header of zeros
PACKET_HOST = 0  # a frame as received; lo shows each one sent (PACKET_OUTGOING) as well
TCP_FIN = 0x01


@contextlib.contextmanager
def loopback_capture():
    """A packet socket on lo: every frame on it from now on (needs CAP_NET_RAW)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as capture:
        capture.bind(("lo", 0))
        yield capture


def segments_until_fin(capture, src_port: int, dst_port: int, timeout: float = 5.0):
    """(TCP flags, payload size) of each IPv4 segment src_port -> dst_port, up to its FIN."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        capture.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            frame, address = capture.recvfrom(65536)
        except TimeoutError:
            break
        if (
            address[2] != PACKET_HOST
            or frame[12:ETH_HEADER] != ETH_P_IP
            or frame[ETH_HEADER + 9] != socket.IPPROTO_TCP
        ):
            continue  # not an IPv4 TCP segment as received
        ip_header = (frame[ETH_HEADER] & 0x0F) * 4
        tcp = ETH_HEADER + ip_header
        ports = struct.unpack_from("!HH", frame, tcp)
        if ports != (src_port, dst_port):
            continue
        ip_length = struct.unpack_from("!H", frame, ETH_HEADER + 2)[0]
        payload = ip_length - ip_header - (frame[tcp + 12] >> 4) * 4
        seen.append((frame[tcp + 13], payload))
        if frame[tcp + 13] & TCP_FIN:
            return seen
    raise AssertionError(f"no FIN from port {src_port} to {dst_port} in {timeout} s: {seen}")


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo needs root (CAP_NET_RAW)")
def test_a_reply_that_came_with_its_fin_leaves_with_it_in_one_segment(backends, balancer):
    """The backend's last bytes and its FIN arrive in one segment: they leave for the client in
    one too (sent with MSG_MORE, then the shutdown), as HAProxy sends them. A FIN of its own
    would be one more segment for the client to take in and acknowledge."""
    lastword = backends("lastword", name="last-word")
    lb = balancer([lastword])
    with loopback_capture() as capture, lb.connect() as sock:
        sock.sendall(b"?")
        assert recv_all(sock) == b"last-word\n"
        seen = segments_until_fin(capture, lb.port, sock.getsockname()[1])
    with_data = [(flags, size) for flags, size in seen if size]
    assert len(with_data) == 1 and with_data[0][1] == len(b"last-word\n"), seen
    assert with_data[0][0] & TCP_FIN, f"the FIN came on its own: {seen}"
    closed = lastword.next_event()
    assert (closed["sent"], closed["error"]) == (len(b"last-word\n"), None)


def test_backend_reset_reaches_the_client_as_a_reset(backends, balancer):
    resetter = backends("reset", name="resetter")
    lb = balancer([resetter])
    with lb.connect() as sock:
        assert recv_line(sock) == "resetter"
        sock.sendall(b"x")  # the backend resets once it has read this
        assert resetter.next_event()["received"] == 1
        with pytest.raises(ConnectionResetError):
            while sock.recv(4096):
                pass


def test_client_reset_reaches_the_backend_as_a_reset(backends, balancer):
    hold = backends("hold", name="holder")
    lb = balancer([hold])
    sock = lb.connect()
    assert recv_line(sock) == "holder"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert hold.next_event()["error"] == "ECONNRESET"


def test_clean_close_is_not_a_reset(backends, balancer):
    hold = backends("hold", name="holder")
    lb = balancer([hold])
    with lb.connect() as sock:
        assert recv_line(sock) == "holder"
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    closed = hold.next_event()
    assert (closed["received"], closed["sent"], closed["error"]) == (4, len("holder\nping"), None)
