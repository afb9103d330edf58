"""The worker registry: who is alive, what each holds, and what was handed to whom.

Workers publish a heartbeat (a ``WorkerReport``); a worker whose heartbeat lapses is retired and
every job handed to it goes back to the pending queue, because Celery never drains a dead
worker's queue by itself. Heartbeats and lapses are timed by the Redis server's clock (``TIME``),
never a machine's own: a worker whose clock is slow must not be lapsed, nor a fast one outlive its
death.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from kleinfarm.shared import keys
from kleinfarm.shared.records import WorkerReport
from kleinfarm.shared.state import FarmState
from kleinfarm.shared.states import JobState, Move

# Why a worker was retired: its heartbeat lapsed, its card came back as a new process, it stopped.
RetireCause = Literal["lapsed", "restarted", "stopped"]
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

    def heartbeat(self, worker_id: str, report: WorkerReport, holding: Iterable[str] = ()) -> None:
        """Say ``worker_id`` is alive now, with what it reports of itself and the jobs it is running.

        A worker that registers under the identity of another (the same card after a restart)
        retires the old one at once: its jobs go back, and nothing it cached is believed any more.
        """
        previous = self.redis.hget(keys.IDENTITIES, report.identity)
        if previous and previous != worker_id:
            self.retire(str(previous), reason=f"{report.identity} restarted as {worker_id}", cause="restarted")
        now = self.state.server_time()
        pipe = self.redis.pipeline()
        pipe.hset(
            keys.worker(worker_id),
            mapping={"report": report.model_dump_json(), "seen": now, "holding": json.dumps(sorted(holding))},
        )
        pipe.zadd(keys.WORKERS, {worker_id: now})
        pipe.hset(keys.IDENTITIES, report.identity, worker_id)
        pipe.execute()

    def drain(self, identity: str, draining: bool = True) -> None:
        """Keep ``identity`` from taking jobs (or let it take them again): read by its heartbeat and tasks."""
        if draining:
            self.redis.sadd(keys.DRAINING, identity)
        else:
            self.redis.srem(keys.DRAINING, identity)

    def is_draining(self, identity: str) -> bool:
        return bool(self.redis.sismember(keys.DRAINING, identity))

    def holder(self, identity: str) -> str | None:
        """The worker id that registered ``identity`` last, if any."""
        holder = self.redis.hget(keys.IDENTITIES, identity)
        return str(holder) if holder else None

    def live_ids(self) -> set[str]:
        """Workers whose last heartbeat is within the lapse, by the Redis clock."""
        since = self.state.server_time() - self.lapse_s
        return set(self.redis.zrangebyscore(keys.WORKERS, since, "+inf"))  # type: ignore[arg-type]

    def holding(self, worker_ids: Iterable[str]) -> dict[str, set[str]]:
        """The jobs each worker said in its last heartbeat that it is running."""
        ordered = sorted(worker_ids)
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ordered:
            pipe.hget(keys.worker(worker_id), "holding")
        return {worker_id: set(json.loads(raw or "[]")) for worker_id, raw in zip(ordered, pipe.execute(), strict=True)}

    def live_workers(self) -> list[WorkerView]:
        since = self.state.server_time() - self.lapse_s
        ids: list[str] = self.redis.zrangebyscore(keys.WORKERS, since, "+inf")  # type: ignore[assignment]
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
        until = self.state.server_time() - self.lapse_s
        return list(self.redis.zrangebyscore(keys.WORKERS, "-inf", f"({until}"))  # type: ignore[arg-type]

    def assigned(self, worker_id: str) -> list[str]:
        return sorted(self.redis.zrange(keys.worker_assigned(worker_id), 0, -1))  # type: ignore[arg-type]

    def release(self, worker_id: str, job_id: str) -> None:
        """The worker is done with ``job_id``: free its slot and wake the dispatcher."""
        pipe = self.redis.pipeline()
        pipe.zrem(keys.worker_assigned(worker_id), job_id)
        pipe.lpush(keys.WAKE, worker_id)
        pipe.execute()

    def retire(self, worker_id: str, reason: str, cause: RetireCause = "stopped") -> int:
        """Forget a worker and requeue every job handed to it; return how many were requeued."""
        report = self.redis.hget(keys.worker(worker_id), "report")
        identity = WorkerReport.model_validate_json(report).identity if report else worker_id
        requeued = sum(self.give_back(job_id, worker_id, reason) for job_id in self.assigned(worker_id))
        self.redis.delete(keys.worker(worker_id), keys.worker_assigned(worker_id), *keys.worker_queue_lists(worker_id))
        self.redis.zrem(keys.WORKERS, worker_id)
        if self.redis.hget(keys.IDENTITIES, identity) == worker_id:
            self.redis.hdel(keys.IDENTITIES, identity)
        self.redis.hincrby(keys.RETIREMENTS, f"retired_{cause}", 1)
        return requeued

    def give_back(
        self, job_id: str, worker_id: str, reason: str, move: Move = Move.REQUEUE, attempt: int | None = None
    ) -> bool:
        """Take ``job_id`` from ``worker_id`` (only if it is still that worker's, and that attempt)
        and queue it again, freeing the worker's slot; True if it moved.

        A job that was running counts as lost: lost ``MAX_ATTEMPTS`` times, it fails instead, so a
        job that kills its worker cannot loop for ever (celery #9082). A job lost before it started
        costs nothing.
        """
        fields: list[str | None] = self.redis.hmget(keys.job(job_id), ["state", "lost"])  # type: ignore[assignment]
        current, lost_before = fields
        if current is None:
            return False  # its campaign's records are gone: nothing to give back
        only_if: dict[str, Any] = {"if_worker": worker_id, "if_attempt": attempt, "release": worker_id or None}
        if current != JobState.RUNNING:
            return self.state.move(job_id, move, JobState.PENDING, **only_if).changed
        lost = int(lost_before or 0) + 1
        if lost >= MAX_ATTEMPTS:
            failed = {"error": f"worker lost {lost} times while rendering this job (last: {reason})", "lost": str(lost)}
            return self.state.move(job_id, Move.ABANDON, JobState.FAILED, fields=failed, **only_if).changed
        return self.state.move(job_id, move, JobState.PENDING, fields={"lost": str(lost)}, **only_if).changed
