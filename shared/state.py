"""The farm's record of campaigns and jobs, in Redis, so it outlives every process.

Celery's result backend is not the source of truth: a job's state, attempt and worker live here,
and every change goes through one Lua transition that keeps the campaign's counters exact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis

from kleinfarm.shared.errors import CampaignNotFoundError
from kleinfarm.shared.jobs import JobState

PREFIX = "kf"
PENDING = f"{PREFIX}:pending"
WAKE = f"{PREFIX}:wake"
SEQUENCE = f"{PREFIX}:seq"
CAMPAIGNS = f"{PREFIX}:campaigns"
ROUTING = f"{PREFIX}:routing"
COUNTED_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
# Priority dominates the pending order; the sequence number keeps FIFO within one priority.
PRIORITY_WEIGHT = 1e12
PIPELINE_CHUNK = 2000


def campaign_key(campaign_id: str) -> str:
    return f"{PREFIX}:campaign:{campaign_id}"


def campaign_jobs_key(campaign_id: str) -> str:
    return f"{PREFIX}:campaign:{campaign_id}:jobs"


def job_key(member: str) -> str:
    """Hash of one job; ``member`` is ``<campaign_id>/<job_id>``."""
    return f"{PREFIX}:job:{member}"


def job_member(campaign_id: str, job_id: str) -> str:
    return f"{campaign_id}/{job_id}"


def campaign_of(member: str) -> str:
    return member.split("/", 1)[0]


def load_script(client: redis.Redis, name: str) -> Any:
    source = resources.files("kleinfarm.shared").joinpath("lua", name).read_text()
    return client.register_script(source)


@dataclass(frozen=True)
class Transition:
    """Outcome of one state change: whether it happened, from what, and open jobs left."""

    changed: bool
    previous: str
    open_left: int

    @property
    def closed_campaign(self) -> bool:
        return self.changed and self.open_left == 0


@dataclass
class CampaignStatus:
    """Counts by state, as ``kleinfarm status`` prints them."""

    campaign_id: str
    name: str
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    cancel_requested: bool = False
    manifest_key: str | None = None
    paused: bool = False
    failed_reason: str | None = None

    @property
    def finished(self) -> bool:
        """Every job has ended."""
        return self.pending + self.running == 0

    @property
    def done(self) -> bool:
        """Every job has ended and the manifest is written."""
        return self.finished and self.manifest_key is not None

    def as_dict(self) -> dict[str, Any]:
        keys = ("campaign_id", "name", *COUNTS_ORDER, "paused", "failed_reason")
        return {key: getattr(self, key) for key in keys}


COUNTS_ORDER = ("total", "pending", "running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class RoutingInfo:
    """A job's routing key and cost estimates, kept in one hash the dispatcher reads in one call."""

    route: str | None
    work_s: float
    build_s: float
    priority: int = 0

    def encode(self) -> str:
        return f"{self.route or ''}|{self.work_s:.4f}|{self.build_s:.4f}|{self.priority}"

    @classmethod
    def decode(cls, text: str) -> RoutingInfo:
        route, work, build, priority = text.split("|")
        return cls(route or None, float(work), float(build), int(priority))


@dataclass
class NewJob:
    """A validated job ready to be written: its id, its spec (JSON-able) and what to show."""

    job_id: str
    spec: dict[str, Any]
    routing: RoutingInfo
    fields: dict[str, str] = field(default_factory=dict)


