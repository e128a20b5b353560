"""Health-check probes of every kind, run inside the supervisor's selectors loop.

A check is one non-blocking TCP connection to the backend (or to ``CheckSpec.port``), a short
exchange driven by the selector's read and write events, and a :class:`CheckResult` passed to
``on_result(key, result)``. The whole check, connect included, has one deadline:
``CheckSpec.timeout``; a check past it fails with the reason ``"timeout"``. No check blocks,
starts a thread or a process. What results mean (rise, fall) is :mod:`fastlb.health.state`'s
business.

A backend of a pool that sends PROXY headers gets a LOCAL header first (v2, or v1's ``PROXY
UNKNOWN``), so that it sees a well-formed connection of the balancer's own rather than a
protocol error. Checks close their connection with a reset, as HAProxy's do, so that they leave
no TIME_WAIT sockets behind.

The kinds (``CheckSpec.type``):

``tcp``
    Passes when the connection is established.
``http``
    Sends ``METHOD PATH HTTP/1.1`` with ``Host`` (``CheckSpec.host``, else the address
    checked) and ``User-Agent: fastlb-check``; the reply is parsed with h11. Passes when the
    status is in one of the ``expect_status`` ranges and, when they are given, the body (its
    first 64 KiB) contains ``expect_body`` and matches ``expect_body_regex`` (searched in the
    body decoded as UTF-8). Reason: ``"HTTP 200"``. The connection is kept for the next check
    when the reply came whole and neither side asked to close (``CheckSpec.reuse_connection``;
    without it the request says ``Connection: close``).
``send-expect``
    Sends ``send``, then reads until the reply (its first 64 KiB) contains ``expect`` and
    matches ``expect_regex`` (a regular expression on bytes), whichever of them are given.
    With neither, it passes once ``send`` is sent.
``redis``
    Sends ``AUTH [username] password`` when a password is given, then ``PING``. Passes on
    ``+PONG`` (after ``+OK`` for AUTH); any other reply, such as ``-NOAUTH ...`` or
    ``-WRONGPASS ...``, fails with that reply as the reason.
``postgres``
    With ``ssl_request``: sends an SSLRequest and passes on the one-byte answer ``S`` or ``N``.
    Otherwise sends a StartupMessage (protocol 3.0, ``user``, ``database`` or else ``user``):
    an authentication request (``R``) or a protocol negotiation (``v``) passes; so does an
    ErrorResponse (``E``), since the server is up and speaking the protocol (a wrong user or
    database is a configuration matter), unless its SQLSTATE is of class 53 (insufficient
    resources: too many connections) or 57 (operator intervention: starting up, shutting
    down), which mean that the server turns clients away. Reason: ``"postgres error: MESSAGE
    (SQLSTATE)"``.
``mysql``
    Reads the server's greeting: a packet of sequence number 0 whose protocol version is 10
    passes (reason ``"mysql VERSION"``); an error packet fails with its message (e.g. ``Host
    ... is blocked``). Nothing is sent: MySQL counts such a connection in ``Aborted_connects``.
``tls``
    Passes when a TLS handshake completes (no certificate verification; ``sni`` is sent as the
    server name when given). Reason: the protocol version, e.g. ``"TLSv1.3"``.
``agent``
    HAProxy's agent check: sends ``send`` when given, reads one line (up to ``\\n`` or the end
    of the stream, at most 1 KiB) of words separated by spaces, tabs or commas, in any case:
    ``up``, ``ready``, ``drain``, ``maint``, ``down`` / ``failed`` / ``fail`` / ``stopped``
    (all four: ``"down"``), optionally followed by ``#`` and a description, and ``N%`` (a
    weight, 0 to 256 percent of the configured weight). Other words (``maxconn:N``) are
    ignored. Fails when the state is down or the line has neither a state nor a weight;
    ``agent_state`` is the last state word, ``agent_weight`` the last weight. The agent is on
    ``CheckSpec.port`` (the configuration requires one; this module falls back to the
    backend's port).
``dns``
    Sends a DNS query for ``CheckSpec.query`` (type A, class IN, recursion desired) and passes
    when the answer with the query's id has the response code ``CheckSpec.rcode`` (reason:
    ``"DNS NOERROR"``). Only the 12-byte header of the answer is read, so no DNS library is
    needed.

The checks of a pool behind a UDP frontend (``send-expect`` and ``dns``) use a connected UDP
socket instead: ``send`` goes out as one datagram, and each datagram back is fed to the
conversation until one matches or the check times out; a port unreachable answer fails it at
once (``"refused"``).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import random
import re
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import h11

from fastlb.model import DNS_RCODES, Address, CheckSpec

log = logging.getLogger("fastlb.health")

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A PROXY header announcing a connection of the balancer's own (no client behind it).
LOCAL_HEADERS = {
    "v1": b"PROXY UNKNOWN\r\n",
    "v2": PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00",  # version 2, LOCAL; UNSPEC; no address
}

MAX_REPLY = 65536  # bytes of a reply read at most: an HTTP body, a send-expect answer
MAX_AGENT_LINE = 1024
MAX_REASON = 200  # characters of a server's message kept in a reason
RECV_SIZE = 65536
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset

ERRNO_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.ETIMEDOUT: "timeout",
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    duration: float  # seconds from the start of the check to its result
    reason: str  # short, for logs and /stats: "HTTP 200", "timeout", "refused", "+PONG", ...
    agent_state: str | None = None  # agent checks: "up", "ready", "down", "drain" or "maint"
    agent_weight: int | None = None  # agent checks: "N%" gives N, 0 to 256


class Verdict(NamedTuple):
    """What a conversation concludes; the checker adds the duration to make a CheckResult."""

    ok: bool
    reason: str
    agent_state: str | None = None
    agent_weight: int | None = None


def _passed(reason: str) -> Verdict:
    return Verdict(True, reason)


def _failed(reason: str) -> Verdict:
    return Verdict(False, reason)


def _errno_reason(code: int | None) -> str:
    return ERRNO_REASONS.get(code, os.strerror(code) if code else "error")


def _text(data: bytes) -> str:
    """A server's message, printable and short, for a reason."""
    return data.decode("utf-8", "replace").strip()[:MAX_REASON]


