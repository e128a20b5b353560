"""The PROXY protocol parser and builder (ext/proto/proxy.pxi) through fastlb._dataplane.

Vectors are written by hand from HAProxy's doc/proxy-protocol.txt. A small reference parser
written from the same text checks random and mutated headers; the compiled parser reads its input
from memory that ends at a guard page, so any read past the end crashes the test.
"""

from __future__ import annotations

import ipaddress
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlb import _dataplane

parse = _dataplane.parse_proxy
build = _dataplane.build_proxy

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PAYLOAD = b"GET / HTTP/1.1\r\n\r\n"


def v2(ver_cmd: int, family: int, body: bytes) -> bytes:
    return SIG + bytes([ver_cmd, family]) + struct.pack("!H", len(body)) + body


def addrs4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def addrs6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


TLVS = tlv(0x01, b"h2") + tlv(0x02, b"example.test") + tlv(0x04, b"\x00" * 5)

# (header, expected result of parsing it)
VALID = {
    "v1 tcp4": (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        ("PROXY", ("192.0.2.1", 56324), ("198.51.100.2", 443)),
    ),
    "v1 tcp6": (
        b"PROXY TCP6 2001:db8::1 2001:db8:0:0:0:0:0:2 1 65535\r\n",
        ("PROXY", ("2001:db8::1", 1), ("2001:db8::2", 65535)),
    ),
    "v1 tcp6 mapped": (
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 0 80\r\n",
        ("PROXY", ("::ffff:192.0.2.1", 0), ("::1", 80)),
    ),
    "v1 unknown": (b"PROXY UNKNOWN\r\n", ("LOCAL", None, None)),
    "v1 unknown with addresses": (
        b"PROXY UNKNOWN ffff:f::1 ffff:f::2 123 456\r\n",
        ("LOCAL", None, None),
    ),
    "v1 longest line": (b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", ("LOCAL", None, None)),
    "v2 tcp4": (
        v2(0x21, 0x11, addrs4("192.0.2.1", "198.51.100.2", 56324, 443)),
        ("PROXY", ("192.0.2.1", 56324), ("198.51.100.2", 443)),
    ),
    "v2 tcp4 tlvs": (
        v2(0x21, 0x11, addrs4("10.0.0.1", "10.0.0.2", 1, 2) + TLVS),
        ("PROXY", ("10.0.0.1", 1), ("10.0.0.2", 2)),
    ),
    "v2 tcp6": (
        v2(0x21, 0x21, addrs6("2001:db8::1", "2001:db8::2", 40000, 8443)),
        ("PROXY", ("2001:db8::1", 40000), ("2001:db8::2", 8443)),
    ),
    "v2 tcp6 tlvs": (
        v2(0x21, 0x21, addrs6("::1", "fe80::1", 65535, 0) + TLVS),
        ("PROXY", ("::1", 65535), ("fe80::1", 0)),
    ),
    "v2 udp4": (
        v2(0x21, 0x12, addrs4("192.0.2.1", "192.0.2.2", 53, 53)),
        ("PROXY", ("192.0.2.1", 53), ("192.0.2.2", 53)),
    ),
    "v2 local": (v2(0x20, 0x00, b""), ("LOCAL", None, None)),
    "v2 local ignores its family": (
        v2(0x20, 0x11, addrs4("192.0.2.1", "192.0.2.2", 1, 2) + TLVS),
        ("LOCAL", None, None),
    ),
    "v2 unspec": (v2(0x21, 0x00, b""), ("PROXY", None, None)),
    "v2 unspec tlvs": (v2(0x21, 0x00, TLVS), ("PROXY", None, None)),
    "v2 unix": (v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") * 2), ("PROXY", None, None)),
}


def addresses(result):
    """A parse result with hosts as ip_address objects: text forms of one address differ."""
    if result is None:
        return None
    length, command, src, dst = result
    return (
        length,
        command,
        *((ipaddress.ip_address(a[0]), a[1]) if a else None for a in (src, dst)),
    )


def expected(header: bytes, result) -> tuple:
    return addresses((len(header), *result))


@pytest.mark.parametrize("name", VALID)
def test_known_good_header(name):
    header, result = VALID[name]
    assert addresses(parse(header)) == expected(header, result)
    # Bytes after the header are the client's own: the length stops before them.
    assert addresses(parse(header + PAYLOAD)) == expected(header, result)


@pytest.mark.parametrize("name", VALID)
def test_every_prefix_needs_more(name):
    header, result = VALID[name]
    for end in range(len(header)):
        assert parse(header[:end]) is None, end
    assert addresses(parse(header)) == expected(header, result)


@pytest.mark.parametrize("name", VALID)
def test_byte_at_a_time(name):
    """As a worker reads: one byte per read until the parser answers, never past the header."""
    header, result = VALID[name]
    stream = header + PAYLOAD
    received = b""
    answer = None
    while answer is None:
        received += stream[len(received) : len(received) + 1]
        answer = parse(received)
    assert len(received) == len(header)
    assert addresses(answer) == expected(header, result)


INVALID = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 65536\r\n",  # port out of range
    b"PROXY TCP4 192.0.2.1 198.51.100.2 056324 443\r\n",  # six digits
    b"PROXY TCP4 192.0.2.1 198.51.100.2 080 443\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.1 198.51.100.2 +80 443\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2  80 443\r\n",  # two spaces
    b"PROXY TCP4 192.0.2.1  198.51.100.2 80 443\r\n",
    b"PROXY TCP4 192.0.2 198.51.100.2 80 443\r\n",
    b"PROXY TCP4 192.0.2.256 198.51.100.2 80 443\r\n",
    b"PROXY TCP4 192.0.2.01 198.51.100.2 80 443\r\n",
    b"PROXY TCP4 192.0.2.1.1 198.51.100.2 80 443\r\n",
    b"PROXY TCP4 ::1 ::2 80 443\r\n",  # family and addresses disagree
    b"PROXY TCP6 192.0.2.1 198.51.100.2 80 443\r\n",
    b"PROXY TCP6 2001:db8:::1 ::2 80 443\r\n",
    b"PROXY TCP6 2001:db8::g ::2 80 443\r\n",
    b"PROXY TCP5 192.0.2.1 198.51.100.2 80 443\r\n",
    b"PROXY tcp4 192.0.2.1 198.51.100.2 80 443\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 80\r\n",  # missing field
    b"PROXY TCP4 192.0.2.1 198.51.100.2 80 443 1\r\n",  # extra field
    b"PROXY TCP4 192.0.2.1 198.51.100.2 80 443 \r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 80 443\rX",  # CR without LF
    b"PROXY TCP4 192.0.2.1 198.51.100.2 80 443\n",  # LF without CR
    b"PROXY TCP4\r\n",
    b"PROXY \r\n",
    b"PROXY UNK\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",  # 108 bytes
    b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
    b"PROXY UNKNOWN " + b"x" * 100,
    b"PROXY  TCP4 192.0.2.1 198.51.100.2 80 443\r\n",
    b"proxy TCP4 192.0.2.1 198.51.100.2 80 443\r\n",
    v2(0x11, 0x11, addrs4("192.0.2.1", "192.0.2.2", 1, 2)),  # version 1
    v2(0x31, 0x11, addrs4("192.0.2.1", "192.0.2.2", 1, 2)),  # version 3
    v2(0x22, 0x11, addrs4("192.0.2.1", "192.0.2.2", 1, 2)),  # command 2
    v2(0x21, 0x13, addrs4("192.0.2.1", "192.0.2.2", 1, 2)),  # transport 3
    v2(0x21, 0x41, addrs4("192.0.2.1", "192.0.2.2", 1, 2)),  # family 4
    v2(0x21, 0x01, b""),
    v2(0x21, 0x11, addrs4("192.0.2.1", "192.0.2.2", 1, 2)[:11]),  # too short for TCP4
    v2(0x21, 0x21, addrs6("::1", "::2", 1, 2)[:35]),
    v2(0x21, 0x31, b"\0" * 215),
    SIG[:11] + b"X" + b"\x21\x00\x00\x00",
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01",  # a TLS record
    b"\r\n\r\n",  # an HTTP-ish blank line is a prefix of the v2 signature, then not
    b"\r\n\r\n\r\n",
]


@pytest.mark.parametrize("data", INVALID)
def test_invalid_header_is_refused(data):
    with pytest.raises(ValueError):
        parse(data + PAYLOAD)


@pytest.mark.parametrize(
    "data",
    [
        b"G",
        b"\x16",
        b"\rX",
        b"PROXX",
        b"PROXY X",
        b"PROXY TCP7",
        b"PROXY UNKNOWN" + b"x",
        b"PROXY TCP4 1.2.3.x",
        b"PROXY TCP4 1.2.3.4 ::",
        b"PROXY TCP4 1111.",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 123456",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\r",
        SIG + b"\x11",
        SIG + b"\x23",
        SIG + b"\x21\x14",
        SIG + b"\x21\x11\x00\x0b",
    ],
)
def test_error_is_decided_early(data):
    """A prefix that no continuation can make valid is refused without waiting for more."""
    with pytest.raises(ValueError):
        parse(data)


def test_prefixes_of_the_signatures_need_more():
    assert parse(b"") is None
    for end in range(1, 7):
        assert parse(b"PROXY "[:end]) is None
    for end in range(1, 13):
        assert parse(SIG[:end]) is None


def test_v2_header_waits_for_all_its_tlvs():
    header = v2(0x21, 0x11, addrs4("192.0.2.1", "192.0.2.2", 1, 2) + b"\xee" * 1000)
    assert parse(header[:-1]) is None
    assert parse(header)[0] == len(header)


# ---- building ------------------------------------------------------------------------------------


def test_build_known_headers():
    assert build(1, ("192.0.2.1", 56324), ("198.51.100.2", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    )
    assert build(1, ("2001:db8::1", 0), ("::1", 65535)) == b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"
    assert build(1, None, None) == b"PROXY UNKNOWN\r\n"
    assert build(2, ("192.0.2.1", 56324), ("198.51.100.2", 443)) == VALID["v2 tcp4"][0]
    assert build(2, ("2001:db8::1", 40000), ("2001:db8::2", 8443)) == VALID["v2 tcp6"][0]
    assert build(2, None, None) == SIG + b"\x20\x00\x00\x00"


def test_build_longest_v1_line_fits():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = build(1, (full, 65535), (full, 65535))
    assert len(header) == 104
    assert parse(header)[0] == 104


@pytest.mark.parametrize("version", [1, 2])
def test_build_refuses_what_it_cannot_write(version):
    with pytest.raises(ValueError):
        build(version, ("192.0.2.1", 1), ("::1", 2))  # families differ
    with pytest.raises(ValueError):
        build(version, ("192.0.2.1", 1), None)
    header = build(version, ("192.0.2.1", 1), ("192.0.2.2", 2))
    # The output buffer ends at a guard page: writing past cap would crash.
    assert build(version, ("192.0.2.1", 1), ("192.0.2.2", 2), cap=len(header)) == header
    with pytest.raises(ValueError):
        build(version, ("192.0.2.1", 1), ("192.0.2.2", 2), cap=len(header) - 1)
    with pytest.raises(ValueError):
        build(version, None, None, cap=0)


def test_build_refuses_unknown_version():
    for version in (0, 3):
        with pytest.raises(ValueError):
            build(version, ("192.0.2.1", 1), ("192.0.2.2", 2))


ports = st.integers(0, 65535)
ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
endpoints = st.one_of(
    st.tuples(ipv4, ports, ipv4, ports),
    st.tuples(ipv6, ports, ipv6, ports),
)


@settings(max_examples=300, deadline=None)
@given(endpoints, st.sampled_from([1, 2]))
def test_build_then_parse_round_trips(ends, version):
    src, sport, dst, dport = ends
    header = build(version, (str(src), sport), (str(dst), dport))
    assert addresses(parse(header + PAYLOAD)) == (
        len(header),
        "PROXY",
        (src, sport),
        (dst, dport),
    )


# ---- a reference parser and random input ---------------------------------------------------------

V1_LINE = re.compile(
    rb"PROXY (TCP4|TCP6) ([0-9A-Fa-f:.]+) ([0-9A-Fa-f:.]+) (0|[1-9][0-9]{0,4}) "
    rb"(0|[1-9][0-9]{0,4})\r\n"
)
V1_UNKNOWN = re.compile(rb"PROXY UNKNOWN(?: [^\r]*)?\r\n")
V2_ADDRESS_BYTES = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}


def reference(data: bytes):
    """The complete, valid header at the start of data, or None: read from the specification
    with Python's own address parsing, independent of the compiled parser."""
    if data.startswith(SIG):
        if len(data) < 16:
            return None
        ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
        if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1 or len(data) < 16 + length:
            return None
        if ver_cmd & 0xF == 0:
            return (16 + length, "LOCAL", None, None)
        if family not in V2_ADDRESS_BYTES or length < V2_ADDRESS_BYTES[family]:
            return None
        body = data[16:]
        if family >> 4 == 1:
            src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        elif family >> 4 == 2:
            src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        else:
            return (16 + length, "PROXY", None, None)
        src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        return (16 + length, "PROXY", (src, sport), (dst, dport))
    unknown = V1_UNKNOWN.match(data)
    if unknown and unknown.end() <= 107:
        return (unknown.end(), "LOCAL", None, None)
    line = V1_LINE.match(data)
    if not line or line.end() > 107:
        return None
    kind = ipaddress.IPv4Address if line[1] == b"TCP4" else ipaddress.IPv6Address
    try:
        src, dst = kind(line[2].decode()), kind(line[3].decode())
    except ValueError:
        return None
    sport, dport = int(line[4]), int(line[5])
    if sport > 65535 or dport > 65535:
        return None
    return (line.end(), "PROXY", (src, sport), (dst, dport))


def check_against_reference(data: bytes, suffix: bytes = b"") -> None:
    try:
        answer = addresses(parse(data))
    except ValueError:
        answer = "error"
    want = reference(data)
    if want is not None:
        assert answer == want
    elif answer != "error":
        assert answer is None
        return
    # Errors and complete headers are final: more bytes change nothing.
    try:
        later = addresses(parse(data + suffix))
    except ValueError:
        later = "error"
    assert later == answer
    if answer != "error":
        length = answer[0]
        assert length <= len(data)
        assert addresses(parse(data[:length])) == answer
        assert parse(data[: length - 1]) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=20))
