"""Least-loaded: each job to the worker with the fewest queued seconds (a baseline)."""

from __future__ import annotations

from typing import ClassVar

from kleinfarm.shared.routing.policy import PendingJob, PerJobPolicy, WorkerState


class LeastLoadedPolicy(PerJobPolicy):
    """The candidate whose queue frees first; ties to the first in the round's order."""

    name: ClassVar[str] = "least_loaded"

    def choose(self, job: PendingJob, candidates: list[WorkerState]) -> WorkerState:
        return min(candidates, key=lambda worker: worker.queued_ms)
