"""Reference-set affinity routing, as pure logic: the farm's dispatcher and the simulator run it.

Late binding: a job is chosen *for a worker* when that worker has a free slot, using what the
worker holds at that moment. For a free worker, in order:

1. a pending job whose reference set it holds (or has been handed already): no K/V to build;
2. a reference set that fewer workers hold than its backlog needs, so a hot set spreads over
   ``ceil(backlog / fair share)`` workers and is built only that many times; among those, the
   worker's own rendezvous-hash order, so free workers pick different sets deterministically;
3. a job without references (they fill the gaps: any worker serves them equally well);
4. a job of a set held elsewhere, only if its holders' backlog outlasts building it here.

Load is counted in seconds of work (``costmodel.py``), and a worker whose queued work exceeds
``cap`` times the mean takes nothing more until the others catch up (bounded load).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice

LOAD_CAP = 1.25
SPREAD_SLACK = 2.0
WINDOW_ROUTES = 64  # how far down the pending queue a decision looks, in distinct reference sets


@dataclass
class PendingJob:
    """A job waiting for a worker, as the policy sees it."""

    member: str
    route: str | None  # reference-set routing key; None for a job without references
    work_s: float  # seconds when its K/V are held (or it has none)
    build_s: float  # seconds a miss adds
    priority: int = 0


@dataclass(frozen=True)
class Take:
    """A decision: the worker takes the next job of ``route`` (None: a job without references)."""

    route: str | None


@dataclass
class WorkerState:
    """A worker as the policy sees it."""

    worker_id: str
    identity: str  # stable across restarts, for the rendezvous order
    queued_s: float  # seconds of work handed to it and not finished
    free_slots: int
    holds: set[str] = field(default_factory=set)  # routes cached or already handed to it


class PendingIndex:
    """Pending jobs by route, routes in the order their oldest job arrived, jobs FIFO within."""

    def __init__(self, jobs: Iterable[PendingJob] = ()) -> None:
        self.queues: OrderedDict[str | None, deque[PendingJob]] = OrderedDict()
        self.backlog_s: dict[str | None, float] = {}
        self.total_s = 0.0
        self._priorities: dict[int, int] = {}
        for job in jobs:
            self.add(job)

    def __bool__(self) -> bool:
        return bool(self.queues)

    def __contains__(self, route: object) -> bool:
        return route in self.queues

    def add(self, job: PendingJob) -> None:
        self.queues.setdefault(job.route, deque()).append(job)
        self.backlog_s[job.route] = self.backlog_s.get(job.route, 0.0) + job.work_s
        self.total_s += job.work_s
        self._priorities[job.priority] = self._priorities.get(job.priority, 0) + 1

    def pop(self, route: str | None) -> PendingJob:
        queue = self.queues[route]
        job = queue.popleft()
        self.backlog_s[route] -= job.work_s
        self.total_s -= job.work_s
        self._priorities[job.priority] -= 1
        if not self._priorities[job.priority]:
            del self._priorities[job.priority]
        if not queue:
            del self.queues[route]
            del self.backlog_s[route]
        return job

    @property
    def top_priority(self) -> int:
        return max(self._priorities)

    def head_priority(self, route: str | None) -> int:
        return self.queues[route][0].priority

    def window(self) -> Iterator[str | None]:
        return islice(self.queues, WINDOW_ROUTES)


def rendezvous(route: str, identity: str) -> int:
    """Highest-random-weight score: each worker ranks the reference sets in its own stable order."""
    return int.from_bytes(hashlib.blake2b(f"{route}|{identity}".encode(), digest_size=8).digest(), "big")


class Owners:
    """Each reference set's workers in rendezvous order, memoized: its first ``k`` are its owners."""

    def __init__(self, identities: Iterable[str]) -> None:
        self.identities = sorted(identities)
        self._ranks: dict[str, dict[str, int]] = {}

    def rank(self, route: str, identity: str) -> int:
        ranks = self._ranks.get(route)
        if ranks is None:
            order = sorted(self.identities, key=lambda name: rendezvous(route, name), reverse=True)
            ranks = self._ranks[route] = {name: index for index, name in enumerate(order)}
        return ranks.get(identity, len(self.identities))


