"""TCP health checks, run inside the supervisor's selectors loop.

A check is a non-blocking connect to the backend: it passes when the connection is established
within the timeout and is closed right away. Results go to a callback, ``on_result(index, ok)``;
what they mean (rise, fall) is :mod:`fastlb.health.state`'s business.
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


class Checker:
    def __init__(
        self,
        selector: selectors.BaseSelector,
        timeout: float,
        on_result: Callable[[int, bool], None],
    ):
        self.selector = selector
        self.timeout = timeout
        self.on_result = on_result
        self.pending: dict[int, tuple[socket.socket, float, Address]] = {}  # by backend index

    def busy(self, index: int) -> bool:
        return index in self.pending

    def check(self, index: int, address: Address) -> None:
        """Starts a check of backend ``index``; its result comes to ``on_result``."""
        try:
            sock = socket.socket(address_family(address), socket.SOCK_STREAM)
        except OSError as exc:  # e.g. no IPv6 on this host
            self._report(index, address, exc.errno or errno.EIO)
            return
        sock.setblocking(False)
        code = sock.connect_ex((address.host, address.port))
        if code in (errno.EINPROGRESS, errno.EAGAIN):
            self.pending[index] = (sock, time.monotonic() + self.timeout, address)
            self.selector.register(sock, selectors.EVENT_WRITE, lambda mask: self._done(index))
            return
        sock.close()
        self._report(index, address, code)

    def _done(self, index: int) -> None:
        sock, _, address = self._forget(index)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        sock.close()
        self._report(index, address, code)

    def expire(self, now: float) -> None:
        """Fails the checks that ran out of time."""
        for index, (sock, deadline, address) in list(self.pending.items()):
            if now >= deadline:
                self._forget(index)
                sock.close()
                self._report(index, address, errno.ETIMEDOUT)

    def next_deadline(self) -> float | None:
        return min((deadline for _, deadline, _ in self.pending.values()), default=None)

    def _forget(self, index: int) -> tuple[socket.socket, float, Address]:
        entry = self.pending.pop(index)
        self.selector.unregister(entry[0])
        return entry

    def _report(self, index: int, address: Address, code: int) -> None:
        if code:
            log.debug("check of %s failed: %s", address, os.strerror(code))
        self.on_result(index, code == 0)

    def close(self) -> None:
        """Drops every check in flight without reporting it."""
        for index in list(self.pending):
            self._forget(index)[0].close()

    def close_after_fork(self) -> None:
        """In a forked worker: closes the sockets, leaving the shared selector alone."""
        for sock, _, _ in self.pending.values():
            sock.close()
        self.pending.clear()
