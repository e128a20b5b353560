"""sd_notify(3) without dependencies: a datagram to the socket named by $NOTIFY_SOCKET.

With ``Type=notify`` systemd considers the service started when it receives ``READY=1``; the
supervisor sends it only once every worker has said hello, that is, once every worker is
accepting. ``STOPPING=1`` tells systemd that a drain has begun.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("fastlb.systemd")


def notify(state: str) -> bool:
    """Sends ``state`` (e.g. ``"READY=1"``); False when not run by systemd or when it failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: a leading NUL byte in the real name
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd of %s: %s", state, exc)
        return False
    return True
