"""A discrete-event simulation of the farm's routing, running the policies' own code.

Push policies (round-robin, least-loaded, SGLang-style cache-aware, bounded-load consistent
hashing) place a job on a worker's queue when it arrives: the driver offers each arrival to the
policy as a one-job round over every worker; the worker runs its queue in order. Ours binds late:
jobs wait in one pending index and a worker with a free slot (two: one running, one waiting)
takes what ``AffinityPolicy`` hands it in the farm's dispatch rounds. Every worker keeps reference
K/V in an LRU cache with a byte budget; a job whose set is not held pays the build.

Load is counted as the policies count it, in whole milliseconds (``costmodel.to_ms``): the running
sums go up and down for hours and must come back to exactly zero. Every job must run; one that did
not keeps its sentinel in ``Outcome`` and is reported (``unrun``), never counted.

A fleet (``fleets.py``) gives each worker its own speed (a job takes its cost-model seconds
divided by it), K/V budget and capability (which jobs fit its card); every policy, ours and the
baselines, runs on the same fleet. Without one, every worker is alike: speed 1.0, one budget,
any job.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kleinfarm.producer.bench.fleets import Card, uniform_fleet
from kleinfarm.shared.capacity import JobShape
from kleinfarm.shared.costmodel import CostModel, to_ms
from kleinfarm.shared.klein import REFERENCE_MAX_SIDE, reference_tokens
from kleinfarm.shared.routing import AffinityPolicy, PendingIndex, PendingJob, Policy, Round, WorkerState

SLOTS = 2
PUSH_SLOTS = 1 << 62  # a push worker's queue has no bound: a policy may always place a job there


@dataclass(frozen=True)
class TraceJob:
    index: int
    arrival_s: float
    refset: str | None
    work_s: float
    build_s: float
    kv_bytes: int
    shape: JobShape | None = None  # what its memory depends on: which cards can run it


def trace_jobs(rows: Sequence[dict[str, Any]], costs: CostModel) -> list[TraceJob]:
    """Trace rows (``arrival_s, refset, num_refs, ref_px, width, height``) with their costs."""
    jobs = []
    # One object per shape: the policies memoize what fits where by the object.
    shapes: dict[tuple[int, int, int, int], JobShape] = {}
    for index, row in enumerate(sorted(rows, key=lambda row: row["arrival_s"])):
        refs = int(row.get("num_refs") or 0) if row.get("refset") else 0
        ref_px = int(row.get("ref_px") or 1024)
        width, height = int(row["width"]), int(row["height"])
        key = (width, height, refs, ref_px if refs else 0)
        shape = shapes.get(key)
        if shape is None:
            shape = shapes[key] = job_shape(width, height, refs, ref_px)
        jobs.append(
            TraceJob(
                index=index,
                arrival_s=float(row["arrival_s"]),
                refset=row.get("refset") if refs else None,
                work_s=costs.cached_render_s(width, height),
                build_s=costs.build_s(refs, ref_px),
                kv_bytes=costs.kv_bytes(refs, ref_px),
                shape=shape,
            )
        )
    return jobs


def job_shape(width: int, height: int, refs: int, ref_px: int) -> JobShape:
    """A trace job's shape: ``refs`` square references of ``ref_px`` (the cost model's references)."""
    side = min(ref_px, REFERENCE_MAX_SIDE) if refs else 0
    return JobShape(
        width=width,
        height=height,
        reference_tokens=(reference_tokens(1, side),) * refs,
        reference_pixels=side * side,
    )


def _knows_cards(fleet: Sequence[Card]) -> bool:
    """Whether the policies need to know the fleet's cards (some worker has a capability)."""
    return any(card.capability is not None for card in fleet)


@dataclass
class KVCache:
    """A worker's reference K/V, least recently used out first."""

    budget: int
    entries: OrderedDict[str, int] = field(default_factory=OrderedDict)
    used: int = 0

    def lookup(self, job: TraceJob) -> tuple[bool, list[str]]:
        """Whether the job's set is held; caches it if not; returns the sets evicted."""
        if job.refset is None:
            return True, []
        if job.refset in self.entries:
            self.entries.move_to_end(job.refset)
            return True, []
        evicted = []
        if job.kv_bytes <= self.budget:
            self.entries[job.refset] = job.kv_bytes
            self.used += job.kv_bytes
            while self.used > self.budget:
                key, size = self.entries.popitem(last=False)
                self.used -= size
                evicted.append(key)
        return False, evicted


UNRUN = -1.0  # the start and finish of a job that never ran


