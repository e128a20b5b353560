"""The listening sockets, by listen address and worker slot, kept across generations of workers.

Each address has a :class:`Group` of sockets. A group the supervisor bound itself is *owned*:
one SO_REUSEPORT socket per worker slot, and a reload that raises the worker count binds the
missing siblings. A group inherited from systemd (socket activation) is used as given: the
workers share its socket, because a sibling of our own would die with this process, and with it
the clients queued on it, while systemd's socket outlives every restart.

No socket of an address that stays is ever closed. With fewer workers, the new generation polls
every socket of the group (worker i takes sockets i, i + N, ...) and a classic BPF program on
the group (SO_ATTACH_REUSEPORT_CBPF: a random index below N) steers new SYNs to the first N,
so the spare ones only hand out what they already queued. The kernel picks the socket by its
place in the group, which is the order of ``listen()``; since members are never closed, that
place is the slot. We steer rather than rely on ``net.ipv4.tcp_migrate_req``: that sysctl is
per network namespace, off by default and not ours to turn on, and it would not help an
address removed altogether (there is no sibling to migrate to).

A UDP frontend's address has a group of its own, bound UDP sockets, beside a TCP one on the same
address. Its datagrams are never steered: the kernel's hash of the client's address and port
keeps a client on one socket, which a random pick would break, and a spare socket is still
polled. A retiring UDP group closes at once (a datagram has no queue to wait for).

An address removed by a reload *retires*: a socket filter drops new SYNs (clients retransmit,
then find the port closed, as for any address given up), the generation still accepting drains
what is queued, and the group is closed once its accept queues are empty (TCP_INFO), never
before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import socket
import struct

from fastlb.errors import ConfigError
from fastlb.model import Address, Config
from fastlb.supervisor.listeners import _check_free, _listener, _udp_socket

log = logging.getLogger("fastlb.supervisor")

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_ATTACH_REUSEPORT_CBPF = 51
SKF_AD_RANDOM = 0xFFFFF000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: load a random 32-bit number
TCP_INFO_UNACKED = 24  # offset of tcpi_unacked: a listener's accept queue length
OWN_NAME = "fastlb"  # LISTEN_FDNAMES entry of a socket fastlb bound itself (an upgrade)
LISTEN_FDS_START = 3


def _filter(insns: list[tuple[int, int, int, int]]) -> tuple[ctypes.Array, bytes]:
    """A struct sock_fprog for setsockopt, and the buffer it points to (keep it alive)."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
    return code, struct.pack("HxxxxxxP", len(insns), ctypes.addressof(code))


def steer_program(count: int) -> list[tuple[int, int, int, int]]:
    """A reuseport program: each SYN goes to the socket at a random place below ``count``."""
    return [(0x20, 0, 0, SKF_AD_RANDOM), (0x94, 0, 0, count), (0x16, 0, 0, 0)]


# Drops a packet with SYN and without ACK (a new client); lets handshakes under way complete.
DROP_SYN = [
    (0x30, 0, 0, 13),
    (0x54, 0, 0, 0x12),
    (0x15, 0, 1, 0x02),
    (6, 0, 0, 0),
    (6, 0, 0, 0xFFFFFFFF),
]


def queued(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, TCP_INFO_UNACKED)[0]


Endpoint = tuple[str, Address]  # ("tcp" or "udp", address): what a group is kept by


@dataclasses.dataclass
class Group:
    address: Address
    sockets: list[socket.socket]
    owned: bool  # bound by fastlb: siblings may be added, and a program steers SYNs
    retiring: bool = False
    protocol: str = "tcp"

    @property
    def endpoint(self) -> Endpoint:
        return (self.protocol, self.address)

    @property
    def label(self) -> str:
        return str(self.address) if self.protocol == "tcp" else f"{self.address} (udp)"

    def for_slot(self, slot: int, workers: int) -> list[socket.socket]:
        """The sockets worker ``slot`` of ``workers`` polls: every one is polled by someone."""
        mine = [sock for i, sock in enumerate(self.sockets) if i % workers == slot]
        return mine or [self.sockets[slot % len(self.sockets)]]

    def queued(self) -> int:
        if self.protocol != "tcp":
            return 0
        return sum(queued(sock) for sock in self.sockets)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


