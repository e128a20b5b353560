"""Rise/fall hysteresis, the cross-worker failure run, flap damping, the health history, slow
start and the panic threshold, without sockets or clocks."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastlb.health.state import (
    HISTORY_LENGTH,
    Damping,
    FailureRun,
    HealthState,
    History,
    effective_weight,
    in_panic,
)


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


# ---- flap damping ------------------------------------------------------------------------------


def test_a_fall_soon_after_a_rise_is_held_longer_each_time():
    damping = Damping(window=60, base=10, max=25)
    assert damping.on_fall(0) == 0  # no rise before: no flap
    assert damping.may_rise(0)
    damping.on_rise(100)
    assert damping.on_fall(130) == 10  # 30 s after rising
    assert not damping.may_rise(139.9) and damping.may_rise(140)
    damping.on_rise(150)
    assert damping.on_fall(160) == 20
    damping.on_rise(200)
    assert damping.on_fall(201) == 25  # 30, capped
    damping.on_rise(300)
    assert damping.on_fall(310) == 25
    assert damping.flaps == 4


def test_a_fall_after_a_stable_period_starts_the_count_again():
    damping = Damping(window=60, base=10, max=300)
    damping.on_rise(0)
    assert damping.on_fall(10) == 10
    damping.on_rise(20)
    assert damping.on_fall(30) == 20
    damping.on_rise(40)
    assert damping.on_fall(101) == 0  # up for 61 s: stable
    assert damping.flaps == 0 and damping.may_rise(101)
    damping.on_rise(200)
    assert damping.on_fall(200) == 10  # the first flap again


def test_a_window_of_0_is_no_damping():
    damping = Damping(window=0, base=10, max=300)
    for now in range(10):
        damping.on_rise(now)
        assert damping.on_fall(now) == 0
        assert damping.may_rise(now)


def test_damping_takes_sensible_settings():
    for window, base, longest in ((-1, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ValueError):
            Damping(window, base, longest)


def damping_model(window, base, longest, events):
    """The hold of each fall, stated plainly: count the quick falls in a row."""
    holds, run, rose = [], 0, None
    for kind, at in events:
        if kind == "rise":
            rose = at
            continue
        run = run + 1 if window > 0 and rose is not None and at - rose <= window else 0
        holds.append(min(base * run, longest) if run else 0)
    return holds


@given(
    window=st.sampled_from([0, 5, 60]),
    base=st.integers(min_value=1, max_value=30),
    longest=st.integers(min_value=1, max_value=200),
    gaps=st.lists(st.integers(min_value=0, max_value=100), max_size=30),
)
@example(window=5, base=7, longest=7, gaps=[0, 0, 0, 6])  # a rise held back, then no flap
def test_damping_matches_counting_quick_falls(window, base, longest, gaps):
    damping = Damping(window, base, longest)
    events, holds, now, held_until = [], [], 0, 0
    for index, gap in enumerate(gaps):  # rise, fall, rise, fall... ``gap`` apart
        now += gap
        if index % 2 == 0:
            now = max(now, held_until)  # as the checker does, no rise before the hold ends
            assert damping.may_rise(now)
            damping.on_rise(now)
            events.append(("rise", now))
        else:
            hold = damping.on_fall(now)
            events.append(("fall", now))
            holds.append(hold)
            assert 0 <= hold <= longest
            assert damping.may_rise(now) == (hold == 0)
            assert damping.may_rise(now + hold)
            held_until = now + hold
    assert holds == damping_model(window, base, longest, events)


# ---- the history of a backend --------------------------------------------------------------


def test_history_records_state_since_last_check_and_transitions():
    history = History("up", now=1000.0)
    assert history.as_dict() == {
        "state": "up", "since": 1000.0, "last_check": None, "transitions": [],
    }  # fmt: skip
    history.checked(1001.0, ok=False, reason="connection refused", duration=0.002)
    assert history.transition(1001.0, "down", "3 checks failed in a row")
    assert not history.transition(1002.0, "down", "again")  # no change: not recorded
    history.checked(1003.0, ok=True, reason="200 OK", duration=0.01)
    assert history.transition(1003.5, "drain", "weight 0")
    assert history.as_dict() == {
        "state": "drain",
        "since": 1003.5,
        "last_check": {"ok": True, "reason": "200 OK", "duration": 0.01, "at": 1003.0},
        "transitions": [
            {"at": 1001.0, "from": "up", "to": "down", "reason": "3 checks failed in a row"},
            {"at": 1003.5, "from": "down", "to": "drain", "reason": "weight 0"},
        ],
    }


def test_history_keeps_the_last_transitions():
    history = History("up", now=0.0)
    for step in range(1, 26):
        history.transition(float(step), "down" if step % 2 else "up", f"step {step}")
    transitions = history.as_dict()["transitions"]
    assert len(transitions) == HISTORY_LENGTH == 10
    assert [t["reason"] for t in transitions] == [f"step {n}" for n in range(16, 26)]
    assert (history.state, history.since) == ("down", 25.0)


def test_history_knows_the_states():
    with pytest.raises(ValueError):
        History("sick", now=0.0)
    history = History("maint", now=0.0)
    with pytest.raises(ValueError):
        history.transition(1.0, "gone", "")
    assert history.state == "maint" and not history.transitions


# ---- slow start and the panic threshold ------------------------------------------------------


def test_slow_start_ramps_from_5_percent_to_the_weight():
    assert effective_weight(100, since_up=0, slow_start=10) == 5
    assert effective_weight(100, since_up=5, slow_start=10) == 52  # 5 + 95 / 2, rounded down
    assert effective_weight(100, since_up=10, slow_start=10) == 100
    assert effective_weight(100, since_up=1e9, slow_start=10) == 100
    assert effective_weight(1, since_up=0, slow_start=10) == 1  # at least 1
    assert effective_weight(10, since_up=-3, slow_start=10) == 1  # a clock step back
    assert effective_weight(0, since_up=0, slow_start=10) == 0  # drained stays drained
    assert effective_weight(7, since_up=0, slow_start=0) == 7  # off


@given(
    weight=st.integers(min_value=0, max_value=1_000_000),
    slow_start=st.floats(min_value=0, max_value=600),
    times=st.lists(st.floats(min_value=-10, max_value=1000), min_size=1, max_size=20),
)
def test_slow_start_is_monotonic_and_bounded(weight, slow_start, times):
    weights = [effective_weight(weight, t, slow_start) for t in sorted(times)]
    assert weights == sorted(weights)
    for t, value in zip(sorted(times), weights, strict=True):
        assert (1 if weight else 0) <= value <= weight
        if t >= slow_start:
            assert value == weight


def test_panic_when_fewer_than_the_threshold_of_primaries_are_up():
    assert in_panic(up_primaries=1, primaries=4, threshold=0.5)
    assert not in_panic(up_primaries=2, primaries=4, threshold=0.5)  # exactly half: no panic
    assert not in_panic(up_primaries=3, primaries=10, threshold=0.3)  # no rounding surprise
    assert in_panic(up_primaries=0, primaries=3, threshold=0.5)
    assert not in_panic(up_primaries=0, primaries=3, threshold=0)  # off
    assert not in_panic(up_primaries=0, primaries=0, threshold=0.5)  # no primaries


@given(
    primaries=st.integers(min_value=1, max_value=200),
    percent=st.integers(min_value=0, max_value=100),
    data=st.data(),
)
def test_panic_is_up_share_below_threshold(primaries, percent, data):
    up = data.draw(st.integers(min_value=0, max_value=primaries))
    assert in_panic(up, primaries, percent / 100) == (up * 100 < percent * primaries)