# ---- conversations: what is said on a connected socket, with no I/O of their own -------------


class Conversation:
    """The exchange of one kind of check once connected. ``opening`` is what is sent first;
    ``sent`` is called each time everything there was to send has gone; ``feed`` gets what is
    read (``b""`` at the end of the stream, where it must come to a verdict); ``more`` is what
    to send after a ``feed``. A :class:`Verdict` ends the check."""

    def opening(self) -> bytes:
        return b""

    def sent(self) -> Verdict | None:
        return None

    def feed(self, data: bytes) -> Verdict | None:
        return _failed("unexpected data")

    def more(self) -> bytes:
        return b""


CONNECTED = _passed("connected")


class Connect(Conversation):
    def sent(self) -> Verdict | None:
        return CONNECTED


END_OF_MESSAGE = h11.EndOfMessage()


class HttpPlan:
    """What every http check of one backend shares, made once: the request, its bytes as h11
    writes them, and what the reply must show."""

    __slots__ = ("request", "wire", "expect_status", "expect_body", "body_regex", "reuse")

    def __init__(self, spec: CheckSpec, target: Address):
        self.reuse = spec.reuse_connection
        headers = [("Host", spec.host or str(target)), ("User-Agent", "fastlb-check")]
        if not self.reuse:
            headers.append(("Connection", "close"))
        try:
            self.request = h11.Request(method=spec.method, target=spec.path, headers=headers)
        except h11.LocalProtocolError as exc:
            raise ValueError(f"invalid HTTP request: {exc}") from None
        writer = h11.Connection(h11.CLIENT)
        self.wire = writer.send(self.request) + writer.send(END_OF_MESSAGE)
        self.expect_status = spec.expect_status
        self.expect_body = spec.expect_body.encode() if spec.expect_body is not None else None
        self.body_regex = (
            re.compile(spec.expect_body_regex) if spec.expect_body_regex is not None else None
        )


