"""Nothing stuck: the dispatcher leader returns to the queue the jobs no live worker holds.

The farm's record gives every assigned or running job to a worker (``keys.ACTIVE`` lists them).
That record can outlive the truth: the job's final move or its release was lost while Redis was
unreachable (or AOF ``everysec`` lost the last second), its Celery message was never sent, or its
worker died without being retired. Left alone, such a job never ends, its campaign never closes and
its worker loses a slot for good.

A job is held when its worker is live (heartbeat within the lapse, by the Redis clock), keeps it in
its assigned zset, and, for a running job, reports it in its heartbeat's ``holding`` list; an
assigned job may instead still wait as a Celery message on the worker's own queue. A job found not
held on two passes in a row, unchanged (same state, worker and attempt), is given back with the
``recover`` move: two passes, several heartbeats apart, so a job claimed a moment ago and not yet
reported is never taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

from kleinfarm.shared import keys
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.state import FarmState
from kleinfarm.shared.states import WITH_WORKER, JobState, Move

log = logging.getLogger(__name__)


def task_id(job_id: str, attempt: int) -> str:
    """The Celery task id of one attempt of a job (what the dispatcher publishes it under)."""
    return f"{job_id.replace('/', '.')}.{attempt}"


@dataclass(frozen=True)
class Sighting:
    """What the record said of a job on one pass."""

    state: str
    worker: str
    attempt: int


@dataclass
class WorkerHoldings:
    """What one live worker holds: its assigned zset, what it runs, the tasks on its queue."""

    assigned: set[str]
    running: set[str]
    queued_tasks: set[str]


class Reconciler:
    """Gives back, every ``interval_s``, the jobs found not held on two passes in a row."""

    def __init__(self, state: FarmState, registry: Registry, interval_s: float) -> None:
        self.state = state
        self.registry = registry
        self.interval_s = interval_s
        self._suspects: dict[str, Sighting] = {}
        self._next_pass = 0.0

    def maybe_run(self) -> int:
        """A pass if one is due; return the jobs given back."""
        now = time.monotonic()
        if now < self._next_pass:
            return 0
        self._next_pass = now + self.interval_s
        return self.run()

    def forget(self) -> None:
        """Drop what earlier passes saw (this process no longer leads; a new leader starts afresh)."""
        self._suspects = {}
        self._next_pass = 0.0

    def run(self) -> int:
        """One pass: note the jobs not held; give back those already noted last pass, unchanged."""
        sightings = self._sightings()
        holdings = self._holdings({sighting.worker for sighting in sightings.values()})
        unheld = {
            job_id: sighting
            for job_id, sighting in sightings.items()
            if not self._held(job_id, sighting, holdings.get(sighting.worker))
        }
        given_back = [job_id for job_id, sighting in unheld.items() if self._suspects.get(job_id) == sighting]
        self._suspects = {job_id: sighting for job_id, sighting in unheld.items() if job_id not in given_back}
        return sum(self._give_back(job_id, unheld[job_id]) for job_id in given_back)

    def _sightings(self) -> dict[str, Sighting]:
        """State, worker and attempt of every job the index says is with a worker."""
        job_ids = self.state.active_job_ids()
        pipe = self.state.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), ["state", "worker", "attempt"])
        sightings, stale = {}, []
        for job_id, (current, worker, attempt) in zip(job_ids, pipe.execute(), strict=True):
            if current in WITH_WORKER:
                sightings[job_id] = Sighting(current, worker or "", int(attempt or 0))
            else:
                stale.append(job_id)  # its records are gone, or an index older than this code
        if stale:
            self.state.redis.srem(keys.ACTIVE, *stale)
        return sightings

    def _holdings(self, worker_ids: set[str]) -> dict[str, WorkerHoldings]:
        """What each of these workers that is live holds (a worker not live holds nothing)."""
        live = sorted(worker_ids & self.registry.live_ids())
        running = self.registry.holding(live)
        pipe = self.state.redis.pipeline(transaction=False)
        for worker_id in live:
            pipe.zrange(keys.worker_assigned(worker_id), 0, -1)
            for queue in keys.worker_queue_lists(worker_id):
                pipe.lrange(queue, 0, -1)
        replies = iter(pipe.execute())
        holdings = {}
        for worker_id in live:
            assigned = set(next(replies))
            messages = [message for _ in keys.worker_queue_lists(worker_id) for message in next(replies)]
            holdings[worker_id] = WorkerHoldings(assigned, running[worker_id], _task_ids(messages))
        return holdings

    @staticmethod
    def _held(job_id: str, sighting: Sighting, holdings: WorkerHoldings | None) -> bool:
        if holdings is None or job_id not in holdings.assigned:
            return False
        if job_id in holdings.running:
            return True
        # An assigned job may still wait on the worker's queue; a running one is in hand or lost.
        return sighting.state == JobState.ASSIGNED and task_id(job_id, sighting.attempt) in holdings.queued_tasks

    def _give_back(self, job_id: str, sighting: Sighting) -> int:
        reason = f"no live worker holds it (the record gave it to {sighting.worker or 'nobody'})"
        moved = self.registry.give_back(job_id, sighting.worker, reason, Move.RECOVER, sighting.attempt)
        if moved:
            log.warning(
                "%s was %s with %s, which does not hold it: given back", job_id, sighting.state, sighting.worker
            )
            self.state.wake_dispatcher("recovered")
        return int(moved)


def _task_ids(messages: list[str]) -> set[str]:
    """The task ids of kombu messages (JSON envelopes whose headers carry the id)."""
    found = set()
    for message in messages:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            found.add(str(json.loads(message)["headers"]["id"]))
    return found
