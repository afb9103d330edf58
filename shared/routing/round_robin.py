"""Round-robin: each job to the next worker in turn, whatever it holds or has queued (a baseline)."""

from __future__ import annotations

from typing import ClassVar

from kleinfarm.shared.routing.policy import PendingJob, PerJobPolicy, WorkerState


class RoundRobinPolicy(PerJobPolicy):
    """The n-th job placed goes to candidate ``n mod len(candidates)``."""

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._placed = 0

    def choose(self, job: PendingJob, candidates: list[WorkerState]) -> WorkerState:
        worker = candidates[self._placed % len(candidates)]
        self._placed += 1
        return worker