class HttpRequest(Conversation):
    """An http check; with ``connection``, the h11 state of a kept connection whose last
    exchange ended cleanly, for the next request on it."""

    def __init__(self, plan: HttpPlan, connection: h11.Connection | None = None):
        self.plan = plan
        # h11 frames a response by the request it answers (HEAD has no body), and takes one only
        # once it has seen that request go: it is told so (the bytes sent are the plan's). Its
        # end of message is only needed to keep the connection: a server may answer before it.
        if connection is None:
            connection = h11.Connection(h11.CLIENT)
        else:
            connection.start_next_cycle()
        connection.send(plan.request)
        if plan.reuse:
            connection.send(END_OF_MESSAGE)
        self.connection = connection
        self.status: int | None = None
        self.body = bytearray()
        self.received = False
        self.reusable = False  # the exchange ended cleanly and both sides keep the connection

    def opening(self) -> bytes:
        return self.plan.wire

    def feed(self, data: bytes) -> Verdict | None:
        if data:
            self.received = True
        elif not self.received:
            return _failed("closed before reply")
        plan = self.plan
        try:
            self.connection.receive_data(data)
            while True:
                event = self.connection.next_event()
                if event is h11.NEED_DATA:
                    return None
                if type(event) is h11.Response:
                    self.status = event.status_code
                    if not any(low <= self.status <= high for low, high in plan.expect_status):
                        return _failed(f"HTTP {self.status}")
                    if plan.expect_body is None and plan.body_regex is None:
                        self.reusable = plan.reuse and self.ends_in_buffer()
                        return _passed(f"HTTP {self.status}")  # the body is not waited for
                elif type(event) is h11.Data:
                    self.body += event.data[: MAX_REPLY - len(self.body)]
                    early = plan.body_regex is None and plan.expect_body is not None
                    if early and plan.expect_body in self.body:
                        return _passed(f"HTTP {self.status}")
                    if len(self.body) >= MAX_REPLY:
                        return self.judge_body()
                elif type(event) is h11.EndOfMessage or type(event) is h11.ConnectionClosed:
                    if self.status is None:
                        return _failed("closed before reply")
                    self.reusable = plan.reuse and self.kept_alive()
                    return self.judge_body()
                # An InformationalResponse (1xx): the final one follows.
        except h11.RemoteProtocolError as exc:
            return _failed(f"bad HTTP reply: {exc}"[:MAX_REASON])

    def ends_in_buffer(self) -> bool:
        """Whether the rest of the reply has already arrived (its body is skipped): a reply
        still coming when the verdict is known leaves the connection unusable."""
        try:
            while True:
                event = self.connection.next_event()
                if type(event) is h11.EndOfMessage:
                    return self.kept_alive()
                if type(event) is not h11.Data:
                    return False
        except h11.RemoteProtocolError:
            return False

    def kept_alive(self) -> bool:
        return self.connection.our_state is h11.DONE and self.connection.their_state is h11.DONE

    def judge_body(self) -> Verdict:
        plan = self.plan
        matches = (plan.expect_body is None or plan.expect_body in self.body) and (
            plan.body_regex is None
            or plan.body_regex.search(self.body.decode("utf-8", "replace")) is not None
        )
        if matches:
            return _passed(f"HTTP {self.status}")
        return _failed(f"HTTP {self.status}, body does not match")


class SendExpect(Conversation):
    def __init__(self, spec: CheckSpec):
        self.payload = spec.send
        self.expect = spec.expect
        self.regex = (
            re.compile(spec.expect_regex.encode()) if spec.expect_regex is not None else None
        )
        self.reply = bytearray()

    def opening(self) -> bytes:
        return self.payload

    def sent(self) -> Verdict | None:
        if self.expect is None and self.regex is None:
            return _passed("sent")
        return None

    def feed(self, data: bytes) -> Verdict | None:
        self.reply += data[: MAX_REPLY - len(self.reply)]
        if (self.expect is None or self.expect in self.reply) and (
            self.regex is None or self.regex.search(self.reply) is not None
        ):
            return _passed("reply matches")
        if not data:
            return _failed(f"closed after {len(self.reply)} bytes, no match")
        if len(self.reply) >= MAX_REPLY:
            return _failed(f"no match in {MAX_REPLY} bytes")
        return None


DNS_FLAGS_QUERY = 0x0100  # a standard query, recursion desired
DNS_QTYPE_A = 1
DNS_CLASS_IN = 1


