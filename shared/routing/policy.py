"""The routing interface: what every policy is given in a round, and what it hands back.

A *round* is one look at the farm: the pending jobs, the workers with a free slot, and which
reference sets are held where. A policy answers with decisions, one job to one worker each. The
farm's dispatcher and the simulator (``kleinfarm.producer.bench``) both drive policies through
this interface only, so the figures the simulator prints are those of the code the farm runs
(``docs/routing.md``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kleinfarm.shared.costmodel import to_ms, to_s
from kleinfarm.shared.routing.pending import PendingIndex, PendingJob

if TYPE_CHECKING:
    from kleinfarm.shared.capacity import Capability, JobShape

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
    "fits",
    "own_ms",
    "runnable",
]


# Capability.fits memoized, first by object identity: a trace shares one shape object per shape,
# and a fleet one capability per kind of card, so a look-up costs two ids. Each entry keeps both
# objects alive, so an id is never reused while its entry stands. Then by value: the farm's
# dispatcher makes new objects every round, and hashing them (~3 us) is cheaper than the
# estimate (~12 us). Both start again when full, rather than grow for ever.
_FITS: dict[tuple[int, int], tuple[Capability, JobShape, bool]] = {}
_FITS_BY_VALUE: dict[tuple[Capability, JobShape], bool] = {}
_FITS_MAX = 65_536


def fits(capability: Capability, shape: JobShape) -> bool:
    """``capability.fits(shape)``, memoized."""
    key = (id(capability), id(shape))
    known = _FITS.get(key)
    if known is not None and known[0] is capability and known[1] is shape:
        return known[2]
    answer = _FITS_BY_VALUE.get((capability, shape))
    if answer is None:
        if len(_FITS_BY_VALUE) >= _FITS_MAX:
            _FITS_BY_VALUE.clear()
        answer = _FITS_BY_VALUE[(capability, shape)] = capability.fits(shape)
    if len(_FITS) >= _FITS_MAX:
        _FITS.clear()
    _FITS[key] = (capability, shape, answer)
    return answer


def own_ms(nominal_ms: int, speed: float) -> int:
    """Cost-model milliseconds as a worker of ``speed`` spends them, in whole milliseconds.

    A positive cost stays positive (``to_ms``), so a worker with work queued always counts as
    loaded; the same integer is added and later taken away, so sums still come back to zero. A
    speed that is not a positive, finite number (a heartbeat's bad figure) counts as 1.0: it must
    not stop the dispatch round.
    """
    if speed == 1.0 or nominal_ms <= 0 or not 0 < speed < math.inf:
        return nominal_ms
    return max(to_ms(to_s(nominal_ms) / speed), 1)


def runnable(workers: list[WorkerState], shape: JobShape) -> list[WorkerState]:
    """Those of ``workers`` whose card can run ``shape``: one answer per distinct capability (a
    fleet has a few kinds of card), not one per worker."""
    verdicts: dict[int, bool] = {}
    for worker in workers:
        capability = worker.capability
        if capability is not None and id(capability) not in verdicts:
            verdicts[id(capability)] = fits(capability, shape)
    if all(verdicts.values()):
        return workers
    return [w for w in workers if w.capability is None or verdicts[id(w.capability)]]


@dataclass(init=False)
class WorkerState:
    """A worker as a policy sees it. Policies update it as they decide, so one round stays consistent.

    Its queued work is kept in whole milliseconds (``queued_ms``): the simulator adds and takes
    away estimates for hours, and only integer sums come back to exactly zero. It is built from
    seconds, the unit callers have. Both are the worker's own time: a job's cost-model seconds
    divided by its ``speed``, so a fast card with the same work queued frees sooner.

    ``capability`` (``shared/capacity.py``, from its heartbeat) says which jobs fit its card and
    how fast it is; None: it runs anything, at the cost model's speed (1.0).
    """

    worker_id: str
    identity: str  # stable across restarts: rendezvous order, hash ring, exclusions
    queued_ms: int  # work handed to it and not finished, in its own time
    free_slots: int
    holds: set[str]  # routes cached or already handed to it
    queued_jobs: int  # jobs handed to it and not finished: the push baselines count jobs, not seconds
    capability: Capability | None

    def __init__(
        self,
        worker_id: str,
        identity: str,
        queued_s: float,
        free_slots: int,
        holds: set[str] | None = None,
        queued_jobs: int = 0,
        capability: Capability | None = None,
    ) -> None:
        self.worker_id, self.identity = worker_id, identity
        self.queued_ms = to_ms(queued_s)
        self.free_slots = free_slots
        self.holds = set() if holds is None else holds
        self.queued_jobs = queued_jobs
        self.capability = capability

    @property
    def queued_s(self) -> float:
        return to_s(self.queued_ms)

    @property
    def speed(self) -> float:
        """Cost-model seconds it renders per second (1.0 without a capability, or with a speed
        that is not a positive, finite number)."""
        speed = 1.0 if self.capability is None else self.capability.speed
        return speed if 0 < speed < math.inf else 1.0

    def can_run(self, job: PendingJob) -> bool:
        """Whether ``job`` fits this worker's card (a job without a shape, or a worker without a
        capability: yes)."""
        capability, shape = self.capability, job.shape
        return capability is None or shape is None or fits(capability, shape)


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
    ``fleet``: every worker of the farm, busy ones too, when ``workers`` are only the free ones
    and some have a capability: who holds a set *and can run* a job of it (by default, ``workers``).
    """

    pending: PendingIndex
    workers: list[WorkerState]
    holders: dict[str, int]
    farm_size: int | None = None
    farm_queued_ms: int | None = None
    exclusions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    fleet: Sequence[WorkerState] | None = None
    # The farm's clock, and how many jobs were ever submitted to it, for the catch-up rule
    # (``catchup.py``); None: unknown, and the farm is never taken to be catching up.
    now_s: float | None = None
    submitted_jobs: int | None = None

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
    """Count the job against the worker: its seconds (the worker's own), its slot, and the set it
    will now hold."""
    cost = job.work_ms + (0 if job.route is None or job.route in worker.holds else job.build_ms)
    if worker.capability is not None:
        cost = own_ms(cost, worker.capability.speed)
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
    pulled by the farm's rounds, the job goes to one of the workers that have a free slot, can run
    it and are not kept off its campaign; a job with no such worker stays pending.
    """

    def assign(self, round: Round) -> list[Decision]:
        decisions = []
        for job in list(round.pending.jobs()):
            kept_off = round.kept_off(job)
            if kept_off:
                candidates = [w for w in round.workers if w.free_slots > 0 and w.identity not in kept_off]
            else:  # the usual case, once per job and worker in the simulator: keep it lean
                candidates = [w for w in round.workers if w.free_slots > 0]
            if job.shape is not None:
                candidates = runnable(candidates, job.shape)
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
