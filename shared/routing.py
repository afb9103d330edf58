"""The routing policy as pure logic: which live worker gets the next pending job.

Pure so that the farm's dispatcher and the routing simulator run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """A worker as the policy sees it."""

    worker_id: str
    assigned: int

    @property
    def room(self) -> int: ...


W = TypeVar("W", bound=Candidate)


def pick_worker(workers: Sequence[W]) -> W | None:
    """The worker with room and the least work handed to it; ties go to the lowest id."""
    open_workers = [worker for worker in workers if worker.room > 0]
    if not open_workers:
        return None
    return min(open_workers, key=lambda worker: (worker.assigned, worker.worker_id))
