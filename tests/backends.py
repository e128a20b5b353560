"""A fake TCP backend for the black-box tests, run as its own process (like HAProxy vtest servers).

    python backends.py MODE [--name NAME] [--bytes N] [--port PORT] [--host IP] [--lifetime S]

It listens on 127.0.0.1 or --host (port 0 picks a free one), prints the port on the first line
of stdout once it accepts connections, then one JSON line per connection event:
``{"event": "open", "peer": ...}`` when a connection is accepted and ``{"event": "closed",
"peer", "received", "sent", "sha256_in", "sha256_out", "error"}`` when it is done (error is an
errno name such as ``"ECONNRESET"``, or null).

Modes, one thread per connection:
  name       send NAME + "\\n", echo everything until EOF, then shut down writing and close
  hold       the same as name; the tests that keep connections open say so by its name
  echo       echo everything; after EOF finish echoing, then shut down writing and close
  source     send --bytes bytes of a random pattern, then close (sha256_out says what was sent)
  sink       read until EOF, send back the sha256 hex digest of what was read, then close
  halfclose  send NAME + "\\n", shut down writing, then read until EOF (sha256_in says what)
  lastword   read once, then send NAME + "\\n" with the FIN in the same segment (MSG_MORE, then
             shut down writing), then read until EOF
  reset      send NAME + "\\n", wait for one byte from the client, then close with a reset (RST)
  firstbytes read until EOF (or a reset), then report the first bytes read (at most 1 KiB)
             as a ``{"event": "firstbytes", "peer", "hex"}`` event, and close
  close      close at once, sending nothing: a server that accepts but does no work
  silent     read until EOF and never answer: a hung server whose kernel still accepts
  http       answer one HTTP request with NAME + "\n" and close; the status is the number in
             --status-file (200 when there is none), read anew for every request
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import socket
import struct
import sys
import tempfile
import threading

RECV_SIZE = 1 << 20
# Not a multiple of any buffer size, so chunks a proxy dropped, repeated or swapped change the
# stream even though the pattern repeats.
PATTERN_PERIOD = (1 << 20) + 13
REPLY_OFFSET = 100  # replies mode sends its file from here: not page-aligned
FIRST_BYTES = 1024  # what firstbytes mode reports: a PROXY header and a little after it

_print_lock = threading.Lock()


def report(**event) -> None:
    line = json.dumps(event)
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def pattern_chunks(total: int, block: bytes):
    """``total`` bytes of ``block`` repeated, as memoryviews of at most one block each."""
    view = memoryview(block)
    sent = 0
    while sent < total:
        chunk = view[: min(len(view), total - sent)]
        sent += len(chunk)
        yield chunk


class Connection:
    def __init__(self, sock: socket.socket, peer: str, args: argparse.Namespace):
        self.sock = sock
        self.peer = peer
        self.args = args
        self.received = 0
        self.sent = 0
        self.digest_in = hashlib.sha256()
        self.digest_out = hashlib.sha256()
        self.buf = bytearray(RECV_SIZE)

    def send(self, data, flags: int = 0) -> None:
        self.sock.sendall(data, flags)
        self.sent += len(data)
        self.digest_out.update(data)

    def recv(self) -> memoryview:
        """The next bytes read; empty at EOF."""
        n = self.sock.recv_into(self.buf)
        self.received += n
        data = memoryview(self.buf)[:n]
        self.digest_in.update(data)
        return data

    def name_line(self) -> bytes:
        return self.args.name.encode() + b"\n"

    def echo_until_eof(self) -> None:
        while data := self.recv():
            self.send(data)
        self.sock.shutdown(socket.SHUT_WR)

    def serve_name(self) -> None:
        self.send(self.name_line())
        self.echo_until_eof()

    def serve_echo(self) -> None:
        self.echo_until_eof()

    def serve_source(self) -> None:
        for chunk in pattern_chunks(self.args.bytes, os.urandom(PATTERN_PERIOD)):
            self.send(chunk)

    def serve_replies(self) -> None:
        # Every read is a request, answered with --bytes bytes by sendfile(2) from a file offset
        # that is not page-aligned, as a web server sends a file after its headers: the reply
        # arrives as page-cache fragments, and the connection stays open for the next request.
        with tempfile.TemporaryFile() as source:
            block = os.urandom(REPLY_OFFSET + self.args.bytes)
            source.write(block)
            source.flush()
            reply = memoryview(block)[REPLY_OFFSET:]
            while self.recv():
                sent = 0
                while sent < len(reply):
                    sent += os.sendfile(
                        self.sock.fileno(), source.fileno(), REPLY_OFFSET + sent, len(reply) - sent
                    )
                self.sent += sent
                self.digest_out.update(reply)
                report(event="replied", peer=self.peer, sent=self.sent)

    def serve_sink(self) -> None:
        while self.recv():
            pass
        self.send(self.digest_in.hexdigest().encode())

    def serve_halfclose(self) -> None:
        self.send(self.name_line())
        self.sock.shutdown(socket.SHUT_WR)
        while self.recv():
            pass

    def serve_lastword(self) -> None:
        self.recv()
        self.send(self.name_line(), socket.MSG_MORE)  # held back for the FIN: one segment
        self.sock.shutdown(socket.SHUT_WR)
        while self.recv():
            pass

    def serve_reset(self) -> None:
        self.send(self.name_line())
        self.recv()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def serve_firstbytes(self) -> None:
        first = bytearray()
        try:
            while data := self.recv():
                first += data[: FIRST_BYTES - len(first)]
        finally:  # a health checker may close with a reset: what came before it still counts
            report(event="firstbytes", peer=self.peer, hex=first.hex())

    def serve_close(self) -> None:
        pass

    def serve_silent(self) -> None:
        while self.recv():
            pass

    def serve_http(self) -> None:
        head = bytearray()
        while b"\r\n\r\n" not in head and (data := self.recv()):
            head += data
        status = 200
        if self.args.status_file:
            try:
                with open(self.args.status_file) as f:
                    status = int(f.read().strip() or 200)
            except (OSError, ValueError):
                pass
        body = self.name_line()
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self.send(head.encode() + body)

    def run(self) -> None:
        error = None
        report(event="open", peer=self.peer)
        try:
            MODES[self.args.mode](self)
        except OSError as exc:
            error = errno.errorcode.get(exc.errno, str(exc))
        finally:
            self.sock.close()
        report(
            event="closed",
            peer=self.peer,
            received=self.received,
            sent=self.sent,
            sha256_in=self.digest_in.hexdigest(),
            sha256_out=self.digest_out.hexdigest(),
            error=error,
        )


MODES = {
    "name": Connection.serve_name,
    "hold": Connection.serve_name,
    "echo": Connection.serve_echo,
    "source": Connection.serve_source,
    "replies": Connection.serve_replies,
    "sink": Connection.serve_sink,
    "halfclose": Connection.serve_halfclose,
    "lastword": Connection.serve_lastword,
    "reset": Connection.serve_reset,
    "firstbytes": Connection.serve_firstbytes,
    "close": Connection.serve_close,
    "silent": Connection.serve_silent,
    "http": Connection.serve_http,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--name", default="backend")
    parser.add_argument("--bytes", type=int, default=0, help="what source sends")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address to listen on")
    parser.add_argument("--status-file", help="http: the file holding the status to answer")
    parser.add_argument("--lifetime", type=float, default=600.0, help="exit after this long")
    args = parser.parse_args()

    # Never outlive a test run that lost track of us.
    lifetime = threading.Timer(args.lifetime, os._exit, (0,))
    lifetime.daemon = True
    lifetime.start()

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(1024)
    sys.stdout.write(f"{listener.getsockname()[1]}\n")
    sys.stdout.flush()
    while True:
        sock, (host, port) = listener.accept()
        conn = Connection(sock, f"{host}:{port}", args)
        threading.Thread(target=conn.run, daemon=True).start()


if __name__ == "__main__":
    main()
