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


def parse_listen(text: str) -> Address:
    """HOST:PORT to bind; ``*`` or an empty host means every IPv4 address, port 0 a free port."""
    host, port = split_host_port(text)
    return resolve("0.0.0.0" if host in ("", "*") else host, parse_port(port, allow_zero=True))


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

    return parse


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

    return parse


def balance_factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not (value == 0 or 1 <= value < math.inf):
        raise ValueError("must be 0 (off) or at least 1")
    return value


class OneOf:
    """A name from a list that is read when parsing: compiled algorithms register themselves."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self.names = names

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
    name: str  # attribute of the model's Config, FrontendSpec or PoolSpec (as scope says)
    flag: str
    type: Any
    parse: Callable[[str], Any] | None  # None: a switch without a value
    default: Any  # a callable is called for the default at parse time
    help: str
    metavar: str | None = None
    many: bool = False  # may be repeated; the value is a tuple
    required: bool = False
    default_text: str | None = None  # how --help shows a computed default
    # Whose setting it is: the whole process, each frontend, or each pool (see fastlb.config).
    scope: str = field(kw_only=True)

    @property
    def key(self) -> str:
        """The name in the configuration file: the flag without its dashes."""
        return self.flag[2:]

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
            return "off"
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def value(self, raw: Any) -> Any:
        if self.is_switch:
            return bool(raw)
        if raw is None:
            return self.default() if callable(self.default) else self.default
        if self.many:
            if isinstance(raw, str):
                raw = [raw]
            return tuple(self._parse_one(text) for text in raw)
        return self._parse_one(raw)

    def _parse_one(self, text: str) -> Any:
        try:
            return self.parse(str(text))
        except ValueError as exc:
            raise ConfigError(f"{self.flag} {text}: {exc}") from None


def _cpu_count() -> int:
    return os.cpu_count() or 1


PROCESS, FRONTEND, POOL = "process", "frontend", "pool"

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
        "idle_timeout", "--idle-timeout", float, seconds(), 0.0,
        "close a connection that carried no bytes either way for this long; 0: never",
        metavar="S", scope=FRONTEND,
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
        "fall", "--fall", int, integer(1, 1000), 3,
        "consecutive failed connects (all workers together) or checks that mark a backend down",
        metavar="N", scope=POOL,
    ),
    Option(
        "rise", "--rise", int, integer(1, 1000), 2,
        "consecutive successful checks that bring a down backend back", metavar="N",
        scope=POOL,
    ),
    Option(
        "check_interval", "--check-interval", float, seconds(positive=True), 2.0,
        "time between two health checks (TCP connects) of a backend", metavar="S", scope=POOL,
    ),
    Option(
        "check_timeout", "--check-timeout", float, seconds(positive=True), 1.0,
        "a health check that has not connected after this long fails", metavar="S",
        scope=POOL,
    ),
    Option(
        "active_checks", "--check", bool, None, False,
        "check every backend every --check-interval; without it only backends marked down by "
        "failed connects are checked, until they rise",
        scope=POOL,
    ),
    Option(
        "drain_timeout", "--drain-timeout", float, seconds(), 30.0,
        "on SIGTERM or SIGINT, stop accepting and wait this long for open connections to "
        "finish before closing them",
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
        metavar="HOST:PORT", scope=PROCESS,
    ),
    Option(
        "log_level", "--log-level", str,
        one_of("debug", "info", "warning", "error"), "info",
        "least important messages to log (to stderr)", metavar="LEVEL", scope=PROCESS,
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
        "services; flags given here win over its top-level keys",
    )
    for option in OPTIONS:
        if option.is_switch:
            parser.add_argument(
                option.flag, dest=option.name, action="store_true", help=option.help_text()
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                metavar=option.metavar,
                action="append" if option.many else "store",
                help=option.help_text(),
            )


def max_connections(limit: int) -> int:
    """Connections one worker can hold with ``limit`` open files: two descriptors each."""
    return max(1, (limit - FD_RESERVE) // 2)