def dns_query(name: str, ident: int) -> bytes:
    """A DNS query message (RFC 1035 4.1) for the A records of ``name``."""
    header = struct.pack("!HHHHHH", ident, DNS_FLAGS_QUERY, 1, 0, 0, 0)
    labels = [label.encode("ascii") for label in name.rstrip(".").split(".") if label]
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return header + qname + struct.pack("!HH", DNS_QTYPE_A, DNS_CLASS_IN)


class DnsQuery(Conversation):
    def __init__(self, spec: CheckSpec):
        self.ident = random.getrandbits(16)
        self.query = dns_query(spec.query or ".", self.ident)
        self.expect = spec.rcode

    def opening(self) -> bytes:
        return self.query

    def feed(self, data: bytes) -> Verdict | None:
        if len(data) < 12:
            return _failed(f"not a DNS answer ({len(data)} bytes)")
        ident, flags = struct.unpack_from("!HH", data)
        if ident != self.ident or not flags & 0x8000:
            return None  # not the answer to this query: wait for it
        code = flags & 0xF
        rcode = DNS_RCODES[code] if code < len(DNS_RCODES) else f"rcode {code}"
        verdict = _passed if rcode == self.expect else _failed
        return verdict(f"DNS {rcode}")


def _resp_command(*words: str) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisPing(Conversation):
    def __init__(self, spec: CheckSpec):
        self.request = _resp_command("PING")
        self.authenticating = spec.password is not None
        if self.authenticating:
            credentials = (spec.username, spec.password) if spec.username else (spec.password,)
            # Pipelined: the server answers AUTH, then PING.
            self.request = _resp_command("AUTH", *credentials) + self.request
        self.buffer = bytearray()

    def opening(self) -> bytes:
        return self.request

    def feed(self, data: bytes) -> Verdict | None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n")) >= 0:
            line = _text(self.buffer[:end])
            del self.buffer[: end + 2]
            if not self.authenticating:
                return Verdict(line == "+PONG", line)
            if line != "+OK":
                return _failed(line)
            self.authenticating = False
        if not data:
            return _failed("closed")
        if len(self.buffer) > MAX_REASON:
            return _failed("bad redis reply")
        return None


POSTGRES_SSL_REQUEST = struct.pack("!II", 8, 80877103)
POSTGRES_PROTOCOL_3 = 3 << 16
# SQLSTATE classes of a server that turns clients away: insufficient resources (53300: too many
# connections), operator intervention (57P01..57P03: shutting down, starting up).
POSTGRES_UNAVAILABLE_CLASSES = ("53", "57")


class PostgresHello(Conversation):
    def __init__(self, spec: CheckSpec):
        self.ssl_request = spec.ssl_request
        if spec.ssl_request:
            self.request = POSTGRES_SSL_REQUEST
        else:
            database = spec.database or spec.user
            parameters = b"user\0%s\0database\0%s\0\0" % (spec.user.encode(), database.encode())
            body = struct.pack("!I", POSTGRES_PROTOCOL_3) + parameters
            self.request = struct.pack("!I", 4 + len(body)) + body
        self.reply = bytearray()

    def opening(self) -> bytes:
        return self.request

    def feed(self, data: bytes) -> Verdict | None:
        self.reply += data
        if self.ssl_request:
            if not self.reply:
                return _failed("closed")
            answer = bytes(self.reply[:1])
            if answer in (b"S", b"N"):
                return _passed(f"postgres SSLRequest: {answer.decode()}")
            return _failed(f"postgres: unexpected answer {answer!r} to SSLRequest")
        if len(self.reply) >= 5:
            kind = bytes(self.reply[:1])
            (length,) = struct.unpack_from("!I", self.reply, 1)
            if kind not in (b"R", b"E", b"v") or not 4 <= length <= MAX_REPLY:
                return _failed(f"postgres: unexpected message {kind!r}")
            if len(self.reply) >= 1 + length:
                return self.judge(kind, bytes(self.reply[5 : 1 + length]))
        return _failed("closed") if not data else None

    def judge(self, kind: bytes, body: bytes) -> Verdict:
        if kind == b"R":
            if body[:4] == b"\0\0\0\0":
                return _passed("postgres: authentication ok")
            return _passed("postgres: authentication request")
        if kind == b"v":
            return _passed("postgres: protocol negotiation")
        # ErrorResponse: fields of a type byte and a NUL-terminated string.
        fields = {field[:1]: field[1:] for field in body.split(b"\0") if field}
        sqlstate = fields.get(b"C", b"").decode("ascii", "replace")
        message = _text(fields.get(b"M", b""))
        ok = not sqlstate.startswith(POSTGRES_UNAVAILABLE_CLASSES)
        return Verdict(ok, f"postgres error: {message} ({sqlstate})")


