"""The supervisor <-> worker messages: round trips, any split of the stream, bad input, and
how the supervisor acts on what workers send."""

from __future__ import annotations

import socket
import subprocess

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlb import settings
from fastlb.protocol import messages as msg
from fastlb.supervisor.arbiter import Arbiter, WorkerHandle
from fastlb.supervisor.listeners import open_listeners

EXAMPLES = [
    msg.Hello(worker=3, pid=4242),
    msg.Report(
        table=7,
        active=[1, 0, 5],
        new=[2, 0, 9],
        up_bytes=[100, 0, 1 << 40],
        down_bytes=[5, 0, 123456],
        failed=[0, 3, 0],
        succeeded=[2, 0, 9],
        streak=[0, 3, 0],
    ),
    msg.Table(
        version=2,
        backends=[
            msg.BackendEntry("127.0.0.1", 9000, 3, True, False),
            msg.BackendEntry("::1", 9001, 1, False, True),
        ],
    ),
    msg.Table(version=1, backends=[]),
    msg.Counts(table=7, others=[4, 0, 11]),
    msg.Drain(),
]


def raw(**body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(message):
    assert msg.Decoder().feed(msg.encode(message)) == [message]


def test_hello_carries_the_protocol_version():
    body = msgpack.unpackb(msg.encode(msg.Hello(worker=0, pid=1)))
    assert body == {"t": "hello", "worker": 0, "pid": 1, "v": msg.PROTOCOL_VERSION}


def test_a_stream_fed_one_byte_at_a_time_gives_the_same_messages():
    stream = b"".join(msg.encode(m) for m in EXAMPLES)
    decoder = msg.Decoder()
    decoded = []
    for i in range(len(stream)):
        decoded += decoder.feed(stream[i : i + 1])
    assert decoded == EXAMPLES


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_any_split_of_the_stream_gives_the_same_messages(cuts):
    stream = b"".join(msg.encode(m) for m in EXAMPLES)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = msg.Decoder()
    decoded = []
    for start, end in zip(points, points[1:], strict=False):
        decoded += decoder.feed(stream[start:end])
    assert decoded == EXAMPLES


counts = st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=0, max_size=8)


@given(
    table=st.integers(min_value=0, max_value=2**32 - 1),
    rows=st.integers(min_value=0, max_value=8).flatmap(
        lambda n: st.lists(
            st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=n, max_size=n),
            min_size=7,
            max_size=7,
        )
    ),
)
def test_reports_of_any_size_round_trip(table, rows):
    report = msg.Report(table, *rows)
    assert msg.Decoder().feed(msg.encode(report)) == [report]


@given(others=counts, version=st.integers(min_value=0, max_value=2**32 - 1))
def test_counts_round_trip(others, version):
    message = msg.Counts(table=version, others=others)
    assert msg.Decoder().feed(msg.encode(message)) == [message]


@pytest.mark.parametrize(
    "body, reason",
    [
        (raw(t="reboot"), "unknown message type"),
        (raw(kind="hello"), "unknown message type"),
        (raw(t=5), "unknown message type"),
        (raw(t="hello", worker=1), "missing field 'pid'"),
        (raw(t="counts", others=[1]), "missing field 'table'"),
        (raw(t="hello", worker="one", pid=2), "hello"),
        (raw(t="counts", table=1, others=[1, "two"]), "counts"),
        (raw(t="counts", table=1, others=7), "counts"),
        (raw(t="table", version=1, backends=[["127.0.0.1", 80, 1, True]]), "table"),
        (raw(t="table", version=1, backends=[[80, "127.0.0.1", 1, True, False]]), "table"),
        (raw(t="table", version=1, backends=5), "table"),
        (
            raw(
                t="report", table=1, active=[1, 2], new=[1], up_bytes=[1, 2],
                down_bytes=[1, 2], failed=[1, 2], succeeded=[1, 2], streak=[1, 2],
            ),
            "report",
        ),
        (
            raw(
                t="report", table=1, active=[1], new=[1.5], up_bytes=[1], down_bytes=[1],
                failed=[1], succeeded=[1], streak=[1],
            ),
            "report",
        ),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb("hello"), "not a map"),
    ],
)  # fmt: skip
def test_bad_messages_are_invalid_and_the_stream_goes_on(body, reason):
    decoder = msg.Decoder()
    out = decoder.feed(body + msg.encode(msg.Drain()))
    assert len(out) == 2
    assert isinstance(out[0], msg.Invalid)
    assert reason in out[0].reason
    assert out[1] == msg.Drain()


def test_garbage_bytes_are_invalid_and_later_messages_decode():
    decoder = msg.Decoder()
    out = decoder.feed(b"\xc1\xc1\xc1")  # 0xc1 is never used in msgpack
    assert len(out) == 1 and isinstance(out[0], msg.Invalid)
    assert decoder.feed(msg.encode(msg.Hello(worker=1, pid=2))) == [msg.Hello(worker=1, pid=2)]


def test_messages_before_garbage_in_the_same_chunk_are_kept():
    decoder = msg.Decoder()
    out = decoder.feed(msg.encode(msg.Drain()) + b"\xc1")
    assert out[0] == msg.Drain()
    assert isinstance(out[1], msg.Invalid)
    assert decoder.feed(msg.encode(msg.Counts(1, [2]))) == [msg.Counts(1, [2])]


