"""Every setting of fastlb, declared once.

:data:`OPTIONS` is the table: for each setting its flag, type, default, parser (which validates),
help and scope: the whole process, each frontend or each pool. The command line of ``fastlb run``
and ``fastlb check``, their ``--help``, the keys of the configuration file and what ``fastlb
check`` prints are all made from it, and :mod:`fastlb.config` reads every value through it into
the frozen classes of :mod:`fastlb.model`; adding a setting means adding one row and its
attribute there.

Values arrive as the strings a user typed and are parsed here, so that every mistake becomes one
line naming the flag. Host names are resolved once, here: the data plane takes numeric IPs only.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastlb import _dataplane, model
from fastlb.errors import ConfigError

MAX_WEIGHT = 1_000_000  # x 100 (slow start, agent weights) is what the data plane takes
MAX_RETRIES = 15  # the data plane tries at most 16 backends for one connection
MAX_WORKERS = 1024
# Descriptors a worker needs besides two per connection: listener, control socket, epoll,
# signal pipe, standard streams and the pool of splice pipes it keeps.
FD_RESERVE = 160


# The model's classes under the short names the parsers give them.
Address = model.Address
Backend = model.BackendSpec


def address_family(address: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if address.ipv6 else socket.AF_INET


# ---- parsers: a string as typed -> a value, or ValueError with a message for the user ----------


def accepting(text: str) -> Callable[[Callable], Callable]:
    """Marks a parser with what it takes, in words, for the configuration reference."""

    def mark(parse: Callable) -> Callable:
        parse.accepts = text
        return parse

    return mark


def split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError("expected [IPV6]:PORT")
        return host, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("expected HOST:PORT")
    if ":" in host:
        raise ValueError("write an IPv6 address in brackets, as in [::1]:8000")
    return host, port


def parse_port(text: str, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ValueError(f"port must be a number, not {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be between {low} and 65535")
    return port


def resolve(host: str, port: int) -> Address:
    """The first address ``host`` resolves to (a numeric IP resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "invalid name"
        raise ValueError(f"cannot resolve {host!r}: {reason}") from None
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            if "%" in sockaddr[0]:
                raise ValueError("scoped IPv6 addresses (with %) are not supported")
            return Address(sockaddr[0], port)
    raise ValueError(f"{host!r} has no IPv4 or IPv6 address")


@accepting("HOST:PORT, [IPV6]:PORT or *:PORT; port 0: a free port")
def parse_listen(text: str) -> Address:
    """HOST:PORT to bind; ``*`` or an empty host means every IPv4 address, port 0 a free port."""
    host, port = split_host_port(text)
    return resolve("0.0.0.0" if host in ("", "*") else host, parse_port(port, allow_zero=True))


@accepting("a port, from 1 to 65535")
def backend_port(text: str) -> int:
    return parse_port(text, allow_zero=False)


@accepting("HOST:PORT[,weight=N][,backup]")
def parse_backend(text: str) -> Backend:
    """HOST:PORT[,weight=N][,backup]."""
    address, *extras = text.split(",")
    host, port = split_host_port(address)
    if not host:
        raise ValueError("missing host")
    weight, backup = 1, False
    for extra in extras:
        key, equals, value = extra.partition("=")
        if key == "weight" and equals:
            try:
                weight = integer(0, MAX_WEIGHT)(value)
            except ValueError as exc:
                raise ValueError(f"weight {exc}") from None
        elif extra == "backup":
            backup = True
        else:
            raise ValueError(f"unknown backend option {extra!r} (expected weight=N or backup)")
    return Backend(resolve(host, parse_port(port, allow_zero=False)), weight, backup)


@accepting("an IP network (127.0.0.0/8) or one address")
def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network in CIDR notation (127.0.0.0/8), or one address (a /32 or /128)."""
    if "%" in text:
        raise ValueError("scoped IPv6 addresses (with %) are not supported")
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        if "has host bits set" not in str(exc):
            raise ValueError("expected an IP address or a network, as in 127.0.0.0/8") from None
    address = text.partition("/")[0]
    network = ipaddress.ip_network(text, strict=False)
    raise ValueError(f"host bits are set: write {network} for the network, or {address} alone")


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(f"must be a whole number, not {text!r}") from None
        if value < low or (high is not None and value > high):
            most = "" if high is None else f" and at most {high}"
            raise ValueError(f"must be at least {low}{most}")
        return value

    limits = f"{low} or more" if high is None else f"from {low} to {high}"
    return accepting(f"a whole number, {limits}")(parse)


_TIME_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def seconds(positive: bool = False) -> Callable[[str], float]:
    """Seconds as a number, or with a unit: 250ms, 5s, 2m."""

    def parse(text: str) -> float:
        number, scale = text, 1.0
        for unit, factor in _TIME_UNITS.items():
            if text.endswith(unit) and text[: -len(unit)][-1:].isdigit():
                number, scale = text[: -len(unit)], factor
                break
        try:
            value = float(number) * scale
        except ValueError:
            raise ValueError("expected seconds, as in 5, 0.5, 250ms or 2m") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError("must be more than 0" if positive else "must be 0 or more")
        return value

    least = "more than 0" if positive else "0 or more"
    return accepting(f"seconds, {least}: 5, 0.5, 250ms, 2m")(parse)


@accepting("0 (off), or a number of at least 1")
def balance_factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not (value == 0 or 1 <= value < math.inf):
        raise ValueError("must be 0 (off) or at least 1")
    return value


@accepting("a share from 0 to 1: 0.5 or 50%")
def share(text: str) -> float:
    """A share from 0 to 1: a number (0.5) or a percentage (50%)."""
    number, percent = (text[:-1], True) if text.endswith("%") else (text, False)
    try:
        value = float(number) / (100 if percent else 1)
    except ValueError:
        raise ValueError("expected a share, as in 0.5 or 50%") from None
    if not 0 <= value <= 1:
        raise ValueError("must be from 0 to 1 (0% to 100%)")
    return value


@accepting("true or false")
def boolean(text: str) -> bool:
    if text in ("true", "false"):
        return text == "true"
    raise ValueError("must be true or false")


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, and "off" for None (to turn off what a default set)."""

    def parse_or_off(text: str) -> Any:
        return None if text == "off" else parse(text)

    return accepting(f"{parse.accepts}, or off")(parse_or_off)


_ESCAPES = {"\\": "\\", "r": "\r", "n": "\n", "t": "\t", "0": "\0"}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.?)", re.DOTALL)