@dataclass
class Outcome:
    """What happened to each job: nothing, until it runs (a job is a hit only once it ran as one)."""

    start: list[float]
    finish: list[float]
    hit: list[bool]
    busy: list[float]  # seconds each worker was busy
    # Cost-model seconds each worker ran (its busy seconds times its speed), on a fleet of
    # unequal cards: what ``gpu_s`` sums there, so it compares with the oracle's work.
    work: list[float] = field(default_factory=list)
    worker: list[int] = field(default_factory=list)  # the index of the worker each job ran on (-1: none)

    @classmethod
    def unrun(cls, jobs: int) -> Outcome:
        return cls([UNRUN] * jobs, [UNRUN] * jobs, [False] * jobs, [], worker=[-1] * jobs)

    def ran(self, index: int) -> bool:
        return self.finish[index] != UNRUN

    @property
    def unrun_jobs(self) -> int:
        return sum(1 for finish in self.finish if finish == UNRUN)


def duration_s(job: TraceJob, hit: bool, speed: float) -> float:
    """How long ``job`` runs on a card of ``speed``."""
    seconds = job.work_s + (0.0 if hit else job.build_s)
    return seconds if speed == 1.0 else seconds / speed


class PushWorker:
    """A worker that runs the jobs placed on its queue, in order."""

    def __init__(self, index: int, budget: int, card: Card | None = None) -> None:
        # Identities "w<index>": the consistent-hash ring is built from them.
        capability = None if card is None else card.capability
        self.index = index
        self.state = WorkerState(f"w{index}", f"w{index}", 0.0, PUSH_SLOTS, capability=capability)
        self.cache = KVCache(budget if card is None else card.kv_budget)
        self.speed = 1.0 if card is None else card.speed
        self.free_at = 0.0
        self.busy = 0.0
        self.work = 0.0

    def run(self, job: TraceJob, outcome: Outcome) -> float:
        """Queue the job behind the others; return when it finishes."""
        start = max(job.arrival_s, self.free_at)
        hit, _ = self.cache.lookup(job)
        duration = duration_s(job, hit, self.speed)
        self.free_at = start + duration
        self.busy += duration
        self.work += duration * self.speed
        outcome.start[job.index], outcome.finish[job.index], outcome.hit[job.index] = start, self.free_at, hit
        outcome.worker[job.index] = self.index
        return self.free_at


def simulate_push(
    jobs: list[TraceJob], workers: int, budget: int, policy: Policy, fleet: Sequence[Card] | None = None
) -> Outcome:
    """Each job placed by ``policy`` when it arrives, in a one-job round over every worker.

    A worker's ``queued_ms`` is the time until its queue frees, negative for a worker idle that
    long, so least-loaded picks the worker whose queue frees (or freed) first (in its own time:
    the time the queue takes on its card). Its ``queued_jobs`` are its jobs in flight: ``commit``
    counts a job in, and one heap of finish times (cheaper than a look at every worker's queue per
    arrival) counts it out. A job no card can run is never placed: it stays unrun.
    """
    cards = uniform_fleet(workers, budget) if fleet is None else list(fleet)
    shaped = _knows_cards(cards)
    pool = [PushWorker(index, budget, card) for index, card in enumerate(cards)]
    states = [worker.state for worker in pool]
    by_id = {worker.state.worker_id: index for index, worker in enumerate(pool)}
    in_flight: list[tuple[float, int]] = []  # (finish, worker index)
    outcome = Outcome.unrun(len(jobs))
    # One round object throughout: the policy empties its pending index with every decision.
    round = Round(PendingIndex(), states, {})
    for job in jobs:
        now = job.arrival_s
        while in_flight and in_flight[0][0] <= now:
            states[heapq.heappop(in_flight)[1]].queued_jobs -= 1
        for worker, state in zip(pool, states, strict=True):
            state.queued_ms = to_ms(worker.free_at - now)
        pending = PendingJob(str(job.index), job.refset, job.work_s, job.build_s, shape=job.shape if shaped else None)
        round.pending.add(pending)
        decisions = policy.assign(round)
        if not decisions:  # no card can run it: it stays unrun (and out of the next rounds)
            round.pending.remove(pending)
            continue
        index = by_id[decisions[0].worker.worker_id]
        heapq.heappush(in_flight, (pool[index].run(job, outcome), index))
    outcome.busy = [worker.busy for worker in pool]
    if any(worker.speed != 1.0 for worker in pool):
        outcome.work = [worker.work for worker in pool]
    return outcome


class LateWorker:
    """A worker of the late-binding farm: one job running, one waiting."""

    def __init__(self, index: int, budget: int, card: Card | None = None) -> None:
        self.index = index
        capability = None if card is None else card.capability
        self.state = WorkerState(f"w{index:04d}", f"w{index:04d}", 0.0, SLOTS, capability=capability)
        self.cache = KVCache(budget if card is None else card.kv_budget)
        self.speed = 1.0 if card is None else card.speed
        self.waiting: deque[tuple[TraceJob, int]] = deque()  # with the estimate counted, in ms
        self.running = False
        self.busy = 0.0
        self.work = 0.0
        self.handed: dict[str, int] = {}