MYSQL_PROTOCOL_10 = 10
MYSQL_ERROR_PACKET = 0xFF


class MysqlGreeting(Conversation):
    def __init__(self):
        self.reply = bytearray()

    def feed(self, data: bytes) -> Verdict | None:
        self.reply += data
        if len(self.reply) >= 4:
            length = int.from_bytes(self.reply[:3], "little")
            if self.reply[3] != 0 or not 0 < length <= MAX_REPLY:
                return _failed("mysql: bad greeting")
            if len(self.reply) >= 4 + length:
                return self.judge(bytes(self.reply[4 : 4 + length]))
        return _failed("no greeting") if not data else None

    def judge(self, payload: bytes) -> Verdict:
        if payload[0] == MYSQL_PROTOCOL_10:
            version = payload[1:].partition(b"\0")[0]
            return _passed(f"mysql {_text(version)}")
        if payload[0] == MYSQL_ERROR_PACKET and len(payload) >= 3:
            code = int.from_bytes(payload[1:3], "little")
            message = payload[3:]
            if message.startswith(b"#"):  # a SQL state marker and the 5-character state
                message = message[6:]
            return _failed(f"mysql error {code}: {_text(message)}")
        return _failed(f"mysql: unsupported protocol {payload[0]}")


class TlsHandshake(Conversation):
    """A client handshake over memory buffers: the plain socket carries their bytes."""

    def __init__(self, context: ssl.SSLContext, spec: CheckSpec):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=spec.sni)

    def step(self) -> Verdict | None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLError as exc:
            return _failed(f"tls: {exc.reason or exc}"[:MAX_REASON])
        return _passed(self.tls.version() or "tls")

    def opening(self) -> bytes:
        self.step()  # writes the ClientHello and wants the server's answer
        return self.outgoing.read()

    def feed(self, data: bytes) -> Verdict | None:
        if not data:
            return _failed("closed during handshake")
        self.incoming.write(data)
        return self.step()

    def more(self) -> bytes:
        return self.outgoing.read()


AGENT_STATES = {
    "up": "up",
    "ready": "ready",
    "drain": "drain",
    "maint": "maint",
    "down": "down",
    "failed": "down",
    "fail": "down",
    "stopped": "down",
}
MAX_AGENT_WEIGHT = 256
AGENT_SEPARATORS = re.compile(r"[\s,]+")


def parse_agent_reply(line: str) -> Verdict:
    """The result of an agent's reply line (see the module's docstring)."""
    words, _, _description = line.partition("#")
    state = weight = None
    for word in AGENT_SEPARATORS.split(words.strip().lower()):
        if word in AGENT_STATES:
            state = AGENT_STATES[word]
        elif word.endswith("%") and word[:-1].isascii() and word[:-1].isdigit():
            if int(word[:-1]) <= MAX_AGENT_WEIGHT:
                weight = int(word[:-1])
    text = line.strip()[:MAX_REASON]
    if state is None and weight is None:
        return _failed(f"agent: no state or weight in {text!r}")
    return Verdict(state != "down", f"agent: {text}", state, weight)


class AgentLine(Conversation):
    def __init__(self, spec: CheckSpec):
        self.payload = spec.send
        self.line = bytearray()

    def opening(self) -> bytes:
        return self.payload

    def feed(self, data: bytes) -> Verdict | None:
        self.line += data
        end = self.line.find(b"\n")
        if end < 0 and data and len(self.line) < MAX_AGENT_LINE:
            return None
        text = self.line[:end] if end >= 0 else self.line[:MAX_AGENT_LINE]
        if not text.strip():
            return _failed("agent: empty reply")
        return parse_agent_reply(text.decode("ascii", "replace"))


