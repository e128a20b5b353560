"""What one fastlb serves, as frozen values: frontends (where clients arrive) and pools (where
they go), and the process-wide settings around them.

A :class:`Config` is made from the flags and the TOML file by :mod:`fastlb.config`; everything
else (the supervisor, the workers, ``fastlb check``) reads only this. The flat flags and the flat
file of earlier versions mean one frontend and one pool, both named ``default``.

Nothing here does I/O: addresses are numeric by the time they are put in these classes.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

DEFAULT = "default"  # the name of the frontend and the pool that flat flags describe

SEND_PROXY_VERSIONS = ("v1", "v2")
MAX_PEEK = 16384  # bytes a frontend may read before it picks (PROXY header, TLS ClientHello)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Address:
    """A numeric IP address and a port."""

    host: str
    port: int

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BackendSpec:
    """A backend server of a pool, as ``HOST:PORT[,weight=N][,backup]`` gives it."""

    address: Address
    weight: int = 1
    backup: bool = False

    def __str__(self) -> str:
        text = f"{self.address},weight={self.weight}"
        return text + ",backup" if self.backup else text


CHECK_TYPES = ("tcp", "http", "send-expect", "redis", "postgres", "mysql", "tls", "agent", "dns")
UDP_CHECK_TYPES = ("send-expect", "dns")  # the checks of a pool behind a UDP frontend
PROTOCOLS = ("tcp", "udp")
# DNS response codes a dns check may expect (RFC 1035 and 2136), by name.
DNS_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


@dataclass(frozen=True)
class CheckSpec:
    """How a pool's backends are checked: ``[pool.NAME.check]``, or the ``--check-*`` flags."""

    type: str = "tcp"  # one of CHECK_TYPES
    active: bool = False  # check every backend; otherwise only those marked down, until they rise
    interval: float = 2.0  # between two checks of a backend
    fast_interval: float | None = None  # while a change of state is pending; None: interval
    down_interval: float | None = None  # while down; None: interval
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    jitter: float = 0.0  # seconds: each check starts up to this much later, at random
    port: int | None = None  # check this port rather than the backend's
    # http
    method: str = "GET"
    path: str = "/"
    host: str | None = None  # the Host header; None: the backend's address
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)  # inclusive ranges
    expect_body: str | None = None  # a substring the body must contain
    expect_body_regex: str | None = None
    reuse_connection: bool = True  # keep the connection open for the next check (HTTP keep-alive)
    # send-expect (tcp payloads) and the http/redis/... bodies are bytes on the wire
    send: bytes = b""
    expect: bytes | None = None  # a substring of the reply (given as text or hex)
    expect_regex: str | None = None
    # redis
    username: str | None = None
    password: str | None = None
    # postgres
    ssl_request: bool = True  # send an SSLRequest (any S/N answer is healthy), else a startup
    user: str = "fastlb"
    database: str | None = None
    # tls
    sni: str | None = None
    # dns: an A query for this name, answered with this response code
    query: str | None = None
    rcode: str = "NOERROR"
    # flap damping: a fall within flap_window of the last rise keeps the backend out for
    # flap_base x the flaps in a row, at most flap_max
    flap_window: float = 0.0  # 0: off
    flap_base: float = 10.0
    flap_max: float = 300.0


@dataclass(frozen=True)
class PoolSpec:
    """Where connections go: backends, how one is picked, how they are connected and checked."""

    name: str
    backends: tuple[BackendSpec, ...]
    algorithm: str = "roundrobin"
    hash_key: str = "src-ip"
    hash_balance_factor: float = 0.0
    retries: int = 2
    connect_timeout: float = 5.0
    send_proxy: str | None = None  # "v1" or "v2": a PROXY header first on every connection
    check: CheckSpec = CheckSpec()
    observe: str | None = None  # "first-byte": no reply in first_byte_timeout is a failure
    first_byte_timeout: float = 10.0
    on_down: str | None = None  # "close": reset the connections of a backend marked down
    slow_start: float = 0.0  # seconds over which a backend that comes back ramps its weight
    panic_threshold: float = 0.5  # fewer primaries up than this share: use all primaries
    udp_idle_timeout: float = 30.0  # a UDP flow that carried nothing this long ends; 0: never
    udp_responses: int = 0  # replies per client datagram, then a UDP flow ends (1: DNS); 0: off
    protocol: str = "tcp"  # that of the frontends routing here (not a setting of its own)