def test_random_bytes(data, suffix):
    check_against_reference(data, suffix)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"PROXY ", SIG]), st.binary(max_size=120), st.binary(max_size=20))
def test_random_bytes_after_a_signature(start, data, suffix):
    check_against_reference(start + data, suffix)


V1_ALPHABET = b"0123456789abcdefABCDEF.: \r\nPROXYTCP46UNKOW"


@st.composite
def mutated_headers(draw):
    """A valid header with a few bytes replaced, inserted or removed; for v1, mostly from the
    characters a v1 line is made of, so that many mutants stay valid or nearly so."""
    header, _ = draw(st.sampled_from(list(VALID.values())))
    data = bytearray(header + PAYLOAD)
    alphabet = V1_ALPHABET if header.startswith(b"P") else bytes(range(256))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        byte = draw(st.sampled_from(alphabet))
        if op == "replace" and data:
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        elif op == "delete" and data:
            del data[at]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


@settings(max_examples=1500, deadline=None)
@given(mutated_headers(), st.binary(max_size=20))
def test_mutated_headers(data, suffix):
    check_against_reference(data, suffix)


tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(endpoints, tlv_lists, st.booleans())
def test_v2_tlvs_are_skipped_exactly(ends, tlvs, local):
    src, sport, dst, dport = ends
    pack = addrs4 if src.version == 4 else addrs6
    family = 0x11 if src.version == 4 else 0x21
    blob = b"".join(tlv(kind, value) for kind, value in tlvs)
    header = v2(0x20 if local else 0x21, family, pack(str(src), str(dst), sport, dport) + blob)
    want = (
        (len(header), "LOCAL", None, None)
        if local
        else (
            len(header),
            "PROXY",
            (src, sport),
            (dst, dport),
        )
    )
    assert addresses(parse(header + PAYLOAD)) == want
    assert parse(header[:-1]) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_v2_any_bytes_after_the_addresses_are_skipped(blob):
    header = v2(0x21, 0x11, addrs4("192.0.2.1", "192.0.2.2", 1, 2) + blob)
    assert parse(header + PAYLOAD)[0] == len(header)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(VALID)), st.lists(st.integers(1, 40), min_size=1, max_size=60))
def test_random_segmentation(name, sizes):
    """Reads of random sizes: the answer comes with the first read that completes the header."""
    header, result = VALID[name]
    stream = header + PAYLOAD
    received = b""
    for size in sizes:
        received = stream[: len(received) + size]
        answer = parse(received)
        if len(received) < len(header):
            assert answer is None
        else:
            assert addresses(answer) == expected(header, result)
            return
