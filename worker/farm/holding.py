"""The jobs this worker process is running now, as its heartbeat reports them.

The reconciler trusts this over the farm's record: a job the record gives to a live worker that
does not report it (its final move or its release was lost while Redis was unreachable) goes back
to the queue.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class HeldJobs:
    """A thread-safe set of job ids: the task thread adds, it or the finisher removes, the heartbeat reads."""

    def __init__(self) -> None:
        # Counted: the finisher may still hold a job's earlier attempt while this thread holds its next.
        self._jobs: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._jobs[job_id] += 1

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._jobs[job_id] -= 1
            if self._jobs[job_id] <= 0:
                del self._jobs[job_id]

    @contextmanager
    def holding(self, job_id: str) -> Iterator[None]:
        self.add(job_id)
        try:
            yield
        finally:
            self.remove(job_id)

    def snapshot(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs)


# One per process: the solo pool runs one task at a time, and the heartbeat thread reports it.
HELD = HeldJobs()