# ---- the checker: sockets in the selector ------------------------------------------------------

SOCK_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
SOCK_DGRAM_NONBLOCK = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
CONNECT_PENDING = (errno.EINPROGRESS, errno.EAGAIN)


class CheckPlan:
    """What every check of one backend with one spec shares, made on its first check: the
    address connected to, the PROXY header and how to start a conversation."""

    __slots__ = (
        "spec",
        "address",
        "send_proxy",
        "target",
        "family",
        "sockaddr",
        "header",
        "start",
        "reuse",
    )

    def __init__(self, checker: Checker, spec: CheckSpec, address: Address, send_proxy: str | None):
        self.spec = spec
        self.address = address
        self.send_proxy = send_proxy
        port = spec.port or address.port
        self.target = address if port == address.port else Address(address.host, port)
        self.family = socket.AF_INET6 if self.target.ipv6 else socket.AF_INET
        self.sockaddr = (self.target.host, port)
        self.header = LOCAL_HEADERS[send_proxy] if send_proxy else b""
        self.start: Callable[..., Conversation] = checker.conversation_factory(spec, self.target)
        self.reuse = spec.type == "http" and spec.reuse_connection


class Probe:
    """One check in flight, or (``kept``) the open connection of a passed http check, waiting
    for the next check of its backend, which takes it over."""

    __slots__ = (
        "key",
        "target",
        "sock",
        "conversation",
        "outgoing",
        "started",
        "events",
        "callback",
        "connected",
        "done",
        "reused",
        "kept",
        "serial",
    )

    def __init__(self, key, target, sock, conversation, outgoing, started):
        self.key: int = key
        self.target: Address = target
        self.sock: socket.socket = sock
        self.conversation: Conversation = conversation
        self.outgoing: bytes = outgoing
        self.started: float = started
        self.events = 0  # those the selector watches; 0: not registered
        self.callback: Callable[[int], None] | None = None
        self.connected = False
        self.done = False
        self.reused = False  # on a connection kept from the previous check
        self.kept = False
        self.serial = 0  # that of its deadline in the heap: a kept probe's earlier ones are stale


