"""A worker keeps forwarding while it builds the next backend table.

One worker process (fastlb.worker.run, as the supervisor starts it) with this test as its
supervisor: the test sends it twenty 1,000-backend maglev tables at once (each a Maglev table of
655,373 entries to build) and counts the round trips that one keep-alive connection makes
before the worker reports the last table in use. A worker that built tables on its forwarding
loop would answer none of them in that time.
"""

import os
import socket
import subprocess
import sys
import threading

from fastlb.protocol import messages as msg

CHILD = """
import socket, sys
from fastlb import config, worker
from fastlb.protocol import messages as msg
listen_fd, control_fd, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
listener = socket.socket(fileno=listen_fd)
listener.setblocking(False)
control = socket.socket(fileno=control_fd)
listen = "127.0.0.1:%d" % listener.getsockname()[1]
values = {"listen": [listen], "backends": ["127.0.0.1:%d" % port], "algorithm": "maglev"}
table = msg.Table(1, [msg.PoolTable(0, [msg.BackendEntry(0, "127.0.0.1", port, 1, True, False)])])
worker.run(0, [(0, listener)], control, config.load(values, None), table)
"""
TABLES = 20
BACKENDS = 1000
MIN_ROUND_TRIPS = 20


def echo_server(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def big_table(version: int, echo_port: int) -> msg.Table:
    """The echo backend (id 0, where the connection stays) and 999 more, one of them flapping."""
    entries = [msg.BackendEntry(0, "127.0.0.1", echo_port, 1, True, False)]
    entries += [
        msg.BackendEntry(
            i, f"127.0.{i // 250 + 10}.{i % 250 + 1}", 9, 1, i != 999 or version % 2 == 0, False
        )
        for i in range(1, BACKENDS)
    ]
    return msg.Table(version, [msg.PoolTable(0, entries)])


def read_until_report(control: socket.socket, version: int, decoder: msg.Decoder) -> None:
    control.settimeout(30)
    while True:
        data = control.recv(65536)
        assert data, "the worker closed its control socket"
        for message in decoder.feed(data):
            if isinstance(message, msg.Report) and message.table == version:
                return


def test_forwarding_goes_on_while_tables_are_built():
    echo = socket.create_server(("127.0.0.1", 0))
    listener = socket.create_server(("127.0.0.1", 0))
    parent, child = socket.socketpair()
    threading.Thread(target=echo_server, args=(echo,), daemon=True).start()
    fds = (listener.fileno(), child.fileno())
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, fds), str(echo.getsockname()[1])],
        pass_fds=fds,
        cwd=os.path.dirname(os.path.abspath(__file__)),  # import the installed package
    )
    try:
        child.close()
        decoder = msg.Decoder()
        parent.settimeout(30)
        hello = [m for m in decoder.feed(parent.recv(65536)) if isinstance(m, msg.Hello)]
        assert hello, "no hello from the worker"
        client = socket.create_connection(listener.getsockname(), timeout=30)
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"

        tables = b"".join(msg.encode(big_table(v, echo.getsockname()[1])) for v in range(2, 22))
        last = TABLES + 1
        round_trips = 0
        done = threading.Event()
        reader = threading.Thread(
            target=lambda: (read_until_report(parent, last, decoder), done.set())
        )
        sender = threading.Thread(target=parent.sendall, args=(tables,))
        reader.start()
        sender.start()
        while not done.is_set() and reader.is_alive():
            client.sendall(b"ping")
            assert client.recv(16) == b"ping"
            round_trips += 1
        sender.join(30)
        reader.join(30)
        assert done.is_set(), "no report of the last table"
        print(
            f"\n{round_trips} round trips while {TABLES} tables of {BACKENDS} backends were built"
        )
        assert round_trips >= MIN_ROUND_TRIPS
        client.close()
    finally:
        proc.kill()
        proc.wait(10)
        parent.close()
        listener.close()
        echo.close()