@accepting("text, with the escapes \\r \\n \\t \\0 \\\\ \\xHH")
def escaped_bytes(text: str) -> bytes:
    """Text to send or expect, as bytes: UTF-8, with the escapes \\r \\n \\t \\0 \\\\ and \\xHH
    (as nginx's check_http_send)."""
    if not text:
        raise ValueError("must not be empty")
    value = bytearray()
    position = 0
    for match in _ESCAPE.finditer(text):
        value += text[position : match.start()].encode()
        code = match.group(1)
        if len(code) == 3:
            value.append(int(code[1:], 16))
        elif code in _ESCAPES:
            value += _ESCAPES[code].encode()
        else:
            raise ValueError(f"unknown escape \\{code}: use \\r, \\n, \\t, \\0, \\\\ or \\xHH")
        position = match.end()
    value += text[position:].encode()
    return bytes(value)


@accepting("hex digits, spaces allowed between bytes: 2a31 0d0a")
def hex_bytes(text: str) -> bytes:
    """Bytes as hex digits, with spaces allowed between bytes: ``2a31 0d0a``."""
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ValueError("expected pairs of hex digits, as in 2a310d0a") from None
    if not value:
        raise ValueError("must not be empty")
    return value


def show_bytes(value: bytes) -> str:
    """Bytes as :func:`escaped_bytes` reads them back; "off" for none."""
    if not value:
        return "off"
    named = {ord(v): f"\\{k}" for k, v in _ESCAPES.items()}
    return "".join(
        named.get(byte) or (chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}")
        for byte in value
    )


@accepting("a regular expression")
def regex(text: str) -> str:
    """A regular expression, matched against the bytes received."""
    try:
        re.compile(text.encode())
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return text


