"""Making listening sockets: the stats server's, and each member of a frontend address's
SO_REUSEPORT group, TCP or UDP (see :mod:`fastlb.supervisor.sockets`, which keeps them across
generations).

The supervisor keeps every socket open for as long as it runs. A worker only ever uses its
own, so when it dies its socket and the connections queued on it stay, and its replacement
inherits both: clients are never refused while a worker restarts.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator

from fastlb.errors import ConfigError
from fastlb.model import Address
from fastlb.settings import address_family

log = logging.getLogger("fastlb.supervisor")

MAX_BACKLOG = 65535


def backlog() -> int:
    """The longest accept queue the kernel allows (net.core.somaxconn), at most 65535."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return min(MAX_BACKLOG, int(f.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def open_listener(address: Address) -> socket.socket:
    """One non-blocking listening socket, for the stats server. Raises ConfigError."""
    try:
        return _listener(address, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None


def _check_free(address: Address, udp: bool = False) -> None:
    # SO_REUSEPORT would let us join the group of another process of the same user (another
    # fastlb on the same port) and share its clients. A socket without it fails to bind there.
    if address.port == 0:
        return
    try:
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        with socket.socket(address_family(address), kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _v6only(probe, address)
            probe.bind((address.host, address.port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None


def _v6only(sock: socket.socket, address: Address) -> None:
    if address.ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _listener(address: Address, reuse_port: bool) -> socket.socket:
    sock = socket.socket(address_family(address), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _v6only(sock, address)
        # Accepted sockets inherit TCP_NODELAY from the listener: no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog())
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _udp_socket(address: Address) -> socket.socket:
    # One socket of the address's SO_REUSEPORT group: the kernel spreads clients over the
    # workers by their address and port, so a client's datagrams keep reaching one worker.
    sock = socket.socket(address_family(address), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _v6only(sock, address)
        sock.bind((address.host, address.port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def accept_waiting(
    sock: socket.socket, batch: int, has_room: Callable[[], bool], who: str
) -> Iterator[socket.socket]:
    """The connections waiting on a non-blocking listening socket, at most ``batch`` a call,
    non-blocking; those beyond ``has_room()`` are closed (the servers in the supervisor's loop
    keep a bounded number of clients)."""
    for _ in range(batch):
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: accept failed: %s", who, exc)
            return
        if not has_room():
            conn.close()
            continue
        conn.setblocking(False)
        yield conn
