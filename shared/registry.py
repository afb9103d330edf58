"""The worker registry: who is alive, what each holds, and what was handed to whom.

Workers publish a heartbeat; a worker whose heartbeat lapses is reaped and every job handed to it
goes back to the pending queue, because Celery never drains a dead worker's queue by itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kleinfarm.shared.jobs import JobState
from kleinfarm.shared.state import PREFIX, FarmState

WORKERS = f"{PREFIX}:workers"
IDENTITIES = f"{PREFIX}:identities"  # identity (host and card) -> the worker id serving it now
# A job lost with its worker this many times fails instead of requeueing forever (celery #9082).
MAX_ATTEMPTS = 3


def worker_info_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def assigned_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:assigned"


def worker_queue(worker_id: str) -> str:
    """The worker's own Celery queue: only the dispatcher publishes to it."""
    return f"kf.w.{worker_id}"


@dataclass
class WorkerView:
    """What the dispatcher knows of one live worker."""

    worker_id: str
    queue: str
    assigned: dict[str, float]  # job member -> estimated seconds
    slots: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def room(self) -> int:
        return max(self.slots - len(self.assigned), 0)

    @property
    def queued_s(self) -> float:
        return sum(self.assigned.values())

    @property
    def identity(self) -> str:
        return str(self.info.get("identity") or self.worker_id)

    @property
    def routes(self) -> set[str]:
        """Routing keys of the reference sets the worker reports holding (any tier)."""
        return set(json.loads(self.info.get("routes") or "[]"))


class Registry:
    """Heartbeats, holdings and assignments of workers, in Redis."""

    def __init__(self, state: FarmState, lapse_s: float) -> None:
        self.state = state
        self.redis = state.redis
        self.lapse_s = lapse_s

    def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None:
        """Say ``worker_id`` is alive now, with what it reports of itself.

        A worker that registers under the identity of another (the same card after a restart)
        retires the old one at once: its jobs go back, and nothing it cached is believed any more.
        """
        identity = str(info.get("identity") or worker_id)
        previous = self.redis.hget(IDENTITIES, identity)
        if previous and previous != worker_id:
            self.retire(str(previous), reason=f"{identity} restarted as {worker_id}")
        flat: dict[Any, Any] = {
            key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()
        }
        pipe = self.redis.pipeline()
        pipe.hset(worker_info_key(worker_id), mapping={**flat, "seen": time.time()})
        pipe.zadd(WORKERS, {worker_id: time.time()})
        pipe.hset(IDENTITIES, identity, worker_id)
        pipe.execute()

    def live_workers(self) -> list[WorkerView]:
        ids: list[str] = self.redis.zrangebyscore(WORKERS, time.time() - self.lapse_s, "+inf")  # type: ignore[assignment]
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(worker_info_key(worker_id))
            pipe.zrange(assigned_key(worker_id), 0, -1, withscores=True)
        replies = pipe.execute()
        views = []
        for worker_id, info, assigned in zip(ids, replies[::2], replies[1::2], strict=True):
            if info:
                slots = int(info.get("slots", 2))
                views.append(WorkerView(worker_id, worker_queue(worker_id), dict(assigned), slots, info))
        return views

    def lapsed_workers(self) -> list[str]:
        return list(self.redis.zrangebyscore(WORKERS, "-inf", time.time() - self.lapse_s))  # type: ignore[arg-type]

    def assigned(self, worker_id: str) -> list[str]:
        return sorted(self.redis.zrange(assigned_key(worker_id), 0, -1))  # type: ignore[arg-type]

    def release(self, worker_id: str, member: str) -> None:
        """The worker is done with ``member``: free its slot and wake the dispatcher."""
        pipe = self.redis.pipeline()
        pipe.zrem(assigned_key(worker_id), member)
        pipe.lpush(f"{PREFIX}:wake", worker_id)
        pipe.execute()

    def retire(self, worker_id: str, reason: str) -> int:
        """Forget a worker and requeue every job handed to it; return how many were requeued."""
        identity = self.redis.hget(worker_info_key(worker_id), "identity") or worker_id
        requeued = 0
        for member in self.assigned(worker_id):
            requeued += self._requeue(worker_id, member, reason)
        queue = worker_queue(worker_id)
        # kombu keeps one list per priority step besides the plain queue name.
        priority_lists = [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]
        self.redis.delete(worker_info_key(worker_id), assigned_key(worker_id), queue, *priority_lists)
        self.redis.zrem(WORKERS, worker_id)
        if self.redis.hget(IDENTITIES, str(identity)) == worker_id:
            self.redis.hdel(IDENTITIES, str(identity))
        return requeued

    def _requeue(self, worker_id: str, member: str, reason: str) -> int:
        held = [JobState.ASSIGNED, JobState.RUNNING]
        record = self.state.job(member)
        if int(record.get("attempt", 0)) >= MAX_ATTEMPTS and record.get("state") == JobState.RUNNING:
            message = f"worker lost {MAX_ATTEMPTS} times while rendering this job (last: {reason})"
            outcome = self.state.transition(
                member, JobState.FAILED, held, if_worker=worker_id, fields={"error": message}
            )
        else:
            outcome = self.state.transition(member, JobState.PENDING, held, if_worker=worker_id, enqueue=True)
        return int(outcome.changed)
