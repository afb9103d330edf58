"""The farm's record of campaigns and jobs, in Redis, so it outlives every process.

Celery's result backend is not the source of truth: a job's state, attempt and worker live here
(keys in ``keys.py``), and every change is a named move of ``states.TRANSITIONS`` carried out by
one Lua script that keeps the campaign's counters exact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis

from kleinfarm.shared import keys
from kleinfarm.shared.errors import CampaignNotFoundError, JobNotFoundError
from kleinfarm.shared.records import CampaignStatus, JobRecord, RoutingInfo
from kleinfarm.shared.states import COUNTED_STATES, JobState, Move, rule_for

# Priority dominates the pending order; the sequence number keeps FIFO within one priority.
PRIORITY_WEIGHT = 1e12
PIPELINE_CHUNK = 2000


def load_script(client: redis.Redis, name: str) -> Any:
    source = resources.files("kleinfarm.shared").joinpath("lua", name).read_text()
    return client.register_script(source)


@dataclass(frozen=True)
class MoveOutcome:
    """Whether a move happened, from what state, the campaign's open jobs left and the attempt."""

    changed: bool
    previous: str
    open_left: int
    attempt: int = 0

    @property
    def closed_campaign(self) -> bool:
        return self.changed and self.open_left == 0

    @classmethod
    def from_reply(cls, reply: list[Any]) -> MoveOutcome:
        return cls(reply[0] == 1, str(reply[1]), int(reply[2]), int(reply[3] or 0))


@dataclass(frozen=True)
class Claim:
    """A claim's outcome and, when it happened, what the worker needs of the job (``FarmState.claim``)."""

    outcome: MoveOutcome
    record: JobRecord | None = None
    campaign: dict[str, str] = field(default_factory=dict)  # CLAIM_CAMPAIGN_FIELDS that are set
    routing: RoutingInfo | None = None

    @property
    def cancel_reason(self) -> str | None:
        """Why the campaign's jobs must stop as of the claim, or None."""
        return _cancel_reason(*(self.campaign.get(name) for name in CANCEL_FIELDS))


@dataclass
class NewJob:
    """A validated job ready to be written: its id in the campaign, its spec and what to show."""

    local_id: str
    spec: dict[str, Any]
    routing: RoutingInfo
    fields: dict[str, str] = field(default_factory=dict)