def text_without(forbidden: str, what: str) -> Callable[[str], str]:
    """Non-empty text with none of ``forbidden`` (and no control characters)."""

    def parse(text: str) -> str:
        if not text:
            raise ValueError("must not be empty")
        if any(char in forbidden or ord(char) < 0x20 or ord(char) == 0x7F for char in text):
            raise ValueError(what)
        return text

    return accepting("text without spaces" if " " in forbidden else "text")(parse)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token: a method name


@accepting("a method name: GET, HEAD")
def http_method(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise ValueError("expected a method name, as in GET or HEAD")
    return text


@accepting("a path starting with /")
def http_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must start with /")
    return text_without(" ", "no spaces or control characters; escape them as %20")(text)


_STATUS = re.compile(r"([1-5])xx|([1-5]\d\d)(?:-([1-5]\d\d))?")


@accepting("statuses (200), ranges (200-399) and classes (2xx), comma-separated")
def status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """HTTP statuses: comma-separated statuses (200), ranges (200-399) and classes (2xx)."""
    ranges = []
    for part in text.split(","):
        match = _STATUS.fullmatch(part.strip())
        if not match:
            raise ValueError(
                f"bad status range {part.strip()!r}: expected a status (200), a range (200-399) "
                "or a class (2xx), from 100 to 599"
            )
        hundreds, low, high = match.groups()
        if hundreds:
            ranges.append((int(hundreds) * 100, int(hundreds) * 100 + 99))
            continue
        if high is not None and int(high) < int(low):
            raise ValueError(f"bad status range {part.strip()!r}: it ends below its start")
        ranges.append((int(low), int(high or low)))
    return tuple(ranges)


def show_status_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@accepting("a host name: db.example.test")
def host_name(text: str) -> str:
    """A DNS host name (for TLS SNI): ASCII labels joined by dots."""
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("expected a host name, as in db.example.test (international: xn--)")
    return text


@accepting("a file name, or - for stderr")
def access_log_path(text: str) -> str:
    """A file to append to (made absolute, as the service may change directory), or -."""
    if text == "-":
        return text
    if not text:
        raise ValueError("expected a file name, or - for stderr")
    return os.path.abspath(text)


@accepting("a file name")
def file_path(text: str) -> str:
    """A file name, made absolute (the service may change directory)."""
    if not text:
        raise ValueError("expected a file name")
    return os.path.abspath(text)


@accepting("auto, or CPU numbers and ranges, as in 0-3,8")
def cpu_affinity(text: str) -> str:
    """auto, or a list of CPUs this process may run on."""
    if text == "auto":
        return text
    cpus = model.parse_cpu_list(text)
    allowed = os.sched_getaffinity(0)
    for cpu in cpus:
        if cpu not in allowed:
            usable = model.format_cpu_list(sorted(allowed))
            raise ValueError(f"CPU {cpu} is not one this process may run on ({usable})")
    return ",".join(part.strip() for part in text.split(","))


class OneOf:
    """A name from a list that is read when parsing: compiled algorithms register themselves."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self.names = names

    @property
    def accepts(self) -> str:
        return "one of: " + ", ".join(self.names())

    def __call__(self, text: str) -> str:
        known = list(self.names())
        if text not in known:
            raise ValueError(f"choose from {', '.join(known)}")
        return text


def one_of(*names: str) -> OneOf:
    return OneOf(lambda: names)


# ---- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    name: str  # the flag's argparse dest, and the key of the raw values config.load takes
    flag: str  # for a file-only option (command_line False), what its file key is made of
    type: Any
    parse: Callable[[str], Any] | None  # None: a switch without a value
    default: Any  # a callable is called for the default at parse time
    help: str
    metavar: str | None = None
    many: bool = False  # may be repeated; the value is a tuple
    required: bool = False
    default_text: str | None = None  # how --help shows a computed default
    # Whose setting it is: the whole process, each frontend, each pool, or each pool's check
    # (see fastlb.config).
    scope: str = field(kw_only=True)
    command_line: bool = field(default=True, kw_only=True)  # False: in the file only
    # The attribute of the model's class (Config, FrontendSpec, PoolSpec or CheckSpec) that
    # it sets; "": the name. Two options may set one attribute (send as text or as hex).
    attribute: str = field(default="", kw_only=True)
    table_key: str = field(default="", kw_only=True)  # its key in [pool.NAME.check]
    check_types: tuple[str, ...] = field(default=(), kw_only=True)  # (): every type
    joins_list: bool = field(default=False, kw_only=True)  # a list in the file is "a,b,c"
    display: Callable[[Any], str] | None = field(default=None, kw_only=True)
    none_text: str = field(default="off", kw_only=True)  # how None shows
    # A reload (SIGHUP) applies it: a new generation of workers starts with it. Only the stats
    # address waits for a restart.
    reload: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        if not self.attribute:
            object.__setattr__(self, "attribute", self.name)

    @property
    def key(self) -> str:
        """The name in the configuration file: the flag without its dashes."""
        return self.flag[2:]

    @property
    def label(self) -> str:
        """How messages name it: the flag, or the file key of a file-only option."""
        return self.flag if self.command_line else self.key

    @property
    def is_switch(self) -> bool:
        return self.parse is None

    def help_text(self) -> str:
        text = self.help
        if isinstance(self.parse, OneOf):
            text += f" (one of: {', '.join(self.parse.names())})"
        if self.required or self.is_switch:
            return text
        return f"{text} [default: {self.default_text or self.show(self.default)}]"

    def show(self, value: Any) -> str:
        if value is None:
            return self.none_text
        if self.display is not None:
            return self.display(value)
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def value(self, raw: Any, label: str | None = None) -> Any:
        """The value of raw text (a list of texts for ``many``); None: the default. Errors
        name ``label``, by default the option's."""
        if self.is_switch:
            return bool(raw)
        if raw is None:
            return self.default() if callable(self.default) else self.default
        if self.many:
            if isinstance(raw, str):
                raw = [raw]
            return tuple(self._parse_one(text, label) for text in raw)
        return self._parse_one(raw, label)

    def _parse_one(self, text: str, label: str | None) -> Any:
        try:
            return self.parse(str(text))
        except ValueError as exc:
            raise ConfigError(f"{label or self.label} {text}: {exc}") from None


def _cpu_count() -> int:
    return os.cpu_count() or 1


_CHECK = model.CheckSpec()  # the defaults of the check options

PROCESS, FRONTEND, POOL, CHECK = "process", "frontend", "pool", "check"

OPTIONS: tuple[Option, ...] = (
    Option(
        "listen", "--listen", tuple[Address, ...], parse_listen, (),
        "address to accept clients on, repeated for each; [::]:PORT for IPv6 (IPv6 only), "
        "*:PORT for all IPv4, port 0 for a free port",
        metavar="HOST:PORT", many=True, required=True, scope=FRONTEND,
    ),
    Option(
        "backends", "--backend", tuple[Backend, ...], parse_backend, (),
        "a backend server, repeated for each; weight=N (0 to 1000000, default 1) sets its share, "
        "backup makes it take traffic only while no other backend is up",
        metavar="HOST:PORT[,weight=N][,backup]", many=True, required=True, scope=POOL,
        reload=True,
    ),
    Option(
        "algorithm", "--algorithm", str, OneOf(_dataplane.algorithm_names), "roundrobin",
        "how each connection picks a backend", metavar="NAME", scope=POOL,
    ),
    Option(
        "workers", "--workers", int, integer(1, MAX_WORKERS), _cpu_count,
        "worker processes, each with its own listening socket", metavar="N",
        default_text="number of CPUs", scope=PROCESS,
    ),
    Option(
        "max_conn", "--max-conn", int, integer(1), 10000,
        "client connections per worker; lowered to fit the open-file limit", metavar="N",
        scope=FRONTEND,
    ),
    Option(
        "connect_timeout", "--connect-timeout", float, seconds(positive=True), 5.0,
        "give up connecting to a backend after this long and try another", metavar="S",
        scope=POOL,
    ),
    Option(
        "idle_timeout", "--idle-timeout", float, seconds(), 600.0,
        "close a connection that carried no bytes either way for this long; 0: never (10m is "
        "nginx stream's proxy_timeout; HAProxy has no default and warns)",
        metavar="S", default_text="10m", scope=FRONTEND,
    ),
    Option(
        "inspect_timeout", "--inspect-timeout", float, seconds(positive=True), 5.0,
        "close a connection whose PROXY header or TLS ClientHello is not complete after this "
        "long (only frontends that read one)",
        metavar="S", scope=FRONTEND,
    ),
    Option(
        "accept_proxy", "--accept-proxy", tuple[model.Network, ...], parse_network, (),
        "take a PROXY protocol header (v1 or v2) from clients in this network (127.0.0.0/8, or "
        "one address), repeated for each; its addresses then stand for the client",
        metavar="NETWORK", many=True, scope=FRONTEND,
    ),
    Option(
        "send_proxy", "--send-proxy", str | None, one_of(*model.SEND_PROXY_VERSIONS), None,
        "begin every connection to a backend with a PROXY protocol header of this version",
        metavar="VERSION", scope=POOL,
    ),
    Option(
        "retries", "--retries", int, integer(0, MAX_RETRIES), 2,
        "other backends to try when connecting to one fails", metavar="N", scope=POOL,
    ),
    Option(
        "observe", "--observe", str | None, optional(one_of("first-byte")), None,
        "passive checks of live traffic: with first-byte, a backend that sends nothing within "
        "--first-byte-timeout of a client's first bytes counts as a failed connect; off: none",
        metavar="WHAT", scope=POOL,
    ),
    Option(
        "first_byte_timeout", "--first-byte-timeout", float, seconds(positive=True), 10.0,
        "with --observe first-byte, how long a backend may take to answer", metavar="S",
        scope=POOL,
    ),
    Option(
        "on_down", "--on-down", str | None, optional(one_of("close")), None,
        "close: reset the open connections of a backend as it is marked down; off: they stay "
        "until they end",
        metavar="ACTION", scope=POOL,
    ),
    Option(
        "protocol", "--protocol", str, one_of(*model.PROTOCOLS), "tcp",
        "what the frontend forwards: tcp connections, or udp datagrams (by flows: a client "
        "address and port, and the backend picked for it)",
        metavar="PROTO", scope=FRONTEND,
    ),
    Option(
        "max_flows", "--max-flows", int, integer(1), 10000,
        "UDP flows per worker; a new flow beyond them ends the least recently used one",
        metavar="N", scope=FRONTEND,
    ),
    Option(
        "udp_idle_timeout", "--udp-idle-timeout", float, seconds(), 30.0,
        "end a UDP flow that carried no datagram either way for this long; 0: never",
        metavar="S", scope=POOL,
    ),
    Option(
        "udp_responses", "--udp-responses", int, integer(0), 0,
        "end a UDP flow once each of its client's datagrams got this many replies from the "
        "backend (1 for DNS, as nginx's proxy_responses); 0: only when idle",
        metavar="N", scope=POOL,
    ),
    Option(
        "slow_start", "--slow-start", float, seconds(), 0.0,
        "a backend that comes back up ramps its weight from 5% to full over this long; 0: off",
        metavar="S", scope=POOL,
    ),
    Option(
        "panic_threshold", "--panic-threshold", float, share, 0.5,
        "with fewer than this share of primaries up, send to every primary, down or not, "
        "rather than overload the few (0.5 or 50%); 0: never",
        metavar="SHARE", scope=POOL,
    ),
    # ---- the check of each pool: [pool.NAME.check]; flags and top-level keys are defaults ----
    Option(
        "check_type", "--check-type", str, one_of(*model.CHECK_TYPES), _CHECK.type,
        "what a health check does: connects (tcp), or speaks the backend's protocol",
        metavar="TYPE", scope=CHECK, attribute="type", table_key="type",
    ),
    Option(
        "active_checks", "--check", bool, None, _CHECK.active,
        "check every backend every --check-interval; without it only backends marked down by "
        "failed connects are checked, until they rise",
        scope=CHECK, attribute="active", table_key="active",
    ),
    Option(
        "check_interval", "--check-interval", float, seconds(positive=True), _CHECK.interval,
        "time between two health checks of a backend", metavar="S",
        scope=CHECK, attribute="interval", table_key="interval",
    ),
    Option(
        "check_fast_interval", "--check-fast-interval", float | None, seconds(positive=True),
        None, "time between checks while a backend is between up and down",
        none_text="the interval",
        scope=CHECK, command_line=False, attribute="fast_interval", table_key="fast-interval",
    ),
    Option(
        "check_down_interval", "--check-down-interval", float | None, seconds(positive=True),
        None, "time between checks of a backend that is down", none_text="the interval",
        scope=CHECK, command_line=False, attribute="down_interval", table_key="down-interval",
    ),
    Option(
        "check_timeout", "--check-timeout", float, seconds(positive=True), _CHECK.timeout,
        "a health check that has not passed after this long fails", metavar="S",
        scope=CHECK, attribute="timeout", table_key="timeout",
    ),
    Option(
        "rise", "--rise", int, integer(1, 1000), _CHECK.rise,
        "consecutive successful checks that bring a down backend back", metavar="N",
        scope=CHECK, table_key="rise",
    ),
    Option(
        "fall", "--fall", int, integer(1, 1000), _CHECK.fall,
        "consecutive failed connects (all workers together) or checks that mark a backend down",
        metavar="N", scope=CHECK, table_key="fall",
    ),
    Option(
        "check_jitter", "--check-jitter", float, seconds(), _CHECK.jitter,
        "start each check up to this much later, at random, so that checks spread out",
        scope=CHECK, command_line=False, attribute="jitter", table_key="jitter",
    ),
    Option(
        "check_port", "--check-port", int | None, backend_port, None,
        "check this port of each backend rather than the one traffic goes to",
        metavar="PORT", none_text="the backend's", scope=CHECK, attribute="port",
        table_key="port",
    ),
    Option(
        "check_method", "--check-method", str, http_method, _CHECK.method,
        "the method of an http check", scope=CHECK, command_line=False, attribute="method",
        table_key="method", check_types=("http",),
    ),
    Option(
        "check_path", "--check-path", str, http_path, _CHECK.path,
        "the path an http check asks for", metavar="PATH",
        scope=CHECK, attribute="path", table_key="path", check_types=("http",),
    ),
    Option(
        "check_host", "--check-host", str | None, text_without(" ", "no spaces"), None,
        "the Host header of an http check", metavar="HOST", none_text="the backend's address",
        scope=CHECK, attribute="host", table_key="host", check_types=("http",),
    ),
    Option(
        "check_expect_status", "--check-expect-status", tuple[tuple[int, int], ...],
        status_ranges, _CHECK.expect_status,
        "the statuses that pass an http check: 200, 200-399, 2xx, comma-separated",
        metavar="STATUSES", display=show_status_ranges, joins_list=True,
        scope=CHECK, attribute="expect_status", table_key="expect-status", check_types=("http",),
    ),
    Option(
        "check_expect_body", "--check-expect-body", str | None, text_without("", ""), None,
        "text the body of an http check's answer must contain",
        scope=CHECK, command_line=False, attribute="expect_body", table_key="expect-body",
        check_types=("http",),
    ),
    Option(
        "check_expect_body_regex", "--check-expect-body-regex", str | None, regex, None,
        "a regular expression the body of an http check's answer must match",
        scope=CHECK, command_line=False, attribute="expect_body_regex",
        table_key="expect-body-regex", check_types=("http",),
    ),
    Option(
        "check_send", "--check-send", bytes, escaped_bytes, _CHECK.send,
        "what a send-expect check sends (escapes: \\r \\n \\t \\0 \\\\ \\xHH)",
        metavar="TEXT", display=show_bytes, scope=CHECK, attribute="send", table_key="send",
        check_types=("send-expect",),
    ),
    Option(
        "check_send_hex", "--check-send-hex", bytes, hex_bytes, _CHECK.send,
        "what a send-expect check sends, as hex digits",
        display=show_bytes, scope=CHECK, command_line=False, attribute="send",
        table_key="send-hex", check_types=("send-expect",),
    ),
    Option(
        "check_expect", "--check-expect", bytes | None, escaped_bytes, None,
        "what the answer to a send-expect check must contain (escapes as --check-send)",
        metavar="TEXT", display=show_bytes, scope=CHECK, attribute="expect", table_key="expect",
        check_types=("send-expect",),
    ),
    Option(
        "check_expect_hex", "--check-expect-hex", bytes | None, hex_bytes, None,
        "what the answer to a send-expect check must contain, as hex digits",
        display=show_bytes, scope=CHECK, command_line=False, attribute="expect",
        table_key="expect-hex", check_types=("send-expect",),
    ),
    Option(
        "check_expect_regex", "--check-expect-regex", str | None, regex, None,
        "a regular expression the answer to a send-expect check must match",
        scope=CHECK, command_line=False, attribute="expect_regex", table_key="expect-regex",
        check_types=("send-expect",),
    ),
    Option(
        "check_username", "--check-username", str | None, text_without(" ", "no spaces"), None,
        "the user a redis check authenticates as (AUTH USERNAME PASSWORD)",
        scope=CHECK, command_line=False, attribute="username", table_key="username",
        check_types=("redis",),
    ),
    Option(
        "check_password", "--check-password", str | None, text_without("", ""), None,
        "the password of a redis check (AUTH)", display=lambda _: "(set)",
        scope=CHECK, command_line=False, attribute="password", table_key="password",
        check_types=("redis",),
    ),
    Option(
        "check_reuse_connection", "--check-reuse-connection", bool, boolean,
        _CHECK.reuse_connection,
        "an http check keeps its connection open for the next one (as Envoy's do); false: a new"
        " connection each time, closed after the reply",
        scope=CHECK, command_line=False, attribute="reuse_connection",
        table_key="reuse-connection", check_types=("http",),
    ),
    Option(
        "check_ssl_request", "--check-ssl-request", bool, boolean, _CHECK.ssl_request,
        "a postgres check sends an SSLRequest (any answer passes); false: a startup message",
        scope=CHECK, command_line=False, attribute="ssl_request", table_key="ssl-request",
        check_types=("postgres",),
    ),
    Option(
        "check_user", "--check-user", str, text_without("", ""), _CHECK.user,
        "the user of a postgres check's startup message",
        scope=CHECK, command_line=False, attribute="user", table_key="user",
        check_types=("postgres",),
    ),
    Option(
        "check_database", "--check-database", str | None, text_without("", ""), None,
        "the database of a postgres check's startup message", none_text="the user's",
        scope=CHECK, command_line=False, attribute="database", table_key="database",
        check_types=("postgres",),
    ),
    Option(
        "check_query", "--check-query", str | None, host_name, None,
        "the name a dns check asks for (an A query)", metavar="NAME",
        scope=CHECK, attribute="query", table_key="query",
        check_types=("dns",),
    ),
    Option(
        "check_rcode", "--check-rcode", str, one_of(*model.DNS_RCODES), _CHECK.rcode,
        "the response code a dns check expects",
        scope=CHECK, command_line=False, attribute="rcode", table_key="rcode",
        check_types=("dns",),
    ),
    Option(
        "check_sni", "--check-sni", str | None, host_name, None,
        "the server name a tls check sends in its ClientHello",
        scope=CHECK, command_line=False, attribute="sni", table_key="sni", check_types=("tls",),
    ),
    Option(
        "check_flap_window", "--check-flap-window", float, seconds(), _CHECK.flap_window,
        "a backend that falls within this long of rising is flapping; 0: off",
        scope=CHECK, command_line=False, attribute="flap_window", table_key="flap-window",
    ),
    Option(
        "check_flap_base", "--check-flap-base", float, seconds(positive=True), _CHECK.flap_base,
        "a flapping backend stays down this long times the flaps in a row",
        scope=CHECK, command_line=False, attribute="flap_base", table_key="flap-base",
    ),
    Option(
        "check_flap_max", "--check-flap-max", float, seconds(positive=True), _CHECK.flap_max,
        "the longest a flapping backend is kept down",
        scope=CHECK, command_line=False, attribute="flap_max", table_key="flap-max",
    ),
    Option(
        "drain_timeout", "--drain-timeout", float, seconds(), 30.0,
        "on SIGTERM or SIGINT, stop accepting and wait this long for open connections to "
        "finish before closing them",
        metavar="S", scope=PROCESS,
    ),
    Option(
        "orphan_timeout", "--orphan-timeout", float, seconds(), 10.0,
        "workers whose supervisor died (killed, or replaced by an upgrade) keep accepting this "
        "long for a new one on the same sockets, then drain",
        metavar="S", scope=PROCESS,
    ),
    Option(
        "buffer_size", "--buffer-size", int, integer(4096, 64 << 20), 65536,
        "bytes buffered in each direction of a connection", metavar="BYTES", scope=PROCESS,
    ),
    Option(
        "splice", "--splice", str, one_of("never", "always", "auto"), "auto",
        "forward with splice(2) inside the kernel; auto switches to it once a connection "
        "fills a whole buffer (bulk transfers)",
        metavar="MODE", scope=PROCESS,
    ),
    Option(
        "coalesce_us", "--coalesce-us", int, integer(0, 1000), 50,
        "while a worker churns through new connections near saturation, it sleeps this long on "
        "a timer when it has nothing to do, so that packets arriving meanwhile are handled in "
        "one batch rather than each waking it; idle or lightly loaded it never waits; 0: off",
        metavar="US", scope=PROCESS,
    ),
    Option(
        "cpu_affinity", "--cpu-affinity", str | None, optional(cpu_affinity), None,
        "pin each worker to one CPU, in turn from this list (auto: the CPUs fastlb may run "
        "on), wrapping around when there are more workers than CPUs; off: the kernel places "
        "them",
        metavar="CPUS", scope=PROCESS,
    ),
    Option(
        "hash_key", "--hash-key", str, one_of("src-ip", "src-ip-port"), "src-ip",
        "what the hashing algorithms hash of a client", metavar="KEY", scope=POOL,
    ),
    Option(
        "hash_balance_factor", "--hash-balance-factor", float, balance_factor, 0.0,
        "bounded-load hashing: no backend takes more than F times the average number of active "
        "connections; 0: off",
        metavar="F", scope=POOL,
    ),
    Option(
        "stats", "--stats", Address | None, parse_listen, None,
        "serve GET /stats (JSON) and GET /metrics (Prometheus) over HTTP on this address",
        metavar="HOST:PORT", scope=PROCESS, reload=False,
    ),
    Option(
        "log_level", "--log-level", str,
        one_of("debug", "info", "warning", "error"), "info",
        "least important messages to log (to stderr)", metavar="LEVEL", scope=PROCESS,
    ),
    Option(
        "access_log", "--access-log", str | None, access_log_path, None,
        "write one line per connection when it ends to this file (- for stderr); reopened on "
        "SIGUSR1, for logrotate",
        metavar="PATH", scope=PROCESS,
    ),
    Option(
        "access_log_format", "--access-log-format", str, one_of("text", "json"), "text",
        "the access log's lines: text (key=value) or json (one object per line)",
        metavar="FORMAT", scope=PROCESS,
    ),
    Option(
        "control", "--control", str | None, file_path, None,
        "serve the runtime control API (fastlb ctl) on a unix socket at this path, mode 0600, "
        "as in /run/fastlb/control.sock",
        metavar="PATH", scope=PROCESS,
    ),
    Option(
        "state_file", "--state-file", str | None, file_path, None,
        "journal runtime changes (fastlb ctl) and backend health to this file, as in "
        "/var/lib/fastlb/state.json, and apply it at start, so that they survive restarts",
        metavar="PATH", scope=PROCESS,
    ),
)  # fmt: skip

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def add_arguments(parser) -> None:
    """Adds every option to an argparse parser; values stay strings until
    :func:`fastlb.config.load`."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help='read settings from this TOML file: keys are the flag names (listen = "...", '
        'backend = ["...", ...]), [frontend.NAME] and [pool.NAME] tables describe several '
        "services, [pool.NAME.check] the health checks of each; flags given here win over its "
        "top-level keys",
    )
    for option in OPTIONS:
        if not option.command_line:
            continue
        text = option.help_text().replace("%", "%%")  # argparse formats help with %
        if option.is_switch:
            parser.add_argument(option.flag, dest=option.name, action="store_true", help=text)
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                metavar=option.metavar,
                action="append" if option.many else "store",
                help=text,
            )


def max_connections(limit: int) -> int:
    """Connections one worker can hold with ``limit`` open files: two descriptors each."""
    return max(1, (limit - FD_RESERVE) // 2)
