"""Health state of one backend, without I/O: results go in, up/down transitions come out.

:class:`HealthState` is HAProxy's check counter: one number ``health`` from 0 to
``rise + fall - 1``; the backend is up while ``health >= rise``. A failure while up steps it down
by one and the ``fall``-th failure in a row marks the backend down (``health = 0``); a success
while up restores it to the top. While down, successes step it up and the ``rise``-th in a row
marks the backend up, while a failure starts the count again. So a backend goes down after
exactly ``fall`` consecutive failures and comes back after exactly ``rise`` consecutive
successes, and nothing in between flaps it.

:class:`FailureRun` counts consecutive failed connects on one backend across all workers, from
their reports (passive detection).
"""

from __future__ import annotations

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
