"""What one fastlb serves, as frozen values: frontends (where clients arrive) and pools (where
they go), and the process-wide settings around them.

A :class:`Config` is made from the flags and the TOML file by :mod:`fastlb.config`; everything
else (the supervisor, the workers, ``fastlb check``) reads only this. The flat flags and the flat
file of earlier versions mean one frontend and one pool, both named ``default``.

Nothing here does I/O: addresses are numeric by the time they are put in these classes.
"""

from __future__ import annotations

import ipaddress
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
    fall: int = 3
    rise: int = 2
    check_interval: float = 2.0
    check_timeout: float = 1.0
    active_checks: bool = False


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
    idle_timeout: float = 0.0
    inspect_timeout: float = 5.0

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
    buffer_size: int = 65536
    splice: str = "auto"
    log_level: str = "info"

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
        """Connection slots of one worker: every frontend's share together."""
        return sum(frontend.max_conn for frontend in self.frontends)
