"""--cpu-affinity: each worker pinned to one CPU, as HAProxy's cpu-map and nginx's
worker_cpu_affinity do. Real fastlb processes on loopback; what a worker may run on is read from
the kernel (psutil, sched_getaffinity), and traffic goes through the pinned workers."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from conftest import recv_line, wait_until
from hypothesis import given
from hypothesis import strategies as st

from fastlb.model import format_cpu_list, parse_cpu_list

ALLOWED = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to tell workers apart")


def worker_cpus(lb, stats: dict | None = None, generation: int = 1) -> dict[int, list[int]]:
    """Worker id -> the CPUs the kernel lets it run on, for the workers of ``generation``,
    checked against what /stats says."""
    cpus = {}
    for worker in (stats or lb.stats())["workers"]:
        if worker["generation"] != generation:
            continue
        kernel = sorted(psutil.Process(worker["pid"]).cpu_affinity())
        assert worker["cpus"] == kernel, f"/stats says {worker['cpus']}, the kernel {kernel}"
        cpus[worker["id"]] = kernel
    return cpus


@two_cpus
def test_workers_take_the_listed_cpus_in_turn_and_forward(backends, balancer):
    a = backends("name", name="a")
    first, second = ALLOWED[0], ALLOWED[1]
    lb = balancer([a], "--cpu-affinity", f"{second},{first}", workers=3)
    # Three workers over two CPUs: the list wraps around.
    assert worker_cpus(lb) == {0: [second], 1: [first], 2: [second]}
    assert [lb.ask_name() for _ in range(6)] == ["a"] * 6
    # The supervisor and its health checks are not pinned.
    assert sorted(psutil.Process(lb.pid).cpu_affinity()) == ALLOWED


def test_auto_spreads_the_workers_over_the_cpus_fastlb_may_use(backends, balancer):
    a = backends("name", name="a")
    workers = min(len(ALLOWED), 4) + 1
    lb = balancer([a], "--cpu-affinity", "auto", workers=workers)
    expected = {i: [ALLOWED[i % len(ALLOWED)]] for i in range(workers)}
    assert worker_cpus(lb) == expected
    assert [lb.ask_name() for _ in range(3)] == ["a"] * 3


def test_without_it_the_workers_may_run_anywhere_fastlb_may(backends, balancer):
    lb = balancer([backends("name", name="a")], workers=2)
    assert worker_cpus(lb) == {0: ALLOWED, 1: ALLOWED}


@two_cpus
def test_a_reload_pins_the_new_workers_where_the_file_now_says(backends, balancer, tmp_path):
    a = backends("name", name="a")
    path = tmp_path / "lb.toml"
    path.write_text(f'backend = ["{a.address}"]\ncpu-affinity = "{ALLOWED[0]}"\n')
    lb = balancer([], "--config", str(path), workers=2)
    assert worker_cpus(lb) == {0: [ALLOWED[0]], 1: [ALLOWED[0]]}
    held = lb.connect()
    assert recv_line(held) == "a"

    path.write_text(f'backend = ["{a.address}"]\ncpu-affinity = "{ALLOWED[1]}"\n')
    os.kill(lb.pid, signal.SIGHUP)
    stats = lb.wait_for(
        lambda s: s["generation"] == 2 and s["generation_active"], what="the new generation"
    )
    assert worker_cpus(lb, stats, generation=2) == {0: [ALLOWED[1]], 1: [ALLOWED[1]]}
    assert [lb.ask_name() for _ in range(2)] == ["a", "a"]
    # The connection opened before the reload is still served, by its draining worker.
    draining = [w["cpus"] for w in lb.stats()["workers"] if w["draining"]]
    assert draining and all(cpus == [ALLOWED[0]] for cpus in draining)
    held.sendall(b"still here\n")
    assert recv_line(held) == "still here"
    held.close()


def test_a_cpu_this_process_may_not_use_is_refused_at_reload_and_the_workers_stay(
    backends, balancer, tmp_path
):
    a = backends("name", name="a")
    path = tmp_path / "lb.toml"
    path.write_text(f'backend = ["{a.address}"]\ncpu-affinity = "auto"\n')
    lb = balancer([], "--config", str(path))
    before = worker_cpus(lb)
    path.write_text(f'backend = ["{a.address}"]\ncpu-affinity = "{max(ALLOWED) + 1}"\n')
    os.kill(lb.pid, signal.SIGHUP)
    wait_until(lambda: "reload failed" in lb.log(), 10, "the refused reload")
    assert f"CPU {max(ALLOWED) + 1} is not one this process may run on" in lb.log()
    stats = lb.stats()
    assert stats["generation"] == 1
    assert worker_cpus(lb, stats) == before
    assert [lb.ask_name() for _ in range(2)] == ["a", "a"]


@given(st.sets(st.integers(0, 300), min_size=1))
def test_a_formatted_cpu_list_reads_back_as_the_same_cpus(cpus):
    text = format_cpu_list(list(cpus))
    assert parse_cpu_list(text) == sorted(cpus)
    # Ranges only where they save something: no a-a, and no two pieces that touch.
    pieces = text.split(",")
    assert len(pieces) == len(set(pieces))
    for piece in pieces:
        low, _, high = piece.partition("-")
        assert not high or int(high) > int(low)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "expected CPU numbers and ranges"),
        ("1,,2", "expected CPU numbers and ranges"),
        ("-1", "expected CPU numbers and ranges"),
        ("a-b", "expected CPU numbers and ranges"),
        ("3-1", "the range 3-1 runs backwards"),
        ("0-2,1", "CPU 1 is listed twice"),
    ],
)
def test_a_bad_cpu_list_says_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_cpu_list(text)


def test_cpu_lists_keep_the_order_given():
    assert parse_cpu_list("4-5, 0,2") == [4, 5, 0, 2]
