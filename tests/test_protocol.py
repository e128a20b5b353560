"""The supervisor <-> worker messages: round trips, any split of the stream, bad input, and
how the supervisor acts on what workers send."""

from __future__ import annotations

import random
import socket
import subprocess

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlb import _dataplane
from fastlb import config as fastlb_config
from fastlb.health.probes import CheckResult
from fastlb.protocol import messages as msg
from fastlb.supervisor.arbiter import Arbiter, WorkerHandle
from fastlb.supervisor.sockets import Sockets


def backend_row(
    backend_id, active, new=0, up_bytes=0, down_bytes=0, failed=0, succeeded=0, streak=0,
    connect_ms=(), connect_ms_sum=0, duration_ms=(), duration_ms_sum=0,
) -> tuple:  # fmt: skip
    """A row of BackendStats, as the data plane's report gives it."""
    return (
        backend_id, active, new, up_bytes, down_bytes, failed, succeeded, streak,
        list(connect_ms), connect_ms_sum, list(duration_ms), duration_ms_sum,
    )  # fmt: skip


NO_BACKENDS = {name: [] for name in msg.BackendStats.__dataclass_fields__}

EXAMPLES = [
    msg.Hello(worker=3, pid=4242),
    msg.Report(
        table=7,
        backends=msg.BackendStats.of(
            [
                backend_row(0, active=1, new=2, up_bytes=100, down_bytes=5, succeeded=2),
                backend_row(3, active=0, failed=3, streak=3),
                backend_row(
                    17, active=5, new=9, up_bytes=1 << 40, down_bytes=123456, connect_ms=[0, 9]
                ),
            ]
        ),
        frontends=[msg.FrontendReport(0, active=6, accepted=11, ended=[0, 9, 1, 0, 0, 1])],
    ),
    msg.Report(table=1, backends=msg.BackendStats(), frontends=[]),
    msg.Report(
        table=3,
        backends=msg.BackendStats(),
        frontends=[],
        udp=[msg.UdpReport(1, flows=4, created=9, datagrams_in=12, bytes_in=900, dropped=[0, 2])],
    ),
    msg.Report(
        table=2,
        backends=msg.BackendStats(),
        frontends=[],
        counts={4: 1, 9: 0},
        counts_since_us=123_456_789,
        count_staleness=[0, 3, 1, 0, 0, 0, 0, 0, 0, 0],
        coalesced=41,
    ),
    msg.Table(
        version=2,
        pools=[
            msg.PoolTable(
                0,
                [
                    msg.BackendEntry(0, "127.0.0.1", 9000, 3, True, False),
                    msg.BackendEntry(5, "::1", 9001, 1, False, True),
                ],
            ),
            msg.PoolTable(1, []),
        ],
    ),
    msg.Table(version=1, pools=[]),
    msg.TableChange(
        version=3,
        base=2,
        pools=[msg.PoolChange(0, [msg.BackendEntry(5, "::1", 9001, 1, True, True)], [7])],
    ),
    msg.Counts(table=7, workers={4100: {0: 4, 3: 0, 17: 11}}),
    msg.Counts(table=7, workers={4100: {2: 1}, 4101: {}}, gone=[4099], counts_since_us=99),
    msg.Drain(),
    msg.KillSessions(backends=[3, 0]),
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


number = st.integers(min_value=0, max_value=2**63 - 1)
ident = st.integers(min_value=0, max_value=2**32 - 1)
counts = st.dictionaries(ident, number, max_size=8)


@given(
    table=ident,
    backends=st.lists(
        st.builds(
            backend_row,
            ident,
            *[number] * 7,
            st.lists(number, max_size=13),
            number,
            st.lists(number, max_size=13),
            number,
        ),  # fmt: skip
        max_size=8,
    ).map(msg.BackendStats.of),
    frontends=st.lists(
        st.builds(msg.FrontendReport, ident, number, number, st.lists(number, max_size=11)),
        max_size=4,
    ),
)
def test_reports_of_any_size_round_trip(table, backends, frontends):
    report = msg.Report(table, backends, frontends)
    assert msg.Decoder().feed(msg.encode(report)) == [report]


@given(workers=st.dictionaries(ident, counts, max_size=4), version=ident)
def test_counts_round_trip(workers, version):
    message = msg.Counts(table=version, workers=workers, gone=sorted(workers)[:1])
    assert msg.Decoder().feed(msg.encode(message)) == [message]


entry = st.builds(
    msg.BackendEntry,
    st.integers(min_value=0, max_value=30),
    st.sampled_from(["127.0.0.1", "::1"]),
    st.integers(min_value=1, max_value=3),
    st.integers(min_value=0, max_value=3),
    st.booleans(),
    st.booleans(),
)
pool_entries = st.lists(entry, max_size=12, unique_by=lambda e: e.id)


@given(
    old=st.lists(pool_entries, min_size=1, max_size=3),
    new=st.lists(pool_entries, min_size=1, max_size=3),
    keep=st.lists(st.booleans(), max_size=40),
)
def test_a_table_change_applied_gives_the_new_table(old, new, keep):
    """Whatever two tables: table_change either says a whole table is needed or gives one
    that apply_change turns the old table into the new one, exactly (order too)."""
    before = msg.Table(1, [msg.PoolTable(i, entries) for i, entries in enumerate(old)])
    # The new table often shares most entries with the old, as a flap's does.
    mixed = []
    for i, entries in enumerate(new):
        base = old[i] if i < len(old) else []
        chosen = [e for e, k in zip(base, keep, strict=False) if k] or entries
        mixed.append(
            msg.PoolTable(i, chosen + [e for e in entries if e.id not in {c.id for c in chosen}])
        )
    after = msg.Table(2, mixed)
    change = msg.table_change(before, after)
    if change is not None:
        assert (change.version, change.base) == (2, 1)
        decoded = msg.Decoder().feed(msg.encode(change))[0]
        assert msg.apply_change(before, decoded) == after


def test_a_flap_of_one_of_1000_backends_is_a_change_of_one_entry():
    entries = [msg.BackendEntry(i, "127.0.0.1", 10000 + i, 1, True, False) for i in range(1000)]
    before = msg.Table(4, [msg.PoolTable(0, entries)])
    flapped = list(entries)
    flapped[500] = msg.BackendEntry(500, "127.0.0.1", 10500, 1, False, False)
    after = msg.Table(5, [msg.PoolTable(0, flapped)])
    change = msg.table_change(before, after)
    assert change == msg.TableChange(5, 4, [msg.PoolChange(0, [flapped[500]], [])])
    assert len(msg.encode(change)) < 200 < 40_000 < len(msg.encode(after))
    # A change to most entries, or to the pools, goes as a whole table.
    assert msg.table_change(before, msg.Table(5, [msg.PoolTable(0, entries[:400])])) is None
    assert msg.table_change(before, msg.Table(5, [msg.PoolTable(1, entries)])) is None


@pytest.mark.parametrize(
    "body, reason",
    [
        (raw(t="reboot"), "unknown message type"),
        (raw(kind="hello"), "unknown message type"),
        (raw(t=5), "unknown message type"),
        (raw(t="hello", worker=1), "missing field 'pid'"),
        (raw(t="counts", workers={1: {1: 1}}), "missing field 'table'"),
        (raw(t="counts", table=1), "missing field 'workers'"),
        (raw(t="hello", worker="one", pid=2), "hello"),
        (raw(t="counts", table=1, workers={1: {1: "two"}}), "workers must map worker pids"),
        (raw(t="counts", table=1, workers={1: [1, 2]}), "workers must map worker pids"),
        (raw(t="counts", table=1, workers=[1, 2]), "workers must map worker pids"),
        (raw(t="counts", table=1, workers={}, gone=[True]), "gone must be a list"),
        (raw(t="table", version=1, pools=[{"id": 0}]), "missing field 'backends'"),
        (
            raw(t="table", version=1, pools=[{"id": 0, "backends": [["127.0.0.1", 80]]}]),
            "not a map",
        ),
        (
            raw(t="table", version=1, pools=[{"id": 0, "backends": [
                {"id": 1, "host": 80, "port": 80, "weight": 1, "up": True, "backup": False},
            ]}]),
            "host must be a string",
        ),
        (
            raw(t="table", version=1, pools=[{"id": 0, "backends": [
                {"id": 1, "host": "::1", "port": 80, "weight": 1, "up": 1, "backup": False},
            ]}]),
            "up must be true or false",
        ),
        (raw(t="table", version=1, pools=5), "pools must be a list"),
        (raw(t="report", table=1, backends=[], frontends=[]), "report.backends: not a map"),
        (
            raw(t="report", table=1, backends={**NO_BACKENDS, "id": None}, frontends=[]),
            "report.backends: id must be a list",
        ),
        (
            raw(t="report", table=1, backends={"id": [1], "active": [1]}, frontends=[]),
            "report.backends: missing 'new'",
        ),
        (
            raw(t="report", table=1, backends={**NO_BACKENDS, "new": [1.5]}, frontends=[]),
            "new must be a list of whole numbers",
        ),
        (
            raw(t="report", table=1, backends={**NO_BACKENDS, "connect_ms": [1]}, frontends=[]),
            "connect_ms must be a list of lists of whole numbers",
        ),
        (
            raw(t="report", table=1, backends={**NO_BACKENDS, "duration_ms": [[1, "x"]]},
                frontends=[]),
            "duration_ms must be a list of lists of whole numbers",
        ),
        (
            raw(t="report", table=1, backends={**NO_BACKENDS, "id": [1, 2], "active": [1]},
                frontends=[]),
            "active has 1 rows where id has 2",
        ),
        (
            raw(t="report", table=1, backends=NO_BACKENDS, frontends=[],
                udp=[{"id": 0, "flows": 1, "dropped": [1, "x"]}]),
            "dropped must be a list of whole numbers",
        ),
        (
            raw(t="report", table=1, backends=NO_BACKENDS, frontends=[], counts={1: "x"}),
            "counts must map backend ids to counts",
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
    assert decoder.feed(msg.encode(msg.Counts(1, {9: {0: 2}}))) == [msg.Counts(1, {9: {0: 2}})]


@given(junk=st.binary(max_size=64))
def test_no_input_makes_the_decoder_raise(junk):
    kinds = (
        msg.Invalid,
        msg.Hello,
        msg.Report,
        msg.Table,
        msg.TableChange,
        msg.Counts,
        msg.Drain,
        msg.KillSessions,
    )
    decoder = msg.Decoder()
    for i in range(len(junk)):
        assert all(isinstance(item, kinds) for item in decoder.feed(junk[i : i + 1]))


# ---- the supervisor's side of the stream -------------------------------------------------------
# A real Arbiter (not running its loop) with real socketpairs standing in for two workers; the
# "worker processes" are sleep(1) children so that anything the supervisor does to a PID only
# touches processes this test owns.


@pytest.fixture
def supervisor():
    yield from started_supervisor("leastconn")


@pytest.fixture
def roundrobin_supervisor():
    yield from started_supervisor("roundrobin")


def started_supervisor(algorithm: str):
    config = fastlb_config.load(
        {
            "listen": ["127.0.0.1:0"],
            "backends": ["127.0.0.1:9", "127.0.0.1:10"],
            "workers": "2",
            "fall": "3",
            "algorithm": algorithm,
        },
        None,
    )
    sockets = Sockets()
    arbiter = Arbiter(sockets.prepare(config), sockets)
    sleepers, peers = [], []
    for worker_id in range(2):
        sleeper = subprocess.Popen(["sleep", "60"])
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(5)
        # One socket for the control and counts streams: received() sees both, in order.
        worker = WorkerHandle(worker_id, sleeper.pid, ours, ours, 0.0, arbiter.generation)
        arbiter.workers[sleeper.pid] = worker
        arbiter.selector.register(ours, worker.events, lambda mask, w=worker: None)
        sleepers.append(sleeper)
        peers.append(theirs)
    yield arbiter, list(arbiter.workers.values()), peers
    arbiter.shutdown()  # kills and reaps the sleepers
    for peer in peers:
        peer.close()


def report(table=1, active=(0, 0), new=(0, 0), failed=(0, 0), succeeded=(0, 0), streak=(0, 0)):
    """A report on the two backends of the supervisor fixture (ids 0 and 1), by position."""
    return msg.Report(
        table,
        msg.BackendStats.of(
            backend_row(i, active[i], new[i], 0, 0, failed[i], succeeded[i], streak[i])
            for i in range(2)
        ),
        [],
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
    assert workers[0].active == {0: 2}
    unknown = msg.Report(1, msg.BackendStats.of([backend_row(99, active=1, new=1, failed=5)]), [])
    deliver(arbiter, workers[0], peers[0], msg.encode(unknown))
    assert arbiter.backends[0].connections == 4 and 99 not in workers[0].active
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("unknown message type 'bogus'" in w for w in warnings)
    assert any("undecodable" in w for w in warnings)


def test_counts_tell_each_worker_what_the_others_hold(supervisor):
    arbiter, workers, peers = supervisor
    first, second = (worker.pid for worker in workers)
    deliver(arbiter, workers[0], peers[0], msg.encode(report(active=(3, 1))))
    deliver(arbiter, workers[1], peers[1], msg.encode(report(active=(1, 0))))
    arbiter.publish()  # once per turn of the loop, after all its messages
    # Each worker's counts that changed (from 0 at first), passed on to the other one.
    assert received(peers[0]) == [msg.Counts(table=1, workers={second: {0: 1}})]
    assert received(peers[1]) == [msg.Counts(table=1, workers={first: {0: 3, 1: 1}})]
    arbiter.publish()
    assert received(peers[0]) == []  # nothing changed: nothing sent
    deliver(arbiter, workers[1], peers[1], msg.encode(report(active=(0, 0))))
    arbiter.publish()
    assert received(peers[0]) == [msg.Counts(table=1, workers={second: {0: 0}})]
    assert received(peers[1]) == []
    # A worker that exits: the others forget its counts.
    arbiter.disconnect(workers[0])
    arbiter.publish()
    assert received(peers[1]) == [msg.Counts(table=1, workers={}, gone=[first])]


def test_workers_whose_picks_do_not_read_counts_are_sent_none(roundrobin_supervisor):
    arbiter, workers, peers = roundrobin_supervisor
    deliver(arbiter, workers[0], peers[0], msg.encode(report(active=(3, 1))))
    deliver(arbiter, workers[1], peers[1], msg.encode(msg.Hello(worker=1, pid=workers[1].pid)))
    arbiter.publish()
    assert received(peers[0]) == [] and received(peers[1]) == []
    assert arbiter.active_totals() == {0: 3, 1: 1}  # the supervisor's own totals still do


def test_a_worker_that_says_hello_is_sent_the_others_whole_counts(supervisor):
    arbiter, workers, peers = supervisor
    deliver(arbiter, workers[0], peers[0], msg.encode(report(active=(3, 1))))
    arbiter.publish()
    received(peers[1])
    deliver(arbiter, workers[1], peers[1], msg.encode(msg.Hello(worker=1, pid=workers[1].pid)))
    arbiter.publish()
    assert received(peers[1]) == [msg.Counts(table=1, workers={workers[0].pid: {0: 3, 1: 1}})]
    assert received(peers[0]) == []


def test_count_maps_reach_the_other_workers_with_the_time_of_the_change(supervisor):
    arbiter, workers, peers = supervisor
    changed = msg.Report(
        table=1, backends=msg.BackendStats(), frontends=[], counts={1: 2}, counts_since_us=777
    )
    deliver(arbiter, workers[0], peers[0], msg.encode(changed))
    arbiter.publish()
    assert received(peers[1]) == [
        msg.Counts(table=1, workers={workers[0].pid: {1: 2}}, counts_since_us=777)
    ]
    assert received(peers[0]) == []  # what the others hold did not change
    stale = msg.Report(
        table=1, backends=msg.BackendStats(), frontends=[], count_staleness=[0, 0, 2]
    )
    deliver(arbiter, workers[1], peers[1], msg.encode(stale))
    assert arbiter.snapshot()["count_staleness_ms"]["counts"][:3] == [0, 0, 2]


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
        # The new table; no counts, as none changed.
        (table,) = received(peer)
        assert table.version == 2
        assert [b.up for b in table.pools[0].backends] == [False, True]
    assert arbiter.snapshot()["backends"][0]["failed"] == 6


def test_reports_against_an_old_table_count_traffic_but_not_failures(supervisor):
    arbiter, workers, peers = supervisor
    arbiter.table_version = 5
    deliver(arbiter, workers[0], peers[0], msg.encode(report(table=4, failed=(9, 0), new=(1, 0))))
    assert arbiter.backends[0].up
    assert arbiter.backends[0].failed == 9 and arbiter.backends[0].connections == 1


def test_a_flap_goes_out_as_a_change_of_one_entry(supervisor):
    arbiter, workers, peers = supervisor
    for worker in workers:
        worker.table_sent = arbiter.table(worker.generation)  # as spawn_worker records it
    first = workers[0].table_sent
    arbiter.mark_down(arbiter.backends[0], "test")
    arbiter.publish()
    for peer in peers:
        (change,) = received(peer)
        assert isinstance(change, msg.TableChange) and change.base == first.version
        assert [entry.id for pool in change.pools for entry in pool.backends] == [0]
        assert msg.apply_change(first, change) == arbiter.table(arbiter.generation)


def test_tables_made_entry_by_entry_equal_whole_ones(supervisor):
    """Each turn's table is the last with the changed backends' entries made anew; whatever
    the checks and agents say, it equals the table made from every backend."""
    arbiter, workers, peers = supervisor
    rng = random.Random(7)
    for worker in workers:
        worker.table_sent = arbiter.table(worker.generation)
    held = [worker.table_sent for worker in workers]  # what each worker makes of what it got
    for turn in range(80):
        backend_id = rng.choice(list(arbiter.backends))
        result = CheckResult(
            ok=rng.random() < 0.5,
            duration=0.001,
            reason="test",
            agent_state=rng.choice([None, None, "drain", "maint", "ready"]),
            agent_weight=rng.choice([None, None, 0, 50, 100]),
        )
        arbiter.on_check(backend_id, result)
        arbiter.publish()
        whole = arbiter.table(arbiter.generation)
        cached, _ = arbiter.table_cache[arbiter.generation.number]
        assert cached == whole, turn
        for i, peer in enumerate(peers):
            for message in received(peer):
                if isinstance(message, msg.TableChange):
                    message = msg.apply_change(held[i], message)
                if isinstance(message, msg.Table):
                    held[i] = message
            assert held[i] == whole, turn


def test_totals_and_each_workers_sums_equal_what_the_workers_reported(supervisor):
    """The supervisor's totals, and what each worker makes of the counts it is sent (the sum
    over the other workers), equal the sums of what each worker last reported."""
    arbiter, workers, peers = supervisor
    sums = [_dataplane.PeerCounts() for _ in workers]

    def check_sums(turn):
        arbiter.publish()
        for i, peer in enumerate(peers):
            for message in received(peer):
                sums[i].apply(message.workers, message.gone)
            others = [w for w in workers if w is not workers[i] and w.connected]
            for backend_id in arbiter.backends:
                held = sum(w.active.get(backend_id, 0) for w in others)
                assert sums[i].others.get(backend_id, 0) == held, (turn, i)

    rng = random.Random(3)
    for turn in range(200):
        worker = rng.choice(workers)
        if rng.random() < 0.5:
            counts = {rng.randrange(3): rng.randrange(5) for _ in range(rng.randrange(1, 3))}
            message = msg.Report(table=1, backends=msg.BackendStats(), frontends=[], counts=counts)
        else:
            message = report(active=(rng.randrange(5), rng.randrange(5)))
        deliver(arbiter, worker, peers[workers.index(worker)], msg.encode(message))
        expected = {b: sum(w.active.get(b, 0) for w in workers) for b in arbiter.backends}
        assert arbiter.active_totals() == expected, turn
        if rng.random() < 0.3:
            check_sums(turn)
    check_sums("end")
    arbiter.disconnect(workers[0])
    assert arbiter.active_totals() == {b: workers[1].active.get(b, 0) for b in arbiter.backends}
    check_sums("after a worker exited")