def desired_holders(backlog_s: float, fair_s: float, workers: int) -> int:
    """How many workers a reference set's backlog should spread over.

    A set spreads only once its backlog passes ``SPREAD_SLACK`` fair shares: a worker busy with
    one set while others finish is cheaper than building the set again elsewhere, until then.
    """
    if fair_s <= 0:
        return 1
    return max(1, min(workers, math.ceil(backlog_s / (SPREAD_SLACK * fair_s) - 1e-9)))


def over_cap(worker: WorkerState, mean_queued_s: float, cap: float = LOAD_CAP) -> bool:
    """Bounded load: a worker with work queued beyond ``cap`` x the mean waits its turn."""
    return worker.queued_s > 0 and worker.queued_s > cap * mean_queued_s


def choose_route(
    worker: WorkerState,
    pending: PendingIndex,
    holders: Mapping[str, int],
    workers: int,
    fair_s: float,
    owners: Owners | None = None,
) -> Take | None:
    """Where ``worker`` should take its next job from; None when it should wait.

    ``holders`` counts, per route, the workers holding it or already handed a job of it.
    """
    if not pending:
        return None
    top = pending.top_priority
    held = [route for route in worker.holds if route in pending and pending.head_priority(route) == top]
    if held:
        return Take(max(held, key=lambda route: pending.backlog_s[route]))
    window = [route for route in pending.window() if pending.head_priority(route) == top]
    wanted = {
        route: desired
        for route in window
        if route is not None
        and holders.get(route, 0) < (desired := desired_holders(pending.backlog_s[route], fair_s, workers))
    }
    owned = [route for route in wanted if owners is None or owners.rank(route, worker.identity) < wanted[route]]
    if owned:
        return Take(owned[0])
    if None in window:
        return Take(None)
    if wanted:
        return Take(next(iter(wanted)))
    return _worth_stealing(window, pending, holders)


def _worth_stealing(window: list[str | None], pending: PendingIndex, holders: Mapping[str, int]) -> Take | None:
    """A set whose holders would take longer to clear it than this worker takes to build it."""
    best: tuple[float, str] | None = None
    for route in window:
        if route is None:
            continue
        head = pending.queues[route][0]
        gain = pending.backlog_s[route] / max(holders.get(route, 0), 1) - (head.build_s + head.work_s)
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, route)
    return Take(best[1]) if best else None


@dataclass(frozen=True)
class Decision:
    """One job handed to one worker, with the seconds of work it was counted as."""

    worker: WorkerState
    job: PendingJob
    cost_s: float


def assign_round(
    pending: PendingIndex,
    workers: list[WorkerState],
    holders: dict[str, int],
    *,
    farm_size: int | None = None,
    farm_queued_s: float | None = None,
    owners: Owners | None = None,
) -> list[Decision]:
    """Hand jobs to the ``workers`` with a free slot, least loaded first; return the decisions.

    ``workers`` may be only the free ones; ``farm_size`` and ``farm_queued_s`` then describe the
    whole farm (by default, these workers). The states and ``holders`` are updated as decisions
    are made, so one round stays consistent.
    """
    size = farm_size or len(workers)
    queued = sum(worker.queued_s for worker in workers) if farm_queued_s is None else farm_queued_s
    owners = owners or Owners(worker.identity for worker in workers)
    decisions: list[Decision] = []
    progress = True
    while progress and pending:
        progress = False
        mean_queued, fair_s = queued / max(size, 1), (pending.total_s + queued) / max(size, 1)
        for worker in sorted(workers, key=lambda state: (state.queued_s, state.worker_id)):
            if worker.free_slots <= 0 or over_cap(worker, mean_queued) or not pending:
                continue
            take = choose_route(worker, pending, holders, size, fair_s, owners)
            if take is None:
                continue
            decisions.append(_commit(worker, pending.pop(take.route), holders))
            queued += decisions[-1].cost_s
            progress = True
    return decisions


def _commit(worker: WorkerState, job: PendingJob, holders: dict[str, int]) -> Decision:
    """Count the job against the worker: its seconds, its slot, and the set it will now hold."""
    cost = job.work_s + (0.0 if job.route is None or job.route in worker.holds else job.build_s)
    if job.route is not None and job.route not in worker.holds:
        worker.holds.add(job.route)
        holders[job.route] = holders.get(job.route, 0) + 1
    worker.queued_s += cost
    worker.free_slots -= 1
    return Decision(worker, job, cost)
