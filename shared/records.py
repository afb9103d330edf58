"""Typed records of what Redis holds: a job, a campaign's status, a job's routing, a worker's report.

Every reader of a job hash or a heartbeat goes through these types, so a field is parsed once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kleinfarm.shared import keys
from kleinfarm.shared.capacity import Capability, JobShape
from kleinfarm.shared.locators import redact
from kleinfarm.shared.states import COUNTED_STATES, JobState

RESULT_FIELDS = ("job_id", "state", "key", "error", "seed", "width", "height")
COUNTS_ORDER = ("total", "pending", "running", "succeeded", "failed", "cancelled")


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text not in (None, "") else None


@dataclass(frozen=True)
class JobRecord:
    """One job hash (``keys.job``), parsed."""

    job_id: str
    local_id: str
    state: JobState
    attempt: int
    spec: dict[str, Any]
    worker: str | None = None
    key: str | None = None
    error: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    route: str | None = None
    refset: str | None = None
    kv: str | None = None
    timings: dict[str, float] | None = None
    started: float | None = None
    finished: float | None = None
    progress: str | None = None

    @classmethod
    def from_hash(cls, job_id: str, fields: dict[str, str]) -> JobRecord:
        return cls(
            job_id=job_id,
            local_id=keys.local_id_of(job_id),
            state=JobState(fields["state"]),
            attempt=int(fields.get("attempt") or 0),
            spec=json.loads(fields.get("spec") or "{}"),
            worker=fields.get("worker") or None,
            key=fields.get("key") or None,
            error=fields.get("error") or None,
            seed=_int_or_none(fields.get("seed")),
            width=_int_or_none(fields.get("width")),
            height=_int_or_none(fields.get("height")),
            route=fields.get("route") or None,
            refset=fields.get("refset") or None,
            kv=fields.get("kv") or None,
            timings=json.loads(fields["timings"]) if fields.get("timings") else None,
            started=float(fields["started"]) if fields.get("started") else None,
            finished=float(fields["finished"]) if fields.get("finished") else None,
            progress=fields.get("progress") or None,
        )

    @property
    def campaign_id(self) -> str:
        return keys.campaign_of(self.job_id)

    @property
    def references(self) -> list[str]:
        return list(self.spec.get("references") or [])

    def result_row(self) -> dict[str, Any]:
        """What ``kleinfarm results`` prints: the job's id within its campaign, state, key, ..."""
        return {
            "job_id": self.local_id,
            "state": str(self.state),
            "key": self.key,
            "error": self.error,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
        }

    def manifest_row(self) -> dict[str, Any]:
        """One line of the campaign's manifest."""
        return {
            **self.result_row(),
            "kind": self.spec.get("kind"),
            "format": self.spec.get("format", "png"),
            "prompt": self.spec.get("prompt"),
            "references": [redact(url) for url in self.references],
            "refset": self.refset,
            "kv": self.kv,
            "attempt": self.attempt,
            "worker": self.worker,
            "timings": self.timings,
        }


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
    # Why some of its jobs wait although workers are live ("waiting: no live worker can run ...").
    waiting: str | None = None

    @classmethod
    def from_hash(cls, campaign_id: str, meta: dict[str, str]) -> CampaignStatus:
        counts = {str(state): int(meta.get(f"n_{state}", 0)) for state in COUNTED_STATES}
        return cls(
            campaign_id=campaign_id,
            name=meta.get("name", ""),
            total=int(meta["total"]),
            cancel_requested=meta.get("cancel_requested") == "1",
            manifest_key=meta.get("manifest_key"),
            paused=meta.get("paused") == "1",
            failed_reason=meta.get("failed_reason") or None,
            waiting=meta.get("waiting") or None,
            **counts,
        )

    @property
    def finished(self) -> bool:
        """Every job has ended."""
        return self.pending + self.running == 0

    @property
    def done(self) -> bool:
        """Every job has ended and the manifest is written."""
        return self.finished and self.manifest_key is not None

    def as_dict(self) -> dict[str, Any]:
        fields = ("campaign_id", "name", *COUNTS_ORDER, "paused", "failed_reason", "waiting")
        return {field: getattr(self, field) for field in fields}


@dataclass(frozen=True)
class RoutingInfo:
    """A job's routing key and cost estimates, one field of ``keys.ROUTING``."""

    route: str | None
    work_s: float
    build_s: float
    priority: int = 0
    # Output size and reference count: which workers' cards can run it (``shared/capacity.py``).
    width: int = 0
    height: int = 0
    references: int = 0

    def encode(self) -> str:
        fields = (self.route or "", f"{self.work_s:.4f}", f"{self.build_s:.4f}", self.priority)
        return "|".join(map(str, (*fields, self.width, self.height, self.references)))

    @classmethod
    def decode(cls, text: str) -> RoutingInfo:
        route, work, build, priority, *shape = text.split("|")
        width, height, references = (int(value) for value in shape) if shape else (0, 0, 0)
        return cls(route or None, float(work), float(build), int(priority), width, height, references)

    @property
    def shape(self) -> JobShape | None:
        """The job's shape at its largest (references of 1 MP); None for a record from before shapes."""
        if not self.width:
            return None
        return JobShape.worst_case(self.width, self.height, self.references)


class _Report(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TierReport(_Report):
    """One tier of the reference K/V cache: its byte budget and the sets it holds, with bytes."""

    budget: int = 0
    keys: dict[str, int] = Field(default_factory=dict)


class KVReport(_Report):
    device: TierReport = Field(default_factory=TierReport)
    host: TierReport = Field(default_factory=TierReport)
    stats: dict[str, int] = Field(default_factory=dict)  # hits_device, hits_host, misses, demotions, ...


class PromptCacheReport(_Report):
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    budget: int = 0


class EngineReport(_Report):
    """What a worker's render engine holds and has done (published in its heartbeat)."""

    profile: str = ""
    memory: dict[str, int] = Field(default_factory=dict)
    kv: KVReport = Field(default_factory=KVReport)
    prompts: PromptCacheReport = Field(default_factory=PromptCacheReport)
    # What jobs fit this worker's card, and its speed (``shared/capacity.py``); None: not known.
    capability: Capability | None = None


class WorkerReport(_Report):
    """What a worker says of itself in each heartbeat (``keys.worker``)."""

    identity: str
    queue: str
    pid: int
    slots: int = 2  # 0 while draining: the dispatcher hands it nothing
    draining: bool = False
    device: str = ""
    gpu: int | None = None
    model: str = ""
    metrics_port: int | None = None
    routes: list[str] = Field(default_factory=list)  # routing keys of the sets it holds (any tier)
    counters: dict[str, int] = Field(default_factory=dict)  # jobs it ended, by state
    engine: EngineReport = Field(default_factory=EngineReport)
