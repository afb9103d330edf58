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
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kleinfarm.shared.costmodel import CostModel, to_ms
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


def trace_jobs(rows: Sequence[dict[str, Any]], costs: CostModel) -> list[TraceJob]:
    """Trace rows (``arrival_s, refset, num_refs, ref_px, width, height``) with their costs."""
    jobs = []
    for index, row in enumerate(sorted(rows, key=lambda row: row["arrival_s"])):
        refs = int(row.get("num_refs") or 0) if row.get("refset") else 0
        jobs.append(
            TraceJob(
                index=index,
                arrival_s=float(row["arrival_s"]),
                refset=row.get("refset") if refs else None,
                work_s=costs.cached_render_s(int(row["width"]), int(row["height"])),
                build_s=costs.build_s(refs, int(row.get("ref_px") or 1024)),
                kv_bytes=costs.kv_bytes(refs, int(row.get("ref_px") or 1024)),
            )
        )
    return jobs


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
    busy: list[float]

    @classmethod
    def unrun(cls, jobs: int) -> Outcome:
        return cls([UNRUN] * jobs, [UNRUN] * jobs, [False] * jobs, [])

    def ran(self, index: int) -> bool:
        return self.finish[index] != UNRUN

    @property
    def unrun_jobs(self) -> int:
        return sum(1 for finish in self.finish if finish == UNRUN)


class PushWorker:
    """A worker that runs the jobs placed on its queue, in order."""

    def __init__(self, index: int, budget: int) -> None:
        # Identities "w<index>": the consistent-hash ring is built from them.
        self.state = WorkerState(f"w{index}", f"w{index}", 0.0, PUSH_SLOTS)
        self.cache = KVCache(budget)
        self.free_at = 0.0
        self.busy = 0.0

    def run(self, job: TraceJob, outcome: Outcome) -> float:
        """Queue the job behind the others; return when it finishes."""
        start = max(job.arrival_s, self.free_at)
        hit, _ = self.cache.lookup(job)
        duration = job.work_s + (0.0 if hit else job.build_s)
        self.free_at = start + duration
        self.busy += duration
        outcome.start[job.index], outcome.finish[job.index], outcome.hit[job.index] = start, self.free_at, hit
        return self.free_at


def simulate_push(jobs: list[TraceJob], workers: int, budget: int, policy: Policy) -> Outcome:
    """Each job placed by ``policy`` when it arrives, in a one-job round over every worker.

    A worker's ``queued_ms`` is the time until its queue frees, negative for a worker idle that
    long, so least-loaded picks the worker whose queue frees (or freed) first. Its
    ``queued_jobs`` are its jobs in flight: ``commit`` counts a job in, and one heap of finish
    times (cheaper than a look at every worker's queue per arrival) counts it out.
    """
    pool = [PushWorker(index, budget) for index in range(workers)]
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
        round.pending.add(PendingJob(str(job.index), job.refset, job.work_s, job.build_s))
        (decision,) = policy.assign(round)
        index = by_id[decision.worker.worker_id]
        heapq.heappush(in_flight, (pool[index].run(job, outcome), index))
    outcome.busy = [worker.busy for worker in pool]
    return outcome


class LateWorker:
    """A worker of the late-binding farm: one job running, one waiting."""

    def __init__(self, index: int, budget: int) -> None:
        self.index = index
        self.state = WorkerState(f"w{index:04d}", f"w{index:04d}", 0.0, SLOTS)
        self.cache = KVCache(budget)
        self.waiting: deque[tuple[TraceJob, int]] = deque()  # with the estimate counted, in ms
        self.running = False
        self.busy = 0.0
        self.handed: dict[str, int] = {}


class LateBindingSim:
    """The farm's dispatcher, event by event, with the farm's policy."""

    def __init__(self, jobs: list[TraceJob], workers: int, budget: int, policy: Policy | None = None) -> None:
        self.jobs = jobs
        self.pool = [LateWorker(index, budget) for index in range(workers)]
        self.pending = PendingIndex()
        self.holders: dict[str, int] = {}
        # The rendezvous order is over the whole farm, though a round offers only the free workers.
        self.policy = policy or AffinityPolicy(worker.state.identity for worker in self.pool)
        self.by_id = {worker.state.worker_id: worker for worker in self.pool}
        self.queued_ms = 0  # the farm's queued work: exact, so it is 0 whenever every queue is empty
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
                self.pending.add(PendingJob(str(job.index), job.refset, job.work_s, job.build_s))
            else:
                order = self._finish(self.pool[index], now, order)
            order = self._dispatch(now, order)
        self.outcome.busy = [worker.busy for worker in self.pool]
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
        duration = job.work_s + (0.0 if hit else job.build_s)
        self.outcome.start[job.index], self.outcome.hit[job.index] = now, hit
        self.outcome.finish[job.index] = now + duration
        worker.running = True
        worker.busy += duration
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