@dataclass(frozen=True)
class SniRoute:
    """``pattern`` is a lower-case host name, or ``*.suffix``: any name ending in ``.suffix``."""

    pattern: str
    pool: str

    @property
    def wildcard(self) -> bool:
        return self.pattern.startswith("*.")


@dataclass(frozen=True)
class FrontendSpec:
    """Where clients arrive: addresses, the default pool, and what is read before picking."""

    name: str
    listen: tuple[Address, ...]
    pool: str  # the default route
    sni: tuple[SniRoute, ...] = ()
    sni_required: bool = False  # close a connection that no SNI route matches
    accept_proxy: tuple[Network, ...] = ()
    max_conn: int = 10000  # per worker
    idle_timeout: float = 600.0  # nginx stream's proxy_timeout; 0: off
    inspect_timeout: float = 5.0
    protocol: str = "tcp"  # one of PROTOCOLS; udp forwards datagrams by flows
    max_flows: int = 10000  # UDP flows per worker; the oldest is evicted beyond

    @property
    def peeks(self) -> bool:
        """Whether a new connection is read from before a backend is picked."""
        return bool(self.sni or self.accept_proxy)

    def pools(self) -> list[str]:
        """Every pool this frontend can route to: the default first."""
        names = [self.pool]
        for route in self.sni:
            if route.pool not in names:
                names.append(route.pool)
        return names


@dataclass(frozen=True)
class Config:
    frontends: tuple[FrontendSpec, ...]
    pools: tuple[PoolSpec, ...]
    workers: int = 1
    stats: Address | None = None
    drain_timeout: float = 30.0
    orphan_timeout: float = 10.0  # workers whose supervisor died serve this long for a successor
    buffer_size: int = 65536
    splice: str = "auto"
    coalesce_us: int = 50  # see the Option's help in settings.py
    cpu_affinity: str | None = None  # "auto" or a CPU list (0-3,8): see worker_cpu
    log_level: str = "info"
    access_log: str | None = None  # a file, or - for stderr
    access_log_format: str = "text"
    control: str | None = None  # the control socket's path
    state_file: str | None = None  # where runtime changes and health are journaled

    def worker_cpu(self, worker_id: int) -> int | None:
        """The CPU worker ``worker_id`` is pinned to: the next of the listed CPUs (with auto, of
        those this process may run on), wrapping around; None: not pinned."""
        if self.cpu_affinity is None:
            return None
        if self.cpu_affinity == "auto":
            cpus = sorted(os.sched_getaffinity(0))
        else:
            cpus = parse_cpu_list(self.cpu_affinity)
        return cpus[worker_id % len(cpus)]

    def pool(self, name: str) -> PoolSpec:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def frontend(self, name: str) -> FrontendSpec:
        for frontend in self.frontends:
            if frontend.name == name:
                return frontend
        raise KeyError(name)

    @property
    def max_conn(self) -> int:
        """Connection slots of one worker: every TCP frontend's share together (a UDP frontend
        holds flows instead, max_flows of them)."""
        return sum(frontend.max_conn for frontend in self.frontends if frontend.protocol == "tcp")


def parse_cpu_list(text: str) -> list[int]:
    """CPU numbers and ranges, in the order given: "0-3,8" is [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"expected CPU numbers and ranges, as in 0-3,8, not {text!r}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"the range {part.strip()} runs backwards")
        for cpu in range(low, high + 1):
            if cpu in cpus:
                raise ValueError(f"CPU {cpu} is listed twice")
            cpus.append(cpu)
    return cpus


def format_cpu_list(cpus: list[int]) -> str:
    """The shortest text parse_cpu_list reads back as the sorted ``cpus``: [0, 1, 2, 5] is 0-2,5."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
