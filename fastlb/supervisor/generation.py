"""One generation of workers: the workers started for one Config, by slot.

A reload starts a new generation on the sockets the supervisor holds; it is *pending* until
every one of its workers said hello, then *active*, and the generations before it *drain*: they
stop polling the listeners (the sockets stay open in the supervisor) and finish their
connections, up to the drain timeout. A generation is *retired* once its last worker exited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastlb.model import Config

PENDING, ACTIVE, DRAINING = "pending", "active", "draining"


@dataclass
class Generation:
    number: int
    config: Config
    pool_ids: list[int]  # the stable id of each of the config's pools, in its order
    started: float
    ready_deadline: float  # pending past this: the reload failed
    state: str = PENDING
    drain_deadline: float = 0.0
    workers: dict[int, int] = field(default_factory=dict)  # slot -> pid of its worker
    counts_matter: bool = False  # its workers pick by every worker's counts: send them theirs

    @property
    def size(self) -> int:
        return self.config.workers

    def missing_slots(self) -> list[int]:
        return [slot for slot in range(self.size) if slot not in self.workers]