class LateBindingSim:
    """The farm's dispatcher, event by event, with the farm's policy."""

    def __init__(
        self,
        jobs: list[TraceJob],
        workers: int,
        budget: int,
        policy: Policy | None = None,
        fleet: Sequence[Card] | None = None,
    ) -> None:
        self.jobs = jobs
        cards = uniform_fleet(workers, budget) if fleet is None else list(fleet)
        self.pool = [LateWorker(index, budget, card) for index, card in enumerate(cards)]
        # On a mixed fleet the policy is told every worker (who holds a set and can run its job)
        # and every job's shape; on a uniform one, neither: the farm's rounds as they always were.
        self.shaped = _knows_cards(cards)
        self.states = [worker.state for worker in self.pool]
        self.pending = PendingIndex()
        self.holders: dict[str, int] = {}
        # The rendezvous order is over the whole farm, though a round offers only the free workers.
        self.policy = policy or AffinityPolicy(worker.state.identity for worker in self.pool)
        self.by_id = {worker.state.worker_id: worker for worker in self.pool}
        self.queued_ms = 0  # the farm's queued work: exact, so it is 0 whenever every queue is empty
        self.submitted = 0  # jobs arrived so far
        self.free = set(range(workers))
        self.events: list[tuple[float, int, int, int]] = []  # (time, order, kind, index)
        self.outcome = Outcome.unrun(len(jobs))

    def run(self) -> Outcome:
        for job in self.jobs:
            heapq.heappush(self.events, (job.arrival_s, job.index, 0, job.index))
        order = len(self.jobs)
        while self.events:
            now, _, kind, index = heapq.heappop(self.events)
            if kind == 0:
                job = self.jobs[index]
                shape = job.shape if self.shaped else None
                # Jobs arriving at the same instant came in one submission (a campaign, a bulk edit).
                self.pending.add(
                    PendingJob(
                        str(job.index),
                        job.refset,
                        job.work_s,
                        job.build_s,
                        shape=shape,
                        submission=repr(job.arrival_s),
                        submitted_s=job.arrival_s,
                    )
                )
                self.submitted += 1
            else:
                order = self._finish(self.pool[index], now, order)
            order = self._dispatch(now, order)
        self.outcome.busy = [worker.busy for worker in self.pool]
        if any(worker.speed != 1.0 for worker in self.pool):
            self.outcome.work = [worker.work for worker in self.pool]
        return self.outcome

    def _dispatch(self, now: float, order: int) -> int:
        """The farm's dispatch round, over the workers with a free slot."""
        if not self.pending or not self.free:
            return order
        decisions = self.policy.assign(
            Round(
                self.pending,
                [self.pool[index].state for index in self.free],
                self.holders,
                farm_size=len(self.pool),
                farm_queued_ms=self.queued_ms,
                fleet=self.states if self.shaped else None,
                now_s=now,
                submitted_jobs=self.submitted,
            )
        )
        for decision in decisions:
            worker = self.by_id[decision.worker.worker_id]
            order = self._hand(worker, self.jobs[int(decision.job.job_id)], decision.cost_ms, now, order)
        return order

    def _hand(self, worker: LateWorker, job: TraceJob, estimate_ms: int, now: float, order: int) -> int:
        """The policy counted the job against the worker; queue it there and start it if idle."""
        if job.refset is not None:
            worker.handed[job.refset] = worker.handed.get(job.refset, 0) + 1
        if not worker.state.free_slots:
            self.free.discard(worker.index)
        self.queued_ms += estimate_ms
        worker.waiting.append((job, estimate_ms))
        if not worker.running:
            order = self._start(worker, now, order)
        return order

    def _start(self, worker: LateWorker, now: float, order: int) -> int:
        job, _ = worker.waiting[0]
        hit, evicted = worker.cache.lookup(job)
        for refset in evicted:
            if not worker.handed.get(refset):
                self._release(worker, refset)
        duration = duration_s(job, hit, worker.speed)
        self.outcome.start[job.index], self.outcome.hit[job.index] = now, hit
        self.outcome.finish[job.index] = now + duration
        self.outcome.worker[job.index] = worker.index
        worker.running = True
        worker.busy += duration
        worker.work += duration * worker.speed
        heapq.heappush(self.events, (now + duration, order, 1, worker.index))
        return order + 1

    def _finish(self, worker: LateWorker, now: float, order: int) -> int:
        job, estimate_ms = worker.waiting.popleft()
        worker.running = False
        worker.state.queued_ms -= estimate_ms
        worker.state.queued_jobs -= 1
        worker.state.free_slots += 1
        self.free.add(worker.index)
        self.queued_ms -= estimate_ms
        if job.refset is not None:
            worker.handed[job.refset] -= 1
            if not worker.handed[job.refset] and job.refset not in worker.cache.entries:
                self._release(worker, job.refset)
        if worker.waiting:
            order = self._start(worker, now, order)
        return order

    def _release(self, worker: LateWorker, refset: str) -> None:
        if refset in worker.state.holds:
            worker.state.holds.discard(refset)
            self.holders[refset] -= 1