class FarmState:
    """Typed access to the farm's campaigns and jobs in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._transition = load_script(client, "transition.lua")
        self._promote = load_script(client, "promote.lua")

    @classmethod
    def from_url(cls, url: str) -> FarmState:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # -- campaigns ------------------------------------------------------------------------------

    def create_campaign(self, campaign_id: str, meta: dict[str, str], priority: int, jobs: list[NewJob]) -> None:
        """Write a campaign and queue its jobs, pipelined in chunks (no round trip per job)."""
        first_seq = int(self.redis.incrby(keys.SEQUENCE, len(jobs))) - len(jobs)
        counters = {f"n_{state}": 0 for state in COUNTED_STATES}
        header: dict[Any, Any] = {**meta, **counters, "total": len(jobs), "open": len(jobs), "n_pending": len(jobs)}
        # By the Redis clock, the one the dispatcher reads ``now`` from (its catch-up rule ages jobs by it).
        header.update(priority=priority, created=self.server_time(), cancel_requested=0)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.campaign(campaign_id), mapping=header)
        for chunk_start in range(0, len(jobs), PIPELINE_CHUNK):
            chunk = jobs[chunk_start : chunk_start + PIPELINE_CHUNK]
            scores: dict[str, float] = {}
            for offset, job in enumerate(chunk, start=chunk_start):
                job_id = keys.job_id(campaign_id, job.local_id)
                score = -priority * PRIORITY_WEIGHT + first_seq + offset
                scores[job_id] = score
                record: dict[Any, Any] = {**job.fields, "spec": json.dumps(job.spec), "state": "pending", "attempt": 0}
                pipe.hset(keys.job(job_id), mapping={**record, "score": score})
            pipe.hset(
                keys.ROUTING, mapping={keys.job_id(campaign_id, job.local_id): job.routing.encode() for job in chunk}
            )
            pipe.rpush(keys.campaign_jobs(campaign_id), *(job.local_id for job in chunk))
            pipe.zadd(keys.PENDING, scores)
            pipe.execute()
        pipe.zadd(keys.CAMPAIGNS, {campaign_id: time.time()})
        pipe.lpush(keys.WAKE, campaign_id)
        pipe.execute()

    def campaign_meta(self, campaign_id: str) -> dict[str, str]:
        meta: dict[str, str] = self.redis.hgetall(keys.campaign(campaign_id))  # type: ignore[assignment]
        if not meta:
            raise CampaignNotFoundError(f"campaign {campaign_id!r} is not known to this farm")
        return meta

    def status(self, campaign_id: str) -> CampaignStatus:
        return CampaignStatus.from_hash(campaign_id, self.campaign_meta(campaign_id))

    def local_ids(self, campaign_id: str) -> list[str]:
        return list(self.redis.lrange(keys.campaign_jobs(campaign_id), 0, -1))  # type: ignore[arg-type]

    def job_ids(self, campaign_id: str) -> list[str]:
        """The farm-wide ids of the campaign's jobs, in submission order."""
        return [keys.job_id(campaign_id, local_id) for local_id in self.local_ids(campaign_id)]

    def jobs(self, campaign_id: str) -> Iterator[JobRecord]:
        """Every job record of a campaign, in submission order, read in pipelined chunks."""
        ids = self.job_ids(campaign_id)
        for start in range(0, len(ids), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            chunk = ids[start : start + PIPELINE_CHUNK]
            for job_id in chunk:
                pipe.hgetall(keys.job(job_id))
            for job_id, fields in zip(chunk, pipe.execute(), strict=True):
                yield JobRecord.from_hash(job_id, fields)

    def request_cancel(self, campaign_id: str, reason: str = "campaign cancelled") -> int:
        """Mark the campaign cancelled and cancel its jobs still pending; return how many."""
        self.campaign_meta(campaign_id)
        self.redis.hset(keys.campaign(campaign_id), "cancel_requested", 1)
        job_ids = self.job_ids(campaign_id)
        outcomes = self.move_many(job_ids, Move.CANCEL, JobState.CANCELLED, {"error": reason})
        if job_ids:
            self.redis.zrem(keys.PENDING, *job_ids)
            self.redis.zrem(keys.campaign_paused(campaign_id), *job_ids)
            self.redis.zrem(keys.DELAYED, *job_ids)
        return sum(outcome.changed for outcome in outcomes)

    def server_time(self) -> float:
        """Now, by the Redis server's clock: the one clock every machine of the farm agrees on."""
        return seconds_of(self.redis.time())

    def server_time_and_submitted(self) -> tuple[float, int]:
        """The Redis clock and how many jobs were ever submitted (``keys.SEQUENCE``), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.get(keys.SEQUENCE)
        now, sequence = pipe.execute()
        return seconds_of(now), int(sequence or 0)

    def last_transition_age(self, campaign_id: str) -> float | None:
        """Seconds since a job of the campaign last changed state, by the Redis server's clock."""
        changed_at = self.redis.hget(keys.campaign(campaign_id), "changed_at")
        if changed_at is None:
            return None
        return self.server_time() - float(str(changed_at))

    def cancel_reason(self, campaign_id: str) -> str | None:
        """Why the campaign's jobs must stop, or None while they may run."""
        fields: list[str | None] = self.redis.hmget(keys.campaign(campaign_id), CANCEL_FIELDS)  # type: ignore[assignment]
        return _cancel_reason(*fields)

    def step_done(self, job_id: str, step: int, total: int) -> str | None:
        """Record a job's progress and say whether its campaign asks it to stop: one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.job(job_id), "progress", f"{step}/{total}")
        pipe.hmget(keys.campaign(keys.campaign_of(job_id)), CANCEL_FIELDS)
        _progress, fields = pipe.execute()
        return _cancel_reason(*fields)

    # -- jobs ------------------------------------------------------------------------------------

    def job(self, job_id: str) -> JobRecord:
        fields: dict[str, str] = self.redis.hgetall(keys.job(job_id))  # type: ignore[assignment]
        if not fields:
            raise JobNotFoundError(f"job {job_id!r} is not known to this farm")
        return JobRecord.from_hash(job_id, fields)

    def move(
        self,
        job_id: str,
        move: Move,
        target: JobState,
        *,
        if_attempt: int | None = None,
        if_worker: str | None = None,
        fields: dict[str, str] | None = None,
        delay_s: float | None = None,
        release: str | None = None,
    ) -> MoveOutcome:
        """Carry out ``move`` to ``target`` if the job is in one of the move's source states.

        ``if_attempt`` / ``if_worker``: only if the job is still that attempt / with that worker.
        A move back to pending puts the job in the queue in the same atomic step, or, with
        ``delay_s``, in ``keys.DELAYED`` until that many seconds of the Redis clock have passed.
        ``release``: the worker whose slot the job frees in the same step.
        """
        condition = self._condition(job_id, move, target, fields or {})
        if if_attempt is not None:
            condition["attempt"] = str(if_attempt)
        if if_worker is not None:
            condition["worker"] = if_worker
        if delay_s is not None:
            condition["delay_s"] = f"{delay_s:.3f}"
        if release is not None:
            condition["release"] = True
        return MoveOutcome.from_reply(self._call(job_id, target, condition, worker_id=release or ""))

    def claim(self, job_id: str, attempt: int, worker_id: str, started: float) -> Claim:
        """Move the job to running if it is still ``attempt`` with ``worker_id``, and read what the
        worker needs of it in the same round trip: its record, its campaign's fixed fields and
        cancel flags, and its routing row (the reads are discarded when the claim did not happen)."""
        condition = self._condition(job_id, Move.CLAIM, JobState.RUNNING, {"started": str(started)})
        condition.update(attempt=str(attempt), worker=worker_id)
        campaign_key = keys.campaign(keys.campaign_of(job_id))
        pipe = self.redis.pipeline(transaction=False)
        self._call(job_id, JobState.RUNNING, condition, client=pipe)
        pipe.hgetall(keys.job(job_id))
        pipe.hmget(campaign_key, CLAIM_CAMPAIGN_FIELDS)
        pipe.hget(keys.ROUTING, job_id)
        reply, fields, campaign, routing = pipe.execute()
        outcome = MoveOutcome.from_reply(reply)
        if not outcome.changed or not fields:
            return Claim(outcome)
        return Claim(
            outcome,
            JobRecord.from_hash(job_id, fields),
            {name: value for name, value in zip(CLAIM_CAMPAIGN_FIELDS, campaign, strict=True) if value is not None},
            RoutingInfo.decode(routing) if routing else None,
        )

    def move_many(self, job_ids: list[str], move: Move, target: JobState, fields: dict[str, str]) -> list[MoveOutcome]:
        outcomes: list[MoveOutcome] = []
        for start in range(0, len(job_ids), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids[start : start + PIPELINE_CHUNK]:
                self._call(job_id, target, self._condition(job_id, move, target, fields), client=pipe)
            outcomes += [MoveOutcome.from_reply(reply) for reply in pipe.execute()]
        return outcomes

    def assign(self, job_id: str, worker_id: str, estimate_s: float) -> int:
        """Give a pending job to ``worker_id``; return its new attempt number, 0 if it was taken."""
        condition = self._condition(job_id, Move.ASSIGN, JobState.ASSIGNED, {})
        condition.update(dequeue=job_id, assign={"worker": worker_id, "estimate_s": f"{estimate_s:.4f}"})
        outcome = MoveOutcome.from_reply(self._call(job_id, JobState.ASSIGNED, condition, worker_id=worker_id))
        return outcome.attempt if outcome.changed else 0

    def reissue(self, job_id: str, attempt: int) -> int:
        """Give an assigned job a new attempt (its old message is then skipped); 0 if it moved on."""
        bumped = attempt + 1
        outcome = self.move(
            job_id, Move.REISSUE, JobState.ASSIGNED, if_attempt=attempt, fields={"attempt": str(bumped)}
        )
        return bumped if outcome.changed else 0

    @staticmethod
    def _condition(job_id: str, move: Move, target: JobState, fields: dict[str, str]) -> dict[str, Any]:
        condition: dict[str, Any] = {"from": sorted(rule_for(move, target).sources)}
        if fields:  # cjson turns an empty dict into an empty array
            condition["set"] = fields
        if target == JobState.PENDING:
            condition["enqueue"] = job_id
        return condition

    def _call(
        self, job_id: str, target: JobState, condition: dict[str, Any], worker_id: str = "", client: Any = None
    ) -> Any:
        """Run transition.lua for one job (on ``client``, a pipeline, if given: its reply comes later)."""
        campaign_id = keys.campaign_of(job_id)
        script_keys = [
            keys.job(job_id),
            keys.campaign(campaign_id),
            keys.PENDING,
            keys.campaign_paused(campaign_id),
            keys.campaign_events(campaign_id),
            keys.worker_assigned(worker_id) if worker_id else "",
            keys.ACTIVE,
            keys.DELAYED,
        ]
        return self._transition(keys=script_keys, args=[str(target), json.dumps(condition), job_id], client=client)

    def promote_ready(self, limit: int = PIPELINE_CHUNK) -> int:
        """Queue the jobs whose backoff is over (by the Redis clock); return how many."""
        ready: list[str] = self.redis.zrangebyscore(keys.DELAYED, "-inf", self.server_time(), 0, limit)  # type: ignore[assignment]
        if not ready:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ready:
            campaign_id = keys.campaign_of(job_id)
            script_keys = [
                keys.DELAYED,
                keys.job(job_id),
                keys.campaign(campaign_id),
                keys.PENDING,
                keys.campaign_paused(campaign_id),
            ]
            self._promote(keys=script_keys, args=[job_id], client=pipe)
        return sum(int(queued) for queued in pipe.execute())

    def active_job_ids(self) -> list[str]:
        """Jobs in state assigned or running: those some worker is supposed to hold."""
        return sorted(self.redis.smembers(keys.ACTIVE))  # type: ignore[arg-type]

    def routing(self, job_ids: list[str]) -> list[RoutingInfo | None]:
        """What the router needs of each job, written at submit."""
        if not job_ids:
            return []
        rows: list[str | None] = self.redis.hmget(keys.ROUTING, job_ids)  # type: ignore[assignment]
        return [RoutingInfo.decode(row) if row else None for row in rows]

    def wake_dispatcher(self, reason: str) -> None:
        """Tell the dispatcher leader to look at the queue now."""
        self.redis.lpush(keys.WAKE, reason)


# The campaign fields that stop its jobs: a cancel (or a failure over the error limit) and why.
CANCEL_FIELDS = ["cancel_requested", "failed_reason"]
# What a worker reads of a job's campaign when it claims the job: fixed at submit, and the cancel flags.
CLAIM_CAMPAIGN_FIELDS = ["created", "output_prefix", *CANCEL_FIELDS]


def _cancel_reason(requested: str | None, failed: str | None) -> str | None:
    if requested != "1":
        return None
    return f"campaign failed: {failed}" if failed else "campaign cancelled"


def seconds_of(reply: Any) -> float:
    """Redis ``TIME``'s reply (seconds, microseconds) as seconds."""
    seconds, micros = reply
    return float(seconds) + float(micros) / 1e6
