"""The worker registry: who is alive, what each holds, and what was handed to whom.

Workers publish a heartbeat (a ``WorkerReport``); a worker whose heartbeat lapses is retired and
every job handed to it goes back to the pending queue, because Celery never drains a dead
worker's queue by itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kleinfarm.shared import keys
from kleinfarm.shared.errors import JobNotFoundError
from kleinfarm.shared.records import WorkerReport
from kleinfarm.shared.state import FarmState
from kleinfarm.shared.states import JobState, Move

# A job lost with its worker this many times fails instead of requeueing forever (celery #9082).
MAX_ATTEMPTS = 3


@dataclass
class WorkerView:
    """What the dispatcher knows of one live worker."""

    worker_id: str
    assigned: dict[str, float]  # job_id -> estimated seconds
    report: WorkerReport

    @property
    def queue(self) -> str:
        return keys.worker_queue(self.worker_id)

    @property
    def slots(self) -> int:
        return self.report.slots

    @property
    def room(self) -> int:
        return max(self.slots - len(self.assigned), 0)

    @property
    def queued_s(self) -> float:
        return sum(self.assigned.values())

    @property
    def identity(self) -> str:
        return self.report.identity or self.worker_id

    @property
    def routes(self) -> set[str]:
        """Routing keys of the reference sets the worker reports holding (any tier)."""
        return set(self.report.routes)


class Registry:
    """Heartbeats, holdings and assignments of workers, in Redis."""

    def __init__(self, state: FarmState, lapse_s: float) -> None:
        self.state = state
        self.redis = state.redis
        self.lapse_s = lapse_s

    def heartbeat(self, worker_id: str, report: WorkerReport) -> None:
        """Say ``worker_id`` is alive now, with what it reports of itself.

        A worker that registers under the identity of another (the same card after a restart)
        retires the old one at once: its jobs go back, and nothing it cached is believed any more.
        """
        previous = self.redis.hget(keys.IDENTITIES, report.identity)
        if previous and previous != worker_id:
            self.retire(str(previous), reason=f"{report.identity} restarted as {worker_id}")
        pipe = self.redis.pipeline()
        pipe.hset(keys.worker(worker_id), mapping={"report": report.model_dump_json(), "seen": time.time()})
        pipe.zadd(keys.WORKERS, {worker_id: time.time()})
        pipe.hset(keys.IDENTITIES, report.identity, worker_id)
        pipe.execute()

    def live_workers(self) -> list[WorkerView]:
        ids: list[str] = self.redis.zrangebyscore(keys.WORKERS, time.time() - self.lapse_s, "+inf")  # type: ignore[assignment]
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hget(keys.worker(worker_id), "report")
            pipe.zrange(keys.worker_assigned(worker_id), 0, -1, withscores=True)
        replies = pipe.execute()
        views = []
        for worker_id, report, assigned in zip(ids, replies[::2], replies[1::2], strict=True):
            if report:
                views.append(WorkerView(worker_id, dict(assigned), WorkerReport.model_validate_json(report)))
        return views

    def lapsed_workers(self) -> list[str]:
        return list(self.redis.zrangebyscore(keys.WORKERS, "-inf", time.time() - self.lapse_s))  # type: ignore[arg-type]

    def assigned(self, worker_id: str) -> list[str]:
        return sorted(self.redis.zrange(keys.worker_assigned(worker_id), 0, -1))  # type: ignore[arg-type]

    def release(self, worker_id: str, job_id: str) -> None:
        """The worker is done with ``job_id``: free its slot and wake the dispatcher."""
        pipe = self.redis.pipeline()
        pipe.zrem(keys.worker_assigned(worker_id), job_id)
        pipe.lpush(keys.WAKE, worker_id)
        pipe.execute()

    def retire(self, worker_id: str, reason: str) -> int:
        """Forget a worker and requeue every job handed to it; return how many were requeued."""
        report = self.redis.hget(keys.worker(worker_id), "report")
        identity = WorkerReport.model_validate_json(report).identity if report else worker_id
        requeued = sum(self._requeue(worker_id, job_id, reason) for job_id in self.assigned(worker_id))
        self.redis.delete(keys.worker(worker_id), keys.worker_assigned(worker_id), *keys.worker_queue_lists(worker_id))
        self.redis.zrem(keys.WORKERS, worker_id)
        if self.redis.hget(keys.IDENTITIES, identity) == worker_id:
            self.redis.hdel(keys.IDENTITIES, identity)
        return requeued

    def _requeue(self, worker_id: str, job_id: str, reason: str) -> int:
        try:
            record = self.state.job(job_id)
        except JobNotFoundError:
            return 0  # its campaign's records are gone: nothing to requeue
        if record.attempt >= MAX_ATTEMPTS and record.state == JobState.RUNNING:
            message = f"worker lost {MAX_ATTEMPTS} times while rendering this job (last: {reason})"
            outcome = self.state.move(
                job_id, Move.ABANDON, JobState.FAILED, if_worker=worker_id, fields={"error": message}
            )
        else:
            outcome = self.state.move(job_id, Move.REQUEUE, JobState.PENDING, if_worker=worker_id)
        return int(outcome.changed)
