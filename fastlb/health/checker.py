"""TCP health checks, run inside the supervisor's selectors loop.

A check is a non-blocking connect to the backend: it passes when the connection is established
within the timeout and is closed right away. A backend of a pool that sends PROXY headers gets a
LOCAL header first (v2, or v1's ``PROXY UNKNOWN``), so that it sees a well-formed connection of
the balancer's own rather than a protocol error. Results go to a callback,
``on_result(backend_id, ok)``; what they mean (rise, fall) is :mod:`fastlb.health.state`'s
business.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable

from fastlb.settings import Address, address_family

log = logging.getLogger("fastlb.health")

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A PROXY header announcing a connection of the balancer's own (no client behind it).
LOCAL_HEADERS = {
    "v1": b"PROXY UNKNOWN\r\n",
    "v2": PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00",  # version 2, LOCAL; UNSPEC; no address
}


class Checker:
    def __init__(
        self,
        selector: selectors.BaseSelector,
        on_result: Callable[[int, bool], None],
    ):
        self.selector = selector
        self.on_result = on_result
        # By backend id: the socket, the deadline, the address and the PROXY header to send.
        self.pending: dict[int, tuple[socket.socket, float, Address, bytes]] = {}

    def busy(self, index: int) -> bool:
        return index in self.pending

    def check(
        self, index: int, address: Address, timeout: float, send_proxy: str | None = None
    ) -> None:
        """Starts a check of backend ``index``; its result comes to ``on_result``."""
        header = LOCAL_HEADERS[send_proxy] if send_proxy else b""
        try:
            sock = socket.socket(address_family(address), socket.SOCK_STREAM)
        except OSError as exc:  # e.g. no IPv6 on this host
            self._report(index, address, exc.errno or errno.EIO)
            return
        sock.setblocking(False)
        code = sock.connect_ex((address.host, address.port))
        if code in (errno.EINPROGRESS, errno.EAGAIN):
            self.pending[index] = (sock, time.monotonic() + timeout, address, header)
            self.selector.register(sock, selectors.EVENT_WRITE, lambda mask: self._done(index))
            return
        if code == 0:
            code = _send_header(sock, header)
        sock.close()
        self._report(index, address, code)

    def _done(self, index: int) -> None:
        sock, _, address, header = self._forget(index)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            code = _send_header(sock, header)
        sock.close()
        self._report(index, address, code)

    def expire(self, now: float) -> None:
        """Fails the checks that ran out of time."""
        for index, (sock, deadline, address, _) in list(self.pending.items()):
            if now >= deadline:
                self._forget(index)
                sock.close()
                self._report(index, address, errno.ETIMEDOUT)

    def next_deadline(self) -> float | None:
        return min((entry[1] for entry in self.pending.values()), default=None)

    def _forget(self, index: int) -> tuple[socket.socket, float, Address, bytes]:
        entry = self.pending.pop(index)
        self.selector.unregister(entry[0])
        return entry

    def _report(self, index: int, address: Address, code: int) -> None:
        if code:
            log.debug("check of %s failed: %s", address, os.strerror(code))
        self.on_result(index, code == 0)

    def cancel(self, index: int) -> None:
        """Drops the check in flight of one backend, if any, without reporting it."""
        if index in self.pending:
            self._forget(index)[0].close()

    def close(self) -> None:
        """Drops every check in flight without reporting it."""
        for index in list(self.pending):
            self.cancel(index)

    def close_after_fork(self) -> None:
        """In a forked worker: closes the sockets, leaving the shared selector alone."""
        for sock, *_ in self.pending.values():
            sock.close()
        self.pending.clear()


def _send_header(sock: socket.socket, header: bytes) -> int:
    """Sends a PROXY header on a connected socket; 0, or the errno of the failure."""
    if not header:
        return 0
    try:
        # A fresh connection's send buffer is empty: a few bytes never block.
        return 0 if sock.send(header) == len(header) else errno.EAGAIN
    except OSError as exc:
        return exc.errno or errno.EIO
