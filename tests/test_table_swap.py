"""A worker keeps forwarding while it builds the next backend table, and applies the changes
the supervisor sends to the table it holds.

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


TWO_BACKENDS = """
import socket, sys
from fastlb import config, worker
from fastlb.protocol import messages as msg
listen_fd, control_fd = int(sys.argv[1]), int(sys.argv[2])
ports = [int(p) for p in sys.argv[3:5]]
listener = socket.socket(fileno=listen_fd)
listener.setblocking(False)
control = socket.socket(fileno=control_fd)
listen = "127.0.0.1:%d" % listener.getsockname()[1]
values = {"listen": [listen], "backends": ["127.0.0.1:%d" % p for p in ports]}
entries = [msg.BackendEntry(i, "127.0.0.1", p, 1, True, False) for i, p in enumerate(ports)]
table = msg.Table(1, [msg.PoolTable(0, entries)])
worker.run(0, [(0, listener)], control, config.load(values, None), table)
"""


def name_server(listener: socket.socket, name: bytes) -> None:
    """Answers every connection with its name, then closes it."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.sendall(name)


def test_table_changes_apply_to_the_table_the_worker_holds():
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    for server, name in zip(servers, (b"A", b"B"), strict=True):
        threading.Thread(target=name_server, args=(server, name), daemon=True).start()
    ports = [server.getsockname()[1] for server in servers]
    listener = socket.create_server(("127.0.0.1", 0))
    parent, child = socket.socketpair()
    fds = (listener.fileno(), child.fileno())
    proc = subprocess.Popen(
        [sys.executable, "-c", TWO_BACKENDS, *map(str, fds), *map(str, ports)],
        pass_fds=fds,
        stderr=subprocess.PIPE,
        cwd=os.path.dirname(os.path.abspath(__file__)),  # import the installed package
    )
    try:
        child.close()
        decoder = msg.Decoder()
        parent.settimeout(30)
        assert any(isinstance(m, msg.Hello) for m in decoder.feed(parent.recv(65536)))

        def entry(i, up):
            return msg.BackendEntry(i, "127.0.0.1", ports[i], 1, up, False)

        def change(version, base, *entries):
            return msg.encode(msg.TableChange(version, base, [msg.PoolChange(0, list(entries))]))

        def answers():
            names = set()
            for _ in range(6):
                with socket.create_connection(listener.getsockname(), timeout=30) as client:
                    names.add(client.recv(1))
            return names

        assert answers() == {b"A", b"B"}
        parent.sendall(change(2, 1, entry(1, False)))  # B goes down
        read_until_report(parent, 2, decoder)
        assert answers() == {b"A"}
        # A change to a table the worker does not hold is refused; the next one applies.
        parent.sendall(change(9, 7, entry(1, True)) + change(3, 2, entry(0, False), entry(1, True)))
        read_until_report(parent, 3, decoder)
        assert answers() == {b"B"}
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
        parent.close()
        listener.close()
        for server in servers:
            server.close()
    assert b"a change to table 7, holding 2" in stderr
