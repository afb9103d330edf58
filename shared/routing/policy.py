"""The routing interface: what every policy is given in a round, and what it hands back.

A *round* is one look at the farm: the pending jobs, the workers with a free slot, and which
reference sets are held where. A policy answers with decisions, one job to one worker each. The
farm's dispatcher and the simulator (``kleinfarm.producer.bench``) both drive policies through
this interface only, so the figures the simulator prints are those of the code the farm runs
(``docs/routing.md``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from kleinfarm.shared.costmodel import to_ms, to_s
from kleinfarm.shared.routing.pending import PendingIndex, PendingJob

NOBODY: frozenset[str] = frozenset()

__all__ = [
    "NOBODY",
    "Decision",
    "PendingIndex",
    "PendingJob",
    "PerJobPolicy",
    "Policy",
    "Round",
    "WorkerState",
    "commit",
]


@dataclass(init=False)
class WorkerState:
    """A worker as a policy sees it. Policies update it as they decide, so one round stays consistent.

    Its queued work is kept in whole milliseconds (``queued_ms``): the simulator adds and takes
    away estimates for hours, and only integer sums come back to exactly zero. It is built from
    seconds, the unit callers have.
    """

    worker_id: str
    identity: str  # stable across restarts: rendezvous order, hash ring, exclusions
    queued_ms: int  # work handed to it and not finished
    free_slots: int
    holds: set[str]  # routes cached or already handed to it
    queued_jobs: int  # jobs handed to it and not finished: the push baselines count jobs, not seconds

    def __init__(
        self,
        worker_id: str,
        identity: str,
        queued_s: float,
        free_slots: int,
        holds: set[str] | None = None,
        queued_jobs: int = 0,
    ) -> None:
        self.worker_id, self.identity = worker_id, identity
        self.queued_ms = to_ms(queued_s)
        self.free_slots = free_slots
        self.holds = set() if holds is None else holds
        self.queued_jobs = queued_jobs

    @property
    def queued_s(self) -> float:
        return to_s(self.queued_ms)


@dataclass(frozen=True)
class Decision:
    """One job handed to one worker, with the work it was counted as (whole milliseconds)."""

    worker: WorkerState
    job: PendingJob
    cost_ms: int

    @property
    def cost_s(self) -> float:
        return to_s(self.cost_ms)


@dataclass
class Round:
    """A policy's whole input for one round of dispatch.

    ``workers`` are those with a free slot (others may be included; they get nothing). ``holders``
    counts, per route, the workers holding it or already handed a job of it. ``farm_size`` and
    ``farm_queued_ms`` describe the whole farm when ``workers`` are only its free part (by default,
    these workers). ``exclusions`` maps a campaign id to the worker identities kept off it.
    """

    pending: PendingIndex
    workers: list[WorkerState]
    holders: dict[str, int]
    farm_size: int | None = None
    farm_queued_ms: int | None = None
    exclusions: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def blocked(self, worker: WorkerState) -> frozenset[str]:
        """The campaigns ``worker`` must not be given a job of."""
        return frozenset(campaign for campaign, kept_off in self.exclusions.items() if worker.identity in kept_off)

    def kept_off(self, job: PendingJob) -> frozenset[str]:
        """The worker identities ``job``'s campaign keeps off it."""
        return self.exclusions.get(job.campaign, NOBODY) if job.campaign is not None else NOBODY


class Policy(ABC):
    """A routing policy. It may keep state across rounds (a counter, what it has routed where, a ring).

    ``assign`` takes jobs out of ``round.pending`` as it hands them out, and updates the chosen
    workers' states and ``round.holders`` (``commit``). It never hands a worker more jobs than it
    has free slots, nor a job of a campaign that excludes the worker.
    """

    name: ClassVar[str]

    @abstractmethod
    def assign(self, round: Round) -> list[Decision]:
        """Hand pending jobs to the round's workers; return the decisions in the order made."""


def commit(worker: WorkerState, job: PendingJob, holders: dict[str, int]) -> Decision:
    """Count the job against the worker: its seconds, its slot, and the set it will now hold."""
    cost = job.work_ms + (0 if job.route is None or job.route in worker.holds else job.build_ms)
    if job.route is not None and job.route not in worker.holds:
        worker.holds.add(job.route)
        holders[job.route] = holders.get(job.route, 0) + 1
    worker.queued_ms += cost
    worker.queued_jobs += 1
    worker.free_slots -= 1
    return Decision(worker, job, cost)


class PerJobPolicy(Policy):
    """A policy that places each pending job on its own, oldest first: the push baselines.

    Pushed at arrival (the simulator's push mode: a one-job round, every worker with room), or
    pulled by the farm's rounds, the job goes to one of the workers that have a free slot and are
    not kept off its campaign; a job with no such worker stays pending.
    """

    def assign(self, round: Round) -> list[Decision]:
        decisions = []
        for job in list(round.pending.jobs()):
            kept_off = round.kept_off(job)
            if kept_off:
                candidates = [w for w in round.workers if w.free_slots > 0 and w.identity not in kept_off]
            else:  # the usual case, once per job and worker in the simulator: keep it lean
                candidates = [w for w in round.workers if w.free_slots > 0]
            if not candidates:
                continue
            worker = self.choose(job, candidates)
            round.pending.remove(job)
            decisions.append(commit(worker, job, round.holders))
            self.placed(job, worker)
        return decisions

    @abstractmethod
    def choose(self, job: PendingJob, candidates: list[WorkerState]) -> WorkerState:
        """One of ``candidates`` (never empty, in the round's order) for ``job``."""

    def placed(self, job: PendingJob, worker: WorkerState) -> None:
        """Called after ``job`` went to ``worker``: for policies that remember what they routed."""