class Checker:
    """Checks in flight, by key (a backend id); each result goes to ``on_result(key, result)``.

    The supervisor's loop calls the selector's callbacks (``key.data(mask)``), ``expire`` once
    it wakes, and sleeps no longer than ``next_deadline``.

    An http check that passed leaves its connection open (``CheckSpec.reuse_connection``) and
    the next check of that backend sends its request there: no connect, no close, no new
    registration with the selector, which is most of what a check costs. A kept connection
    the server closes is closed when that shows; a request on one that brings back nothing but
    its end or a reset is tried again at once on a new connection, as HTTP clients retry an
    idempotent request, and counts only as that second try.
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        on_result: Callable[[int, CheckResult], None],
    ):
        self.selector = selector
        self.on_result = on_result
        self.pending: dict[int, Probe] = {}
        self.plans: dict[int, CheckPlan] = {}
        # A heap of (deadline, serial, probe); those of finished checks stay until they surface,
        # as do those of earlier checks on a kept connection (their serial is not the probe's).
        self.deadlines: list[tuple[float, int, Probe]] = []
        self.serials = itertools.count()
        self.tls_context: ssl.SSLContext | None = None
        self.kept: dict[int, Probe] = {}

    def busy(self, key: int) -> bool:
        return key in self.pending

    def check(
        self,
        key: int,
        address: Address,
        spec: CheckSpec,
        send_proxy: str | None = None,
        udp: bool = False,
        started: float | None = None,
    ) -> None:
        """Starts a check of ``key`` (replacing one in flight), over UDP with ``udp``. Its
        result comes to
        ``on_result``, at once when it ends before it has to wait: it could not start, or it
        had nothing to wait for (a tcp check connected by the time ``connect()`` returned)."""
        probe = self.pending.get(key)
        if probe is not None:
            self.drop(probe)
        if started is None:
            started = time.monotonic()
        plan = self.plans.get(key)
        try:
            if (
                plan is None
                or plan.spec is not spec
                or plan.address is not address
                or plan.send_proxy != send_proxy
            ):
                self.close_kept(key)
                plan = self.plans[key] = CheckPlan(self, spec, address, send_proxy)
            kept = self.kept.pop(key, None)
            if kept is not None:
                self.check_on_kept(kept, plan, started)
                return
            conversation = plan.start()
            sock = socket.socket(plan.family, SOCK_DGRAM_NONBLOCK if udp else SOCK_STREAM_NONBLOCK)
        except (ValueError, re.error) as exc:  # a setting the configuration should have refused
            self.report(key, address, started, _failed(str(exc)))
            return
        except OSError as exc:  # e.g. no IPv6 on this host, or out of file descriptors
            self.report(key, address, started, _failed(_errno_reason(exc.errno)))
            return
        code = sock.connect_ex(plan.sockaddr)
        if code and code not in CONNECT_PENDING:
            sock.close()
            self.report(key, plan.target, started, _failed(_errno_reason(code)))
            return
        probe = Probe(
            key, plan.target, sock, conversation, plan.header + conversation.opening(), started
        )
        self.pending[key] = probe
        # On loopback or a near network the connection is often up by the time connect()
        # returns: the first send goes at once (it fails with EAGAIN while connecting), which
        # saves a turn of the loop, and the selector when a tcp check has nothing to wait for.
        self.on_event(probe, selectors.EVENT_WRITE)
        if not probe.done:
            self.set_deadline(probe, started + spec.timeout)

    def check_on_kept(self, probe: Probe, plan: CheckPlan, started: float) -> None:
        """The next check on a kept connection: the same probe, still registered for reading,
        so that it costs the selector nothing."""
        probe.conversation = plan.start(probe.conversation.connection)
        probe.outgoing = probe.conversation.opening()
        probe.started = started
        probe.done = probe.kept = False
        probe.reused = True
        self.pending[probe.key] = probe
        self.on_event(probe, selectors.EVENT_WRITE)
        if not probe.done:
            self.set_deadline(probe, started + plan.spec.timeout)

    def set_deadline(self, probe: Probe, deadline: float) -> None:
        probe.serial = next(self.serials)
        heapq.heappush(self.deadlines, (deadline, probe.serial, probe))

    def conversation_factory(self, spec: CheckSpec, target: Address) -> Callable[[], Conversation]:
        """What starts the conversation of a check of ``spec`` on ``target``."""
        kind = spec.type
        if kind == "tcp":
            return Connect
        if kind == "http":
            return partial(HttpRequest, HttpPlan(spec, target))
        if kind == "send-expect":
            return partial(SendExpect, spec)
        if kind == "redis":
            return partial(RedisPing, spec)
        if kind == "postgres":
            return partial(PostgresHello, spec)
        if kind == "mysql":
            return MysqlGreeting
        if kind == "tls":
            return partial(TlsHandshake, self.client_tls_context(), spec)
        if kind == "agent":
            return partial(AgentLine, spec)
        if kind == "dns":
            return partial(DnsQuery, spec)
        raise ValueError(f"unknown check type {kind!r}")

    def client_tls_context(self) -> ssl.SSLContext:
        # Made once: building a context loads OpenSSL's defaults, which is slow.
        if self.tls_context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self.tls_context = context
        return self.tls_context

    def on_event(self, probe: Probe, mask: int) -> None:
        if probe.done:
            if probe.kept:  # readable between checks: the server closed it, or spoke unasked
                self.close_kept(probe.key)
            return  # else finished by an earlier callback of the same turn
        try:
            result = self.advance(probe)
        except OSError as exc:  # a failed connect shows here, as the error of a send
            result = _failed(_errno_reason(exc.errno))
        if result is not None:
            self.finish(probe, result)

    def advance(self, probe: Probe) -> Verdict | None:
        if probe.outgoing or not probe.connected:
            return self.send(probe)
        try:
            data = probe.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        result = probe.conversation.feed(data)
        if result is not None:
            return result
        if not data:
            return _failed("closed")
        probe.outgoing = probe.conversation.more()
        return self.send(probe) if probe.outgoing else None

    def send(self, probe: Probe) -> Verdict | None:
        """Sends what is left to send (with nothing, it only asks whether the connection is
        up); once it has all gone, the conversation says what next."""
        outgoing = probe.outgoing
        try:
            sent = probe.sock.send(outgoing)
        except BlockingIOError:  # still connecting, or no room yet
            self.watch(probe, selectors.EVENT_WRITE)
            return None
        probe.connected = True
        if sent < len(outgoing):
            probe.outgoing = outgoing[sent:]
            self.watch(probe, selectors.EVENT_WRITE)
            return None
        probe.outgoing = b""
        result = probe.conversation.sent()
        if result is None:
            self.watch(probe, selectors.EVENT_READ)
        return result

    def watch(self, probe: Probe, events: int) -> None:
        if probe.events != events:
            if probe.events:
                self.selector.modify(probe.sock, events, probe.callback)
            else:  # made here: a check that has nothing to wait for never needs one
                probe.callback = partial(self.on_event, probe)
                self.selector.register(probe.sock, events, probe.callback)
            probe.events = events

    def finish(self, probe: Probe, verdict: Verdict) -> None:
        conversation = probe.conversation
        if verdict.ok and getattr(conversation, "reusable", False):
            self.keep(probe)
        else:
            self.drop(probe)
            if probe.reused and not conversation.received and verdict.reason != "timeout":
                plan = self.plans[probe.key]
                self.check(
                    probe.key, plan.address, plan.spec, plan.send_proxy, started=probe.started
                )
                return
        self.report(probe.key, probe.target, probe.started, verdict)

    def keep(self, probe: Probe) -> None:
        """Ends a passed check leaving its connection open, watched for the server's close."""
        probe.done = probe.kept = True
        del self.pending[probe.key]
        self.watch(probe, selectors.EVENT_READ)
        self.kept[probe.key] = probe

    def close_kept(self, key: int) -> None:
        probe = self.kept.pop(key, None)
        if probe is not None:
            self.selector.unregister(probe.sock)
            probe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            probe.sock.close()

    def drop(self, probe: Probe) -> None:
        probe.done = True
        del self.pending[probe.key]
        if probe.events:
            self.selector.unregister(probe.sock)
        if probe.connected:
            probe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        probe.sock.close()

    def report(self, key: int, target: Address, started: float, verdict: Verdict) -> None:
        duration = time.monotonic() - started
        result = CheckResult(verdict.ok, duration, verdict.reason, *verdict[2:])
        if not result.ok:
            log.debug("check of %s failed: %s", target, result.reason)
        self.on_result(key, result)

    def expire(self, now: float) -> None:
        """Fails the checks that ran out of time."""
        while self.deadlines:
            deadline, serial, probe = self.deadlines[0]
            live = not probe.done and serial == probe.serial
            if live and deadline > now:
                return
            heapq.heappop(self.deadlines)
            if live:
                self.finish(probe, _failed("timeout"))

    def next_deadline(self) -> float | None:
        while self.deadlines and (
            self.deadlines[0][2].done or self.deadlines[0][1] != self.deadlines[0][2].serial
        ):
            heapq.heappop(self.deadlines)
        return self.deadlines[0][0] if self.deadlines else None

    def cancel(self, key: int) -> None:
        """Drops the check in flight of ``key``, if any, without reporting it, and what was
        prepared for its checks."""
        self.plans.pop(key, None)
        self.close_kept(key)
        probe = self.pending.get(key)
        if probe is not None:
            self.drop(probe)

    def close(self) -> None:
        """Drops every check in flight without reporting it."""
        for probe in list(self.pending.values()):
            self.drop(probe)
        for key in list(self.kept):
            self.close_kept(key)
        self.deadlines.clear()
        self.plans.clear()

    def close_after_fork(self) -> None:
        """In a forked worker: closes the sockets, leaving the shared selector alone (and the
        sockets' options, which the supervisor's copies share)."""
        for probe in self.pending.values():
            probe.done = True
            probe.sock.close()
        for probe in self.kept.values():
            probe.sock.close()
        self.pending.clear()
        self.kept.clear()
        self.deadlines.clear()
        self.plans.clear()
