"""The TLS ClientHello parser and the SNI route matcher (ext/proto/sni.pxi).

ClientHellos come from Python's ssl module (the same OpenSSL a client would use), from a real
``openssl s_client`` on loopback, and from a small builder for shapes OpenSSL does not send. A
reference parser written from RFC 8446 and RFC 6066 checks random and mutated input; the compiled
parser reads from memory that ends at a guard page, so any read past the end crashes the test.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlb import _dataplane

parse = _dataplane.parse_sni
match = _dataplane.match_sni

PEEK_MAX = 16384


# ---- ClientHellos --------------------------------------------------------------------------------


def openssl_hello(server_hostname: str | None = None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a TLS client: one record holding its ClientHello."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def records(message: bytes, cuts: list[int] = (), version: bytes = b"\x03\x01") -> bytes:
    """message framed as handshake records, a new record starting at each offset in cuts."""
    bounds = [0, *cuts, len(message)]
    return b"".join(
        b"\x16" + version + struct.pack("!H", end - start) + message[start:end]
        for start, end in zip(bounds, bounds[1:], strict=False)
    )


def handshake_of(stream: bytes) -> bytes:
    """The handshake bytes of a single-record flight."""
    assert stream[0] == 0x16 and struct.unpack("!H", stream[3:5])[0] == len(stream) - 5
    return stream[5:]


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data


def server_name(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + struct.pack("!H", len(n)) + n for n in names)
    return extension(0, struct.pack("!H", len(entries)) + entries)


def hello(
    *extensions: bytes,
    session_id: bytes = b"\x5a" * 32,
    ciphers: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    with_extensions_block: bool = True,
    trailer: bytes = b"",
) -> bytes:
    """A ClientHello handshake message (no record header); trailer follows its extensions."""
    body = (
        b"\x03\x03"
        + b"\x11" * 32
        + bytes([len(session_id)])
        + session_id
        + struct.pack("!H", len(ciphers))
        + ciphers
        + bytes([len(compression)])
        + compression
    )
    if with_extensions_block:
        block = b"".join(extensions)
        body += struct.pack("!H", len(block)) + block + trailer
    return b"\x01" + len(body).to_bytes(3, "big") + body


# A hello the size of one carrying a post-quantum key share (X25519MLKEM768: 1216 bytes).
KEY_SHARE_PQ = extension(51, struct.pack("!HHH", 1220, 0x11EC, 1216) + b"\x42" * 1216)
LONG_ALPN = [f"protocol-{i:02d}-" + "x" * 80 for i in range(20)]


@pytest.fixture(scope="module")
def large_hello() -> bytes:
    stream = openssl_hello("large.example.test", alpn=LONG_ALPN)
    assert len(stream) > 1700
    return stream


# ---- real hellos ---------------------------------------------------------------------------------


def test_hello_with_server_name():
    assert parse(openssl_hello("www.example.test")) == "www.example.test"


def test_hello_without_server_name():
    assert parse(openssl_hello(None)) == ""
    assert parse(openssl_hello("192.0.2.1")) == ""  # no SNI is sent for an IP address


def test_upper_case_name_is_lower_cased():
    stream = openssl_hello("WWW.Example.TEST")
    assert b"WWW.Example.TEST" in stream
    assert parse(stream) == "www.example.test"


def test_trailing_dot_is_dropped():
    assert parse(records(hello(server_name(b"example.test.")))) == "example.test"


def test_large_hello(large_hello):
    assert parse(large_hello) == "large.example.test"


def test_every_prefix_of_a_large_hello_needs_more(large_hello):
    for end in range(len(large_hello)):
        assert parse(large_hello[:end]) is None, end
    # Bytes after the hello (a client's next flight) do not matter.
    assert parse(large_hello + b"\x14\x03\x03\x00\x01\x01") == "large.example.test"


def test_byte_at_a_time():
    stream = openssl_hello("byte.example.test") + b"\x17\x03\x03\x00\x10" + b"\0" * 16
    received = b""
    answer = None
    while answer is None:
        received = stream[: len(received) + 1]
        answer = parse(received)
    assert answer == "byte.example.test"
    assert len(received) == len(stream) - 21


def test_hello_split_over_two_records_at_every_point(large_hello):
    message = handshake_of(large_hello)
    for cut in range(1, len(message)):
        assert parse(records(message, [cut])) == "large.example.test", cut


def test_every_prefix_of_a_hello_in_two_records(large_hello):
    message = handshake_of(large_hello)
    stream = records(message, [len(message) // 2])
    for end in range(len(stream)):
        assert parse(stream[:end]) is None, end
    assert parse(stream) == "large.example.test"


def test_hello_in_one_byte_records():
    message = handshake_of(openssl_hello("tiny.example.test"))
    stream = records(message, list(range(1, len(message))))
    assert len(stream) < PEEK_MAX
    assert parse(stream) == "tiny.example.test"
    assert parse(stream[:-1]) is None


def test_post_quantum_sized_hello_over_two_segments_and_records():
    message = hello(server_name(b"pq.example.test"), KEY_SHARE_PQ, extension(21, b"\0" * 380))
    assert 1448 < len(message) < 2 * 1448
    one_record = records(message)
    two_records = records(message, [700])
    for stream in (one_record, two_records):
        for segment in (1, 536, 1448):  # the first TCP segment ends here
            assert parse(stream[:segment]) is None
        assert parse(stream) == "pq.example.test"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_s_client_capture():
    """What openssl s_client sends first, read from a loopback socket as a worker would."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]
        client = subprocess.Popen(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "Capture.Example.Test",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                received = b""
                answer = None
                while answer is None:
                    chunk = conn.recv(4096)
                    assert chunk, "openssl closed before its ClientHello was complete"
                    received += chunk
                    answer = parse(received)
        finally:
            client.kill()
            client.wait(timeout=10)
    assert answer == "capture.example.test"


# ---- hand-built shapes ---------------------------------------------------------------------------


def test_hello_without_extensions_block():
    assert parse(records(hello(with_extensions_block=False))) == ""


def test_hello_with_other_extensions_only():
    assert parse(records(hello(extension(43, b"\x02\x03\x04"), extension(10, b"")))) == ""


def test_other_name_types_are_skipped():
    ext = extension(0, struct.pack("!H", 8) + b"\x07\x00\x05other" + b"")
    assert parse(records(hello(ext))) == ""
    both = b"\x07\x00\x05other" + b"\x00\x00\x0cexample.test"
    assert parse(records(hello(extension(0, struct.pack("!H", len(both)) + both)))) == (
        "example.test"
    )


def test_longest_name():
    name = b".".join([b"a" * 63] * 4)[:255]
    assert parse(records(hello(server_name(name)))) == name.decode()


def test_record_version_minor_does_not_matter():
    for version in (b"\x03\x00", b"\x03\x01", b"\x03\x03", b"\x03\x04"):
        assert parse(records(hello(server_name(b"a.test")), version=version)) == "a.test"


def test_limit_on_records_before_the_pick():
    # The hello message may fill what PEEK_MAX bytes hold: one record header and the message.
    def padding_for(size: int) -> bytes:
        return extension(21, b"\0" * size)

    base = hello(server_name(b"big.test"), padding_for(0))
    fits = hello(server_name(b"big.test"), padding_for(PEEK_MAX - 5 - len(base)))
    assert len(records(fits)) == PEEK_MAX
    assert parse(records(fits)) == "big.test"
    # In two records it needs five bytes more than that.
    with pytest.raises(ValueError):
        parse(records(fits, [100]))
    with pytest.raises(ValueError):
        parse(records(fits, [100])[:200])  # refused once the second record's header is seen
    one_more = hello(server_name(b"big.test"), padding_for(PEEK_MAX - 4 - len(base)))
    with pytest.raises(ValueError):
        parse(records(one_more)[:9])  # refused as soon as the hello's length is known


INVALID = {
    "http": b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "sslv2 hello": b"\x80\x2e\x01\x00\x02\x00\x15" + b"\x00" * 40,
    "alert record": b"\x15\x03\x03\x00\x02\x02\x28",
    "change cipher spec first": b"\x14\x03\x03\x00\x01\x01" + records(hello()),
    "record major 2": b"\x16\x02\x00" + records(hello())[3:],
    "empty record": b"\x16\x03\x01\x00\x00" + records(hello()),
    "record over 16384": b"\x16\x03\x01\x40\x01\x01",
    "server hello": records(b"\x02" + hello()[1:]),
    "session id over 32": records(hello(session_id=b"\0" * 33)),
    "odd cipher suites": records(hello(ciphers=b"\x13\x01\x13")),
    "no cipher suites": records(hello(ciphers=b"")),
    "no compression": records(hello(compression=b"")),
    "empty name": records(hello(server_name(b""))),
    "name over 255": records(hello(server_name(b"a" * 256))),
    "name of a dot": records(hello(server_name(b"."))),
    "two host names": records(hello(server_name(b"a.test", b"b.test"))),
    "two server_name extensions": records(hello(server_name(b"a.test"), server_name(b"b.test"))),
    "space in name": records(hello(server_name(b"a b.test"))),
    "nul in name": records(hello(server_name(b"a\0b.test"))),
    "non-ascii name": records(hello(server_name("é.test".encode()))),
    "name list longer than extension": records(hello(extension(0, b"\x00\x10\x00\x00\x06a.test"))),
    "name longer than list": records(hello(extension(0, b"\x00\x09\x00\x00\x07a.test\x00"))),
    "truncated name entry": records(hello(extension(0, b"\x00\x02\x00\x00"))),
    "empty server_name extension": records(hello(extension(0, b""))),
    # ALPN claiming 9 bytes where the block holds 5 more.
    "extension longer than its block": records(hello(b"\x00\x10\x00\x09\x00\x03\x02h2")),
    "bytes after the extensions": records(hello(server_name(b"a.test"), trailer=b"\x00")),
    "truncated body": records(b"\x01\x00\x00\x20" + b"\x03\x03" + b"\0" * 30),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_hello_is_refused(name):
    with pytest.raises(ValueError):
        parse(INVALID[name])


@pytest.mark.parametrize(
    "data", [b"G", b"\x80", b"\x16\x02", b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x00\x10\x02"]
)
def test_error_is_decided_early(data):
    with pytest.raises(ValueError):
        parse(data)


def test_prefixes_of_a_record_header_need_more():
    header = b"\x16\x03\x01\x02\x00"
    for end in range(len(header) + 1):
        assert parse(header[:end]) is None


# ---- a reference parser and random input ---------------------------------------------------------


class Malformed(Exception):
    pass


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Malformed
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def reference_name(body: bytes) -> str:
    """The server name in a ClientHello body, per RFC 8446 4.1.2 and RFC 6066 3."""
    hello = Reader(body)
    hello.take(34)
    if len(hello.vector(1)) > 32:
        raise Malformed
    ciphers = hello.vector(2)
    if not ciphers or len(ciphers) % 2:
        raise Malformed
    if not hello.vector(1):
        raise Malformed
    if hello.done:
        return ""
    extensions = Reader(hello.vector(2))
    if not hello.done:
        raise Malformed
    found = None
    seen_server_name = False
    while not extensions.done:
        kind, data = extensions.number(2), extensions.vector(2)
        if kind != 0:
            continue
        if seen_server_name:
            raise Malformed
        seen_server_name = True
        outer = Reader(data)
        names = Reader(outer.vector(2))
        if not outer.done:
            raise Malformed
        while not names.done:
            name_type, name = names.number(1), names.vector(2)
            if name_type != 0:
                continue
            if found is not None or not 1 <= len(name) <= 255:
                raise Malformed
            if any(c <= 0x20 or c >= 0x7F for c in name):
                raise Malformed
            found = name.decode().lower()
            if found.endswith("."):
                found = found[:-1]
                if not found:
                    raise Malformed
    return found or ""


def reference(data: bytes):
    """None (need more), "error", or the name: the records reassembled, then the hello read."""
    message = b""
    need = None
    pos = 0
    try:
        while need is None or len(message) < need:
            header = data[pos : pos + 5]
            if header[:1] not in (b"", b"\x16") or header[1:2] not in (b"", b"\x03"):
                return "error"
            if len(header) < 5:
                return None
            length = struct.unpack("!H", header[3:5])[0]
            if not 1 <= length <= 16384:
                return "error"
            body = data[pos + 5 : pos + 5 + length]
            for i in range(len(body)):
                message += body[i : i + 1]
                if message[0] != 1:
                    return "error"
                if len(message) == 4:
                    need = 4 + int.from_bytes(message[1:4], "big")
                # The rest of the hello, were it all in this record, must end within PEEK_MAX.
                if need is not None and pos + 5 + i + 1 + need - len(message) > PEEK_MAX:
                    return "error"
                if need is not None and len(message) == need:
                    break
            if need is None or len(message) < need:
                if len(body) < length:
                    return None
                pos += 5 + length
                if need is not None and pos + 5 + need - len(message) > PEEK_MAX:
                    return "error"
        return reference_name(message[4:])
    except Malformed:
        return "error"


def compiled(data: bytes):
    try:
        return parse(data)
    except ValueError:
        return "error"


def check_against_reference(data: bytes, suffix: bytes) -> None:
    answer = compiled(data)
    assert answer == reference(data)
    if answer is not None:
        # Errors and complete hellos are final: more bytes change nothing.
        assert compiled(data + suffix) == answer


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=20))
def test_random_bytes(data, suffix):
    check_against_reference(data, suffix)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=20))