class FarmState:
    """Typed access to the farm's Redis keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._transition = load_script(client, "transition.lua")
        self._assign = load_script(client, "assign.lua")

    @classmethod
    def from_url(cls, url: str) -> FarmState:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # -- campaigns ------------------------------------------------------------------------------

    def create_campaign(self, campaign_id: str, meta: dict[str, str], priority: int, jobs: list[NewJob]) -> None:
        """Write a campaign and queue its jobs, pipelined in chunks (no round trip per job)."""
        first_seq = int(self.redis.incrby(SEQUENCE, len(jobs))) - len(jobs)
        counters = {f"n_{state}": 0 for state in COUNTED_STATES}
        header: dict[Any, Any] = {**meta, **counters, "total": len(jobs), "open": len(jobs), "n_pending": len(jobs)}
        header.update(priority=priority, created=time.time(), cancel_requested=0)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(campaign_key(campaign_id), mapping=header)
        for chunk_start in range(0, len(jobs), PIPELINE_CHUNK):
            chunk = jobs[chunk_start : chunk_start + PIPELINE_CHUNK]
            scores: dict[str, float] = {}
            for offset, job in enumerate(chunk, start=chunk_start):
                member = job_member(campaign_id, job.job_id)
                score = -priority * PRIORITY_WEIGHT + first_seq + offset
                scores[member] = score
                record: dict[Any, Any] = {**job.fields, "spec": json.dumps(job.spec), "state": "pending", "attempt": 0}
                pipe.hset(job_key(member), mapping={**record, "score": score, "job_id": job.job_id})
            pipe.hset(ROUTING, mapping={job_member(campaign_id, job.job_id): job.routing.encode() for job in chunk})
            pipe.rpush(campaign_jobs_key(campaign_id), *(job.job_id for job in chunk))
            pipe.zadd(PENDING, scores)
            pipe.execute()
        pipe.zadd(CAMPAIGNS, {campaign_id: time.time()})
        pipe.lpush(WAKE, campaign_id)
        pipe.execute()

    def campaign_meta(self, campaign_id: str) -> dict[str, str]:
        meta: dict[str, str] = self.redis.hgetall(campaign_key(campaign_id))  # type: ignore[assignment]
        if not meta:
            raise CampaignNotFoundError(f"campaign {campaign_id!r} is not known to this farm")
        return meta

    def status(self, campaign_id: str) -> CampaignStatus:
        meta = self.campaign_meta(campaign_id)
        counts = {state: int(meta.get(f"n_{state}", 0)) for state in COUNTED_STATES}
        return CampaignStatus(
            campaign_id=campaign_id,
            name=meta.get("name", ""),
            total=int(meta["total"]),
            cancel_requested=meta.get("cancel_requested") == "1",
            manifest_key=meta.get("manifest_key"),
            paused=meta.get("paused") == "1",
            failed_reason=meta.get("failed_reason") or None,
            **counts,
        )

    def job_ids(self, campaign_id: str) -> list[str]:
        return list(self.redis.lrange(campaign_jobs_key(campaign_id), 0, -1))  # type: ignore[arg-type]

    def jobs(self, campaign_id: str) -> Iterator[dict[str, str]]:
        """Every job record of a campaign, in submission order, read in pipelined chunks."""
        ids = self.job_ids(campaign_id)
        for start in range(0, len(ids), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids[start : start + PIPELINE_CHUNK]:
                pipe.hgetall(job_key(job_member(campaign_id, job_id)))
            yield from pipe.execute()

    def request_cancel(self, campaign_id: str, reason: str = "campaign cancelled") -> int:
        """Mark the campaign cancelled and cancel its jobs still pending; return how many."""
        self.campaign_meta(campaign_id)
        self.redis.hset(campaign_key(campaign_id), "cancel_requested", 1)
        members = [job_member(campaign_id, job_id) for job_id in self.job_ids(campaign_id)]
        outcomes = self.transition_many(members, JobState.CANCELLED, [JobState.PENDING], {"error": reason})
        if members:
            self.redis.zrem(PENDING, *members)
            self.redis.zrem(campaign_key(campaign_id) + ":held", *members)
        return sum(outcome.changed for outcome in outcomes)

    def last_transition_age(self, campaign_id: str) -> float | None:
        """Seconds since a job of the campaign last changed state, by the Redis server's clock."""
        changed_at = self.redis.hget(campaign_key(campaign_id), "changed_at")
        if changed_at is None:
            return None
        seconds, micros = self.redis.time()  # type: ignore[misc]
        return float(seconds) + float(micros) / 1e6 - float(str(changed_at))

    def cancel_reason(self, campaign_id: str) -> str | None:
        """Why the campaign's jobs must stop, or None while they may run."""
        fields: list[str | None] = self.redis.hmget(campaign_key(campaign_id), ["cancel_requested", "failed_reason"])  # type: ignore[assignment]
        requested, failed = fields
        if requested != "1":
            return None
        return f"campaign failed: {failed}" if failed else "campaign cancelled"

    # -- jobs ------------------------------------------------------------------------------------

    def job(self, member: str) -> dict[str, str]:
        return self.redis.hgetall(job_key(member))  # type: ignore[return-value]

    def transition(
        self,
        member: str,
        target: JobState,
        allowed: Iterable[JobState],
        *,
        if_attempt: str | None = None,
        if_worker: str | None = None,
        enqueue: bool = False,
        fields: dict[str, str] | None = None,
    ) -> Transition:
        """Move ``member`` to ``target`` if it is in one of ``allowed`` (and held as stated).

        ``enqueue`` puts the job back in the pending queue in the same atomic step.
        """
        keys, args = self._transition_args(member, target, allowed, if_attempt, if_worker, fields or {}, enqueue)
        changed, previous, open_left = self._transition(keys=keys, args=args)
        return Transition(changed == 1, previous, int(open_left))

    def transition_many(
        self, members: list[str], target: JobState, allowed: Iterable[JobState], fields: dict[str, str]
    ) -> list[Transition]:
        allowed = list(allowed)
        outcomes: list[Transition] = []
        for start in range(0, len(members), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for member in members[start : start + PIPELINE_CHUNK]:
                keys, args = self._transition_args(member, target, allowed, None, None, fields, False)
                self._transition(keys=keys, args=args, client=pipe)
            outcomes += [Transition(row[0] == 1, row[1], int(row[2])) for row in pipe.execute()]
        return outcomes

    @staticmethod
    def _transition_args(
        member: str,
        target: JobState,
        allowed: Iterable[JobState],
        attempt: str | None,
        worker: str | None,
        fields: dict[str, str],
        enqueue: bool,
    ) -> tuple[list[str], list[str]]:
        condition: dict[str, Any] = {"from": [str(state) for state in allowed], "set": fields or {}}
        if enqueue:
            condition["enqueue"] = member
        if attempt is not None:
            condition["attempt"] = attempt
        if worker is not None:
            condition["worker"] = worker
        if not fields:
            condition.pop("set")  # cjson turns an empty dict into an empty array
        keys = [job_key(member), campaign_key(campaign_of(member)), PENDING]
        return keys, [str(target), json.dumps(condition)]

    def assign(self, member: str, worker: str, assigned_set: str, estimate_s: float) -> int:
        """Give a pending job to ``worker``; return its new attempt number, 0 if it was taken."""
        keys = [PENDING, job_key(member), assigned_set]
        return int(self._assign(keys=keys, args=[member, worker, f"{estimate_s:.4f}"]))

    def routing(self, members: list[str]) -> list[RoutingInfo | None]:
        """What the router needs of each job, written at submit."""
        if not members:
            return []
        rows: list[str | None] = self.redis.hmget(ROUTING, members)  # type: ignore[assignment]
        return [RoutingInfo.decode(row) if row else None for row in rows]

    def events_channel(self, campaign_id: str) -> str:
        """Pub/sub channel on which every job transition of the campaign is announced."""
        return campaign_key(campaign_id) + ":events"

    def set_progress(self, member: str, step: int, total: int) -> None:
        self.redis.hset(job_key(member), "progress", f"{step}/{total}")

    def wake_dispatcher(self, reason: str) -> None:
        self.redis.lpush(WAKE, reason)
