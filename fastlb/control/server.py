"""The control socket, served from the supervisor's selectors loop, and the state file.

Framing: a client connects to the unix stream socket (mode 0600: only the balancer's user may
use it), writes one JSON object and a newline, and reads one JSON object and a newline back,
after which the supervisor closes the connection. A reply is ``{"ok": true, "message": TEXT,
"warnings": [TEXT...], "data": {...}}`` or ``{"ok": false, "error": TEXT}``.

Nothing a client does can disturb the supervisor: a request is at most :data:`MAX_REQUEST`
bytes (longer: an error and the connection closed), one that has not arrived whole within
:data:`CLIENT_TIMEOUT` is dropped, at most :data:`MAX_CLIENTS` are served at once, and every
socket is non-blocking.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastlb.control.commands import CommandError, Runtime
from fastlb.errors import ConfigError
from fastlb.supervisor.listeners import accept_waiting

log = logging.getLogger("fastlb.control")

MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 16
MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL

Handler = Callable[[object], dict]  # a decoded request -> the reply


def bind_control_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 (its folder is made when missing). A
    socket file left by a balancer that is gone is replaced; one that a running balancer
    answers on is a ConfigError."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise ConfigError(f"--control {path}: longer than {MAX_PATH} bytes")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            _remove_stale(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"--control {path}: {exc.strerror}") from None
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):  # /run/fastlb outside systemd's RuntimeDirectory
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--control {path}: {exc.strerror or exc}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from the moment it exists: no window with wider rights.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--control {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    return sock


def _remove_stale(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
    raise ConfigError(f"--control {path}: a running fastlb serves it")


@dataclass
class _Client:
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    reply: memoryview | None = None


class ControlServer:
    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, handle: Handler):
        self.sock = sock
        self.path = sock.getsockname()
        self.inode = os.stat(self.path).st_ino
        self.selector = selector
        self.handle = handle
        self.clients: dict[socket.socket, _Client] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, lambda mask: self._accept())

    def _accept(self) -> None:
        for conn in accept_waiting(
            self.sock, MAX_CLIENTS, lambda: len(self.clients) < MAX_CLIENTS, "control"
        ):
            self.clients[conn] = _Client(deadline=time.monotonic() + CLIENT_TIMEOUT)
            self.selector.register(
                conn, selectors.EVENT_READ, lambda mask, conn=conn: self._on_event(conn, mask)
            )

    def _on_event(self, conn: socket.socket, mask: int) -> None:
        client = self.clients.get(conn)
        if client is None:
            return
        if client.reply is None:
            self._read(conn, client)
        elif client.reply:
            self._write(conn, client)
        else:
            self._discard(conn)

    def _read(self, conn: socket.socket, client: _Client) -> None:
        try:
            data = conn.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not data and not client.request:
            self._close(conn)
            return
        client.request += data
        line, newline, _ = client.request.partition(b"\n")
        if len(line) > MAX_REQUEST:
            self._answer(conn, client, _error(f"request longer than {MAX_REQUEST} bytes"))
        elif newline or not data:  # a whole line, or the client closed after its request
            self._answer(conn, client, self._reply_to(bytes(line)))

    def _reply_to(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return _error("the request is not a JSON object on one line")
        try:
            return self.handle(request)
        except CommandError as exc:
            return _error(str(exc))
        except Exception:  # a bug in one verb must not stop the balancer
            log.exception("control: the request %r failed", line[:200])
            return _error("internal error; see the balancer's log")

    def _answer(self, conn: socket.socket, client: _Client, reply: dict) -> None:
        client.reply = memoryview(json.dumps(reply).encode() + b"\n")
        self.selector.modify(
            conn, selectors.EVENT_WRITE, lambda mask, conn=conn: self._on_event(conn, mask)
        )
        self._write(conn, client)

    def _write(self, conn: socket.socket, client: _Client) -> None:
        try:
            sent = conn.send(client.reply)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        client.reply = client.reply[sent:]
        if client.reply:
            return
        # Wait for the client to close first: closing with its bytes unread would send a reset
        # that can destroy the reply before it is read.
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self.selector.modify(
            conn, selectors.EVENT_READ, lambda mask, conn=conn: self._on_event(conn, mask)
        )

    def _discard(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        self.selector.unregister(conn)
        conn.close()

    def next_deadline(self) -> float | None:
        return min((client.deadline for client in self.clients.values()), default=None)

    def expire(self, now: float) -> None:
        for conn, client in list(self.clients.items()):
            if now >= client.deadline:
                self._close(conn)

    def close_after_fork(self) -> None:
        """In a new worker: the descriptors go, the socket file stays the supervisor's."""
        for conn in self.clients:
            conn.close()
        self.sock.close()

    def close(self) -> None:
        for conn in list(self.clients):
            self._close(conn)
        self.selector.unregister(self.sock)
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self.inode:  # still ours, not a successor's
                os.unlink(self.path)
        except OSError:
            pass


def _error(text: str) -> dict:
    return {"ok": False, "error": text}


# ---- the state file ------------------------------------------------------------------------------


def load_state(path: str) -> tuple[Runtime, str | None]:
    """The runtime state journaled at ``path`` (empty when there is no file), and a warning
    when the file could not be used."""
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read())
        return Runtime.from_json(document), None
    except FileNotFoundError:
        return Runtime(), None
    except (OSError, ValueError, UnicodeDecodeError, CommandError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Runtime(), f"state file {path}: {why}; starting from the config alone"


def save_state(path: str, runtime: Runtime) -> None:
    """Writes the state atomically: a temporary file beside it, fsynced, renamed over it, and
    the directory fsynced, so that a crash leaves the old file or the new one."""
    directory = os.path.dirname(path) or "."
    temporary = f"{path}.{os.getpid()}.tmp"
    data = json.dumps(runtime.to_json(), indent=1).encode() + b"\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