def test_random_bytes_after_a_record_header(data, suffix):
    check_against_reference(b"\x16\x03\x01" + struct.pack("!H", len(data)) + data, suffix)


SEEDS = [
    openssl_hello("seed.example.test"),
    openssl_hello(None),
    records(hello(server_name(b"a.test"))),
    records(hello(server_name(b"a.test"), extension(21, b"\0" * 10)), [50]),
    records(hello(with_extensions_block=False)),
    records(hello(server_name(b"x.test", name_type=3), server_name(b"b.test")), [3]),
]


@st.composite
def mutated_hellos(draw):
    """A valid flight with a few bytes replaced, inserted or removed, or a length field set."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "small"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "replace" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data.insert(at, draw(st.integers(0, 255)))
        elif op == "delete" and data:
            del data[at]
        elif op == "truncate":
            del data[at:]
        elif op == "small" and data:
            # Length fields are where the bugs are: nudge a byte by a little.
            data[at] = (data[at] + draw(st.integers(-3, 3))) % 256
    return bytes(data)


@settings(max_examples=2000, deadline=None)
@given(mutated_hellos(), st.binary(max_size=20))
def test_mutated_hellos(data, suffix):
    check_against_reference(data, suffix)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_record_boundaries(data):
    message = handshake_of(SEEDS[0])
    cuts = sorted(data.draw(st.sets(st.integers(1, len(message) - 1), max_size=20)))
    stream = records(message, cuts)
    assert parse(stream) == "seed.example.test"
    end = data.draw(st.integers(0, len(stream) - 1))
    assert parse(stream[:end]) is None


# ---- route matching ------------------------------------------------------------------------------


def test_exact_name_wins_over_wildcard():
    assert match(["*.example.test", "www.example.test"], "www.example.test") == 1
    assert match(["www.example.test", "*.example.test"], "www.example.test") == 0
    assert match(["*.example.test", "www.example.test"], "api.example.test") == 0


def test_longest_wildcard_wins():
    patterns = ["*.test", "*.b.example.test", "*.example.test"]
    assert match(patterns, "a.b.example.test") == 1
    assert match(patterns, "a.c.example.test") == 2
    assert match(patterns, "other.test") == 0
    assert match(list(reversed(patterns)), "a.b.example.test") == 1


def test_wildcard_matches_any_depth_but_not_the_bare_suffix():
    assert match(["*.example.test"], "a.example.test") == 0
    assert match(["*.example.test"], "a.b.example.test") == 0
    assert match(["*.example.test"], "example.test") == -1
    assert match(["*.example.test"], ".example.test") == -1
    assert match(["*.example.test"], "aexample.test") == -1


def test_no_match():
    assert match([], "a.test") == -1
    assert match(["a.test", "*.b.test"], "c.test") == -1
    assert match(["a.test"], "aa.test") == -1
    assert match(["a.test"], "a.tes") == -1


def test_matching_is_on_the_lower_cased_name():
    # The matcher compares bytes; parse_sni is what lower-cases what clients send.
    assert match(["www.example.test"], "WWW.example.test") == -1
    name = parse(openssl_hello("WWW.Example.Test"))
    assert match(["*.example.test", "www.example.test"], name) == 1


def reference_match(patterns: list[str], name: str) -> int:
    if name in patterns:
        return patterns.index(name)
    best, best_len = -1, 0
    for i, pattern in enumerate(patterns):
        suffix = pattern[1:]
        if pattern.startswith("*.") and name.endswith(suffix) and len(suffix) > best_len:
            if len(name) > len(suffix):
                best, best_len = i, len(suffix)
    return best


labels = st.sampled_from(["a", "b", "example", "test", "www"])


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda wild, parts: ("*." if wild else "") + ".".join(parts),
            st.booleans(),
            st.lists(labels, min_size=1, max_size=3),
        ),
        max_size=8,
    ),
    st.lists(labels, min_size=1, max_size=4).map(".".join),
)
def test_match_against_reference(patterns, name):
    assert match(patterns, name) == reference_match(patterns, name)
