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


@dataclass
class WorkerState:
    """A worker as a policy sees it. Policies update it as they decide, so one round stays consistent."""

    worker_id: str
    identity: str  # stable across restarts: rendezvous order, hash ring, exclusions
    queued_s: float  # seconds of work handed to it and not finished
    free_slots: int
    holds: set[str] = field(default_factory=set)  # routes cached or already handed to it
    queued_jobs: int = 0  # jobs handed to it and not finished: the push baselines count jobs, not seconds


@dataclass(frozen=True)
class Decision:
    """One job handed to one worker, with the seconds of work it was counted as."""

    worker: WorkerState
    job: PendingJob
    cost_s: float


@dataclass
class Round:
    """A policy's whole input for one round of dispatch.

    ``workers`` are those with a free slot (others may be included; they get nothing). ``holders``
    counts, per route, the workers holding it or already handed a job of it. ``farm_size`` and
    ``farm_queued_s`` describe the whole farm when ``workers`` are only its free part (by default,
    these workers). ``exclusions`` maps a campaign id to the worker identities kept off it.
    """

    pending: PendingIndex
    workers: list[WorkerState]
    holders: dict[str, int]
    farm_size: int | None = None
    farm_queued_s: float | None = None
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
    cost = job.work_s + (0.0 if job.route is None or job.route in worker.holds else job.build_s)
    if job.route is not None and job.route not in worker.holds:
        worker.holds.add(job.route)
        holders[job.route] = holders.get(job.route, 0) + 1
    worker.queued_s += cost
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