class Sockets:
    """Every listening socket of the frontends, by address."""

    def __init__(self, groups: dict[Endpoint, Group] | None = None):
        self.groups: dict[Endpoint, Group] = groups or {}

    # ---- making and inheriting -----------------------------------------------------------------

    @classmethod
    def inherit(cls) -> Sockets:
        """The sockets passed by systemd or by our predecessor (LISTEN_FDS, LISTEN_PID,
        LISTEN_FDNAMES), grouped by the address each is bound to; none when not for us. The
        variables are removed so that nothing started later takes them for its own."""
        count = os.environ.pop("LISTEN_FDS", "")
        pid = os.environ.pop("LISTEN_PID", "")
        names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
        sockets = cls()
        if not count.isdigit() or pid != str(os.getpid()):
            return sockets
        for i in range(int(count)):
            fd = LISTEN_FDS_START + i
            try:
                sock = socket.socket(fileno=fd)
                udp = sock.type == socket.SOCK_DGRAM
                listening = udp or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError as exc:
                raise ConfigError(f"inherited descriptor {fd}: {exc.strerror or exc}") from None
            if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM) or not listening:
                raise ConfigError(
                    f"inherited descriptor {fd} is neither a listening TCP socket nor a UDP one"
                )
            sock.set_inheritable(False)
            sock.setblocking(False)
            if not udp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host, port = sock.getsockname()[:2]
            address = Address(host, port)
            owned = i < len(names) and names[i] == OWN_NAME
            protocol = "udp" if udp else "tcp"
            group = sockets.groups.setdefault(
                (protocol, address), Group(address, [], owned, protocol=protocol)
            )
            group.sockets.append(sock)
        return sockets

    def prepare(self, config: Config) -> Config:
        """Binds what ``config`` needs and is missing: new addresses, and siblings of owned
        groups up to its worker count; puts back in service retiring groups whose address is
        back. Returns the config with port 0 replaced by the port each such address got.
        Raises ConfigError (one line) and then closes only what it bound."""
        added: list[Group] = []
        grown: list[tuple[Group, int]] = []
        bound: dict[Endpoint, Address] = {}
        try:
            for endpoint in _endpoints(config):
                protocol, address = endpoint
                group = self.groups.get(endpoint)
                if group is None:
                    _check_free(address, udp=protocol == "udp")
                    group = Group(address, [], owned=True, protocol=protocol)
                    self._bind(group, config.workers)
                    added.append(group)
                    bound[endpoint] = group.address
                elif group.owned and len(group.sockets) < config.workers:
                    grown.append((group, len(group.sockets)))
                    self._bind(group, config.workers)
        except BaseException:
            for group in added:
                group.close()
            for group, size in grown:
                for sock in group.sockets[size:]:
                    sock.close()
                del group.sockets[size:]
            raise
        for group in added:
            self.groups[group.endpoint] = group
            self.steer(group, config.workers)
        config = _rebind(config, bound)
        for endpoint in _endpoints(config):
            group = self.groups[endpoint]
            if group.retiring:
                group.retiring = False
                if group.owned and group.protocol == "tcp":
                    for sock in group.sockets:
                        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        return config

    def _bind(self, group: Group, count: int) -> None:
        address = group.address
        while len(group.sockets) < count:
            try:
                if group.protocol == "udp":
                    sock = _udp_socket(address)
                else:
                    sock = _listener(address, reuse_port=True)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
            group.sockets.append(sock)
            # Port 0 asks for any free port: the siblings take the one the first one got.
            address = group.address = Address(address.host, sock.getsockname()[1])

    # ---- what the workers get ------------------------------------------------------------------

    def slot_listeners(self, config: Config, slot: int) -> list[tuple[int, socket.socket]]:
        """(frontend index, socket) for each socket worker ``slot`` of ``config`` polls."""
        return [
            (frontend_id, sock)
            for frontend_id, frontend in enumerate(config.frontends)
            for address in frontend.listen
            for sock in self.groups[(frontend.protocol, address)].for_slot(slot, config.workers)
        ]

    def steer(self, group: Group, workers: int) -> None:
        """New SYNs of an owned group go to its first ``workers`` sockets only."""
        if not group.owned or not group.sockets or group.protocol != "tcp":
            return
        code, program = _filter(steer_program(workers))
        group.sockets[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)
        del code

    def steer_all(self, config: Config) -> None:
        for endpoint in _endpoints(config):
            self.steer(self.groups[endpoint], config.workers)

    # ---- retiring -------------------------------------------------------------------------------

    def retire_unused(self, config: Config) -> list[str]:
        """Starts retiring every group ``config`` does not listen on: new SYNs are dropped."""
        keep = set(_endpoints(config))
        retired = []
        for group in self.groups.values():
            if group.endpoint not in keep and not group.retiring:
                group.retiring = True
                retired.append(group.label)
                if not group.owned or group.protocol != "tcp":
                    continue  # systemd's socket: our copy closes, the socket stays as it is
                code, program = _filter(DROP_SYN)
                for sock in group.sockets:
                    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
                del code
        return retired

    def retiring_queued(self) -> int:
        return sum(
            group.queued() for group in self.groups.values() if group.retiring and group.owned
        )

    def close_retired(self) -> list[str]:
        closed = [group for group in self.groups.values() if group.retiring]
        for group in closed:
            group.close()
            del self.groups[group.endpoint]
        return [group.label for group in closed]

    # ---- all of them ---------------------------------------------------------------------------

    def all(self) -> list[socket.socket]:
        return [sock for group in self.groups.values() for sock in group.sockets]

    def handover(self) -> list[tuple[socket.socket, str]]:
        """Every socket in service, with its LISTEN_FDNAMES name, for the next fastlb."""
        return [
            (sock, OWN_NAME if group.owned else "inherited")
            for group in self.groups.values()
            if not group.retiring
            for sock in group.sockets
        ]

    def close(self) -> None:
        for group in self.groups.values():
            group.close()
        self.groups.clear()


def _endpoints(config: Config) -> list[Endpoint]:
    return [
        (frontend.protocol, address) for frontend in config.frontends for address in frontend.listen
    ]


def _rebind(config: Config, bound: dict[Endpoint, Address]) -> Config:
    """``config`` with each endpoint of ``bound`` replaced by the address it maps to."""
    frontends = tuple(
        dataclasses.replace(
            frontend,
            listen=tuple(
                bound.get((frontend.protocol, address), address) for address in frontend.listen
            ),
        )
        for frontend in config.frontends
    )
    return dataclasses.replace(config, frontends=frontends)
