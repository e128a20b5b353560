"""Health state of one backend, without I/O: results go in, up/down transitions come out.
Times are given by the caller (``now``), so that nothing here reads a clock.

:class:`HealthState` is HAProxy's check counter: one number ``health`` from 0 to
``rise + fall - 1``; the backend is up while ``health >= rise``. A failure while up steps it down
by one and the ``fall``-th failure in a row marks the backend down (``health = 0``); a success
while up restores it to the top. While down, successes step it up and the ``rise``-th in a row
marks the backend up, while a failure starts the count again. So a backend goes down after
exactly ``fall`` consecutive failures and comes back after exactly ``rise`` consecutive
successes, and nothing in between flaps it.

:class:`FailureRun` counts consecutive failed connects on one backend across all workers, from
their reports (passive detection).

:class:`Damping` keeps a flapping backend down for longer each time; :class:`History` is what
/stats shows of a backend's health; :func:`effective_weight` is the weight of a backend in its
slow start, and :func:`in_panic` says when a pool has too few primaries up to be choosy.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

Transition = Literal["up", "down"]


class HealthState:
    def __init__(self, rise: int, fall: int, up: bool = True):
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.health = self._top if up else 0

    @property
    def _top(self) -> int:
        return self.rise + self.fall - 1

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    def observe(self, ok: bool) -> Transition | None:
        """Takes one check result; returns the transition it caused, if any."""
        if ok:
            if self.up:
                self.health = self._top
                return None
            self.health += 1
            if self.health < self.rise:
                return None
            self.health = self._top
            return "up"
        if self.health > self.rise:
            self.health -= 1
            return None
        was_up = self.up
        self.health = 0
        return "down" if was_up else None

    def __repr__(self) -> str:
        return f"HealthState(rise={self.rise}, fall={self.fall}, health={self.health})"


class FailureRun:
    """Consecutive failed connects to one backend, all workers together.

    Each worker report carries, per backend, the connects that failed and succeeded since its
    last report and ``streak``, the failures in a row that worker has seen since its last
    success. A report with a success restarts the run at that worker's streak (the failures it
    saw after its success); a report without one adds its failures to the run.
    """

    def __init__(self, fall: int):
        self.fall = fall
        self.count = 0

    def report(self, failed: int, succeeded: int, streak: int) -> bool:
        """Takes one report's numbers; True when the run has reached ``fall``."""
        if succeeded > 0:
            self.count = max(0, streak)
        else:
            self.count += max(0, failed)
        return self.count >= self.fall

    def reset(self) -> None:
        self.count = 0


class Damping:
    """Flap damping of one backend, as Envoy's outlier ejection: a backend that goes down again
    soon after it came up is held down for longer each time.

    A fall within ``window`` seconds of the last rise is a flap. The n-th flap in a row holds
    the backend down for ``min(base * n, max)`` seconds: its checks go on, but it may not rise
    before the hold ends. A fall after the backend stayed up longer than ``window`` is no flap
    and starts the count again, so the next flap is the first. ``window`` 0 turns it off.
    """

    def __init__(self, window: float, base: float, max: float):
        if window < 0 or base <= 0 or max <= 0:
            raise ValueError("window must be 0 or more, base and max more than 0")
        self.window = window
        self.base = base
        self.max = max
        self.flaps = 0  # in a row
        self.last_rise: float | None = None
        self.held_until = -math.inf

    def on_rise(self, now: float) -> None:
        self.last_rise = now

    def on_fall(self, now: float) -> float:
        """Takes a fall at ``now``; returns how long the backend is held down (0: not held)."""
        quick = self.last_rise is not None and now - self.last_rise <= self.window
        if not (self.window > 0 and quick):
            self.flaps = 0
            return 0.0
        self.flaps += 1
        hold = min(self.base * self.flaps, self.max)
        self.held_until = now + hold
        return hold

    def may_rise(self, now: float) -> bool:
        """Whether the hold of the last flap, if any, is over."""
        return now >= self.held_until


STATES = ("up", "down", "drain", "maint")
State = Literal["up", "down", "drain", "maint"]
HISTORY_LENGTH = 10  # transitions kept per backend


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str  # why it failed, or what passed ("200 OK")
    duration: float  # seconds from the start of the check to its result
    at: float  # wall-clock time of the result


@dataclass(frozen=True)
class Change:
    at: float  # wall-clock time
    old: State
    new: State
    reason: str


class History:
    """The health of one backend as /stats shows it: its state since when, its last check and
    its last :data:`HISTORY_LENGTH` transitions. Times are wall-clock (``time.time()``)."""

    def __init__(self, state: State, now: float):
        _known(state)
        self.state: State = state
        self.since = now
        self.last_check: CheckResult | None = None
        self.transitions: deque[Change] = deque(maxlen=HISTORY_LENGTH)

    def transition(self, now: float, to: State, reason: str) -> bool:
        """Records a change of state; False (and nothing recorded) when it is the same."""
        _known(to)
        if to == self.state:
            return False
        self.transitions.append(Change(now, self.state, to, reason))
        self.state, self.since = to, now
        return True

    def checked(self, now: float, ok: bool, reason: str, duration: float) -> None:
        self.last_check = CheckResult(ok, reason, duration, now)

    def as_dict(self) -> dict:
        """Plain values for JSON; transitions oldest first."""
        check = self.last_check
        return {
            "state": self.state,
            "since": self.since,
            "last_check": None
            if check is None
            else {"ok": check.ok, "reason": check.reason, "duration": check.duration,
                  "at": check.at},
            "transitions": [
                {"at": c.at, "from": c.old, "to": c.new, "reason": c.reason}
                for c in self.transitions
            ],
        }  # fmt: skip


def _known(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")


SLOW_START_FIRST = 0.05  # the share of its weight a backend starts its slow start with


def effective_weight(weight: int, since_up: float, slow_start: float) -> int:
    """The weight of a backend ``since_up`` seconds after it came up, in a slow start of
    ``slow_start`` seconds (0: none).

    A straight line from ``max(1, weight // 20)`` (5%, and at least 1 so that the backend gets
    some traffic to prove itself with) at 0 seconds to ``weight`` at ``slow_start``, rounded
    down; the full weight from then on. Weight 0 stays 0.
    """
    if slow_start <= 0 or since_up >= slow_start or weight <= 0:
        return weight
    first = max(1, int(weight * SLOW_START_FIRST))
    share = max(0.0, since_up) / slow_start
    return min(weight, first + int((weight - first) * share))


def in_panic(up_primaries: int, primaries: int, threshold: float) -> bool:
    """Whether fewer than ``threshold`` (a share, 0 to 1) of a pool's primaries are up: then
    every primary takes traffic, up or down, rather than the few left taking all of it (Envoy's
    panic threshold). Threshold 0, or no primaries, is never a panic."""
    if primaries <= 0 or threshold <= 0:
        return False
    return up_primaries / primaries < threshold
