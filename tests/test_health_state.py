"""Rise/fall hysteresis and the cross-worker failure run, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlb.health.state import FailureRun, HealthState


def feed(state: HealthState, results: str) -> list[str | None]:
    """``results`` as a string of 'o' (passed) and 'x' (failed)."""
    return [state.observe(r == "o") for r in results]


def test_an_up_backend_goes_down_at_the_fall_th_failure_in_a_row():
    state = HealthState(rise=2, fall=3)
    assert state.up
    assert feed(state, "xxx") == [None, None, "down"]
    assert not state.up


def test_a_down_backend_comes_up_at_the_rise_th_success_in_a_row():
    state = HealthState(rise=2, fall=3, up=False)
    assert not state.up
    assert feed(state, "oo") == [None, "up"]
    assert state.up


def test_a_success_while_up_restarts_the_fall_count():
    state = HealthState(rise=2, fall=3)
    assert feed(state, "xxoxxoxx") == [None] * 8
    assert state.up
    assert feed(state, "x") == ["down"]


def test_a_failure_while_down_restarts_the_rise_count():
    state = HealthState(rise=3, fall=2, up=False)
    assert feed(state, "ooxoo") == [None] * 5
    assert feed(state, "o") == ["up"]


def test_rise_and_fall_of_one_flip_on_every_change():
    state = HealthState(rise=1, fall=1)
    assert feed(state, "xxooxo") == ["down", None, "up", None, "down", "up"]


def test_rise_and_fall_must_be_positive():
    with pytest.raises(ValueError):
        HealthState(rise=0, fall=1)
    with pytest.raises(ValueError):
        HealthState(rise=1, fall=0)


def model(rise: int, fall: int, up: bool, results: list[bool]) -> list[str | None]:
    """The intended behaviour, stated plainly: count the current run of equal results."""
    out = []
    run = 0
    for ok in results:
        if ok == up:
            run = 0
            out.append(None)
            continue
        run += 1
        if run == (rise if ok else fall):
            up, run = ok, 0
            out.append("up" if ok else "down")
        else:
            out.append(None)
    return out


@given(
    rise=st.integers(min_value=1, max_value=6),
    fall=st.integers(min_value=1, max_value=6),
    up=st.booleans(),
    results=st.lists(st.booleans(), max_size=60),
)
def test_the_single_counter_matches_counting_runs(rise, fall, up, results):
    state = HealthState(rise, fall, up=up)
    assert [state.observe(ok) for ok in results] == model(rise, fall, up, results)


@given(
    rise=st.integers(min_value=1, max_value=6),
    fall=st.integers(min_value=1, max_value=6),
    results=st.lists(st.booleans(), max_size=60),
)
def test_transitions_alternate_and_match_the_state(rise, fall, results):
    state = HealthState(rise, fall)
    was_up = True
    for ok in results:
        transition = state.observe(ok)
        if transition == "down":
            assert was_up and not ok
        elif transition == "up":
            assert not was_up and ok
        else:
            assert state.up == was_up
        was_up = state.up
        assert 0 <= state.health <= rise + fall - 1


@given(
    rise=st.integers(min_value=1, max_value=6),
    fall=st.integers(min_value=1, max_value=6),
    results=st.lists(st.booleans(), min_size=1, max_size=60),
)
def test_only_a_run_of_fall_failures_takes_a_backend_down(rise, fall, results):
    state = HealthState(rise, fall)
    run = 0
    for ok in results:
        transition = state.observe(ok)
        run = 0 if ok else run + 1
        if transition == "down":
            assert run >= fall


def test_failure_run_adds_failures_across_reports():
    run = FailureRun(fall=3)
    assert not run.report(failed=1, succeeded=0, streak=1)
    assert not run.report(failed=1, succeeded=0, streak=1)  # another worker
    assert run.report(failed=1, succeeded=0, streak=2)
    assert run.count == 3


def test_a_success_restarts_the_run_at_that_workers_streak():
    run = FailureRun(fall=3)
    run.report(failed=2, succeeded=0, streak=2)
    # Another worker: failures, then a success, then one more failure.
    assert not run.report(failed=3, succeeded=1, streak=1)
    assert run.count == 1
    assert run.report(failed=2, succeeded=0, streak=2)


def test_failure_run_reset():
    run = FailureRun(fall=2)
    run.report(failed=5, succeeded=0, streak=5)
    run.reset()
    assert run.count == 0
    assert not run.report(failed=1, succeeded=0, streak=1)


@given(
    fall=st.integers(min_value=1, max_value=5),
    failures=st.lists(st.integers(min_value=0, max_value=4), max_size=30),
)
def test_without_successes_the_run_is_the_sum_of_failures(fall, failures):
    run = FailureRun(fall)
    total = 0
    for failed in failures:
        total += failed
        assert run.report(failed, succeeded=0, streak=total) == (total >= fall)
        assert run.count == total


@given(
    before=st.lists(st.integers(min_value=0, max_value=4), max_size=10),
    streak=st.integers(min_value=0, max_value=4),
)
def test_a_report_with_a_success_sets_the_run_to_its_streak(before, streak):
    run = FailureRun(fall=100)
    for failed in before:
        run.report(failed, succeeded=0, streak=failed)
    run.report(failed=streak + 1, succeeded=1, streak=streak)
    assert run.count == streak