@given(junk=st.binary(max_size=64))
def test_no_input_makes_the_decoder_raise(junk):
    kinds = (msg.Invalid, msg.Hello, msg.Report, msg.Table, msg.Counts, msg.Drain)
    decoder = msg.Decoder()
    for i in range(len(junk)):
        assert all(isinstance(item, kinds) for item in decoder.feed(junk[i : i + 1]))


# ---- the supervisor's side of the stream -------------------------------------------------------
# A real Arbiter (not running its loop) with real socketpairs standing in for two workers; the
# "worker processes" are sleep(1) children so that anything the supervisor does to a PID only
# touches processes this test owns.


@pytest.fixture
def supervisor():
    config = settings.parse(
        {
            "listen": "127.0.0.1:0",
            "backends": ["127.0.0.1:9", "127.0.0.1:10"],
            "workers": "2",
            "fall": "3",
        }
    )
    arbiter = Arbiter(config, open_listeners(config.listen[0], 1))
    sleepers, peers = [], []
    for worker_id in range(2):
        sleeper = subprocess.Popen(["sleep", "60"])
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(5)
        worker = WorkerHandle(worker_id, sleeper.pid, ours, started=0.0)
        arbiter.workers[sleeper.pid] = worker
        arbiter.selector.register(ours, worker.events, lambda mask, w=worker: None)
        sleepers.append(sleeper)
        peers.append(theirs)
    yield arbiter, list(arbiter.workers.values()), peers
    arbiter.shutdown()  # kills and reaps the sleepers
    for peer in peers:
        peer.close()


def report(table=1, active=(0, 0), new=(0, 0), failed=(0, 0), succeeded=(0, 0), streak=(0, 0)):
    return msg.Report(
        table, list(active), list(new), [0, 0], [0, 0], list(failed), list(succeeded), list(streak)
    )


def deliver(arbiter, worker, peer, data: bytes) -> None:
    peer.sendall(data)
    arbiter.read_messages(worker)


def received(peer) -> list:
    decoder = msg.Decoder()
    peer.setblocking(False)
    data = b""
    try:
        while chunk := peer.recv(65536):
            data += chunk
    except BlockingIOError:
        pass
    return decoder.feed(data)


def test_the_supervisor_ignores_bad_bytes_and_keeps_reading(supervisor, caplog):
    arbiter, workers, peers = supervisor
    hello = msg.encode(msg.Hello(worker=0, pid=workers[0].pid))
    deliver(arbiter, workers[0], peers[0], msgpack.packb({"t": "bogus"}) + hello)
    assert workers[0].ready
    deliver(arbiter, workers[0], peers[0], b"\xc1")
    deliver(arbiter, workers[0], peers[0], msg.encode(report(new=(4, 0), active=(2, 0))))
    assert arbiter.backends[0].connections == 4
    assert workers[0].active == [2, 0]
    bad_length = msg.Report(1, [1], [1], [1], [1], [1], [1], [1])
    deliver(arbiter, workers[0], peers[0], msg.encode(bad_length))
    assert arbiter.backends[0].connections == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("unknown message type 'bogus'" in w for w in warnings)
    assert any("undecodable" in w for w in warnings)
    assert any("report on 1 backends, not 2" in w for w in warnings)


def test_counts_tell_each_worker_what_the_others_hold(supervisor):
    arbiter, workers, peers = supervisor
    deliver(arbiter, workers[0], peers[0], msg.encode(report(active=(3, 1))))
    deliver(arbiter, workers[1], peers[1], msg.encode(report(active=(1, 0))))
    arbiter.publish()  # once per turn of the loop, after all its messages
    assert received(peers[0]) == [msg.Counts(table=1, others=[1, 0])]
    assert received(peers[1]) == [msg.Counts(table=1, others=[3, 1])]
    arbiter.publish()
    assert received(peers[0]) == []  # nothing changed: nothing sent


def test_failures_seen_by_different_workers_add_up_to_fall(supervisor):
    arbiter, workers, peers = supervisor
    deliver(arbiter, workers[0], peers[0], msg.encode(report(failed=(1, 0), streak=(1, 0))))
    deliver(arbiter, workers[1], peers[1], msg.encode(report(failed=(1, 0), streak=(1, 0))))
    assert arbiter.backends[0].up
    # Worker 0 succeeds once, then fails again: the run restarts at its streak of 1.
    deliver(
        arbiter, workers[0], peers[0],
        msg.encode(report(failed=(2, 0), succeeded=(1, 0), streak=(1, 0))),
    )  # fmt: skip
    assert arbiter.backends[0].up
    deliver(arbiter, workers[1], peers[1], msg.encode(report(failed=(2, 0), streak=(3, 0))))
    assert not arbiter.backends[0].up and arbiter.backends[1].up
    arbiter.publish()
    for peer in peers:
        table, counts = received(peer)
        assert table.version == 2
        assert [b.up for b in table.backends] == [False, True]
        assert counts.table == 2
    assert arbiter.snapshot()["backends"][0]["failed"] == 6


def test_reports_against_an_old_table_count_traffic_but_not_failures(supervisor):
    arbiter, workers, peers = supervisor
    arbiter.table_version = 5
    deliver(arbiter, workers[0], peers[0], msg.encode(report(table=4, failed=(9, 0), new=(1, 0))))
    assert arbiter.backends[0].up
    assert arbiter.backends[0].failed == 9 and arbiter.backends[0].connections == 1
