"""Reference-set affinity routing, late-binding: the farm's own policy (``docs/routing.md``).

Late binding: a job is chosen *for a worker* when that worker has a free slot, using what the
worker holds at that moment. For a free worker, in order:

1. a pending job whose reference set it holds (or has been handed already): no K/V to build;
2. a reference set that fewer workers hold than its backlog needs, so a hot set spreads over
   ``ceil(backlog / (2 x fair share))`` workers (never more than it has jobs) and is built only
   that many times; among those, the worker's own rendezvous-hash order, so free workers pick
   different sets deterministically;
3. a job without references (they fill the gaps: any worker serves them equally well);
4. a set whose holders' backlog per holder outlasts building it here: the last resort of a
   worker that would otherwise idle.

Load is counted in whole milliseconds of work (``costmodel.py``), and a worker whose queued work
exceeds ``cap`` times the mean takes nothing more until the others catch up (bounded load); the
least-loaded free worker of a round is never held back, so the cap can slow the farm, not stop it.

A worker kept off some campaigns chooses among the jobs it may take, so a blocked campaign at
the head of the queue neither wastes its slot nor stalls the round. Holders are counted per job:
a holder kept off a job's campaign does not count as one for it, so the set is "wanted" (rule 2)
and another worker builds it, rather than every free worker waiting for a holder that will never
take the job.

No job starves (``docs/routing.md``): a pending job of the top priority is either of a set with a
holder that may take it (which takes it when next free and under the cap, and the cap always lets
the least-loaded free worker through, and drains as work finishes), or of a set that is wanted or
without references, which any free worker takes once it reaches the window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

from kleinfarm.shared.routing.pending import PendingIndex
from kleinfarm.shared.routing.policy import Decision, PendingJob, Policy, Round, WorkerState, commit

LOAD_CAP = 1.25
SPREAD_SLACK = 2.0
# A worker with nothing better builds a set held elsewhere when the holders' backlog per holder
# outlasts building it here this many times over. Not more than once: under a lasting overload the
# spread rule covers about half the farm (``SPREAD_SLACK``) and these steals keep the rest busy; at
# 2, 4 and 16 a 512-worker Zipf farm left workers idle behind its backlog (``docs/routing.md``).
STEAL_RATIO = 1.0


@dataclass(frozen=True)
class Take:
    """A decision: the worker takes the next job of ``route`` (None: a job without references)."""

    route: str | None


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


def desired_holders(backlog: float, fair: float, workers: int) -> int:
    """How many workers a reference set's backlog should spread over (both in one unit of time).

    A set spreads only once its backlog passes ``SPREAD_SLACK`` fair shares: a worker busy with
    one set while others finish is cheaper than building the set again elsewhere, until then.
    """
    if fair <= 0:
        return 1
    return max(1, min(workers, math.ceil(backlog / (SPREAD_SLACK * fair) - 1e-9)))


def over_cap(worker: WorkerState, mean_queued_ms: float, cap: float = LOAD_CAP) -> bool:
    """Bounded load: a worker with work queued beyond ``cap`` x the mean waits its turn."""
    return worker.queued_ms > 0 and worker.queued_ms > cap * mean_queued_ms


def choose_route(
    worker: WorkerState,
    pending: PendingIndex,
    holders: Mapping[str, int],
    workers: int,
    fair_ms: float,
    owners: Owners | None = None,
) -> Take | None:
    """Where ``worker`` should take its next job from; None when it should wait.

    ``holders`` counts, per route, the workers holding it or already handed a job of it that may
    take its next job. ``fair_ms`` is a worker's fair share of the farm's work.
    """
    if not pending:
        return None
    top = pending.top_priority
    held = held_routes(worker, pending, top)
    if held:
        # Ties by name: a set's iteration order changes with PYTHONHASHSEED, and results must not.
        return Take(max(held, key=lambda route: (pending.backlog_ms[route], route)))
    window = [route for route in pending.window() if pending.head_priority(route) == top]
    wanted = {
        route: desired
        for route in window
        if route is not None and holders.get(route, 0) < (desired := _desired(pending, route, fair_ms, workers))
    }
    owned = [route for route in wanted if owners is None or owners.rank(route, worker.identity) < wanted[route]]
    if owned:
        return Take(owned[0])
    if None in window:
        return Take(None)
    if wanted:
        return Take(next(iter(wanted)))
    return last_resort(window, pending, holders)


def held_routes(worker: WorkerState, pending: PendingIndex, top: int) -> list[str]:
    """The sets ``worker`` holds with a pending job of priority ``top`` next (rule 1's choice).

    Walks the smaller side: a worker holds a few dozen sets, a quiet farm has a few pending.
    """
    queues = pending.queues
    if len(queues) < len(worker.holds):
        return [route for route, queue in queues.items() if route in worker.holds and queue[0].priority == top]
    return [route for route in worker.holds if (queue := queues.get(route)) and queue[0].priority == top]


def holds_pending(worker: WorkerState, pending: PendingIndex) -> bool:
    """Whether rule 1 gives ``worker`` a job."""
    return bool(pending) and bool(held_routes(worker, pending, pending.top_priority))


def _desired(pending: PendingIndex, route: str, fair_ms: float, workers: int) -> int:
    """Holders ``route`` should have: never more than its pending jobs, as a job cannot be split.

    On a quiet farm the fair share is tiny and any backlog is "many fair shares": without this
    bound one pending job would call for several holders, and a free worker would build the set
    afresh while its holder is a second from done.
    """
    return desired_holders(pending.backlog_ms[route], fair_ms, min(workers, len(pending.queues[route])))


def last_resort(window: list[str | None], pending: PendingIndex, holders: Mapping[str, int]) -> Take | None:
    """For a worker that would otherwise idle: the set whose holders are most swamped, if their
    backlog per holder outlasts building it here ``STEAL_RATIO`` times over."""
    best: tuple[float, str] | None = None
    for route in window:
        if route is None:
            continue
        head = pending.queues[route][0]
        share = pending.backlog_ms[route] / max(holders.get(route, 0), 1)
        gain = share - STEAL_RATIO * (head.build_ms + head.work_ms)
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, route)
    return Take(best[1]) if best else None


class _Holders(Mapping[str, int]):
    """Holders of each route that may take its next job in ``index``: not those kept off its campaign.

    Without this, a job whose only holder is blocklisted from its campaign waits for ever: the
    holder never takes it, and every other worker sees its set as held (and not worth rebuilding).
    """

    def __init__(self, round: Round, index: PendingIndex) -> None:
        self.round, self.index = round, index

    def __getitem__(self, route: str) -> int:
        count = self.round.holders[route]
        queue = self.index.queues.get(route)
        kept_off = self.round.kept_off(queue[0]) if queue else frozenset()
        if kept_off:
            count -= sum(1 for state in self.round.workers if route in state.holds and state.identity in kept_off)
        return count

    def __iter__(self) -> Iterator[str]:
        return iter(self.round.holders)

    def __len__(self) -> int:
        return len(self.round.holders)


class _Choices:
    """What each worker may choose from this round: the pending index, less its blocked campaigns.

    A worker kept off campaigns sees a filtered copy of the index (one per distinct set of blocked
    campaigns, made once a round); every job taken comes out of the real index and of every copy,
    so they stay in step. With no exclusions, every worker sees the real index itself.
    """

    def __init__(self, round: Round) -> None:
        self.round = round
        self._views: dict[frozenset[str], PendingIndex] = {}

    def for_worker(self, worker: WorkerState) -> PendingIndex:
        if not self.round.exclusions:
            return self.round.pending
        blocked = self.round.blocked(worker)
        if not blocked:
            return self.round.pending
        view = self._views.get(blocked)
        if view is None:
            view = self._views[blocked] = self.round.pending.excluding(blocked)
        return view

    def holders(self, index: PendingIndex) -> Mapping[str, int]:
        """The holder counts a worker choosing from ``index`` goes by."""
        return _Holders(self.round, index) if self.round.exclusions else self.round.holders

    def take(self, index: PendingIndex, route: str | None) -> PendingJob:
        """The oldest job of ``route`` in ``index``, taken out of the round."""
        if index is self.round.pending and not self._views:
            return index.pop(route)  # no copies to keep in step
        job = index.queues[route][0]
        self.round.pending.remove(job)
        for blocked, view in self._views.items():
            if job.campaign not in blocked:
                view.remove(job)
        return job


class AffinityPolicy(Policy):
    """The farm's policy: late binding by reference-set affinity, under bounded load.

    ``identities``: every worker of the farm, for the rendezvous order, when a round offers only
    the free ones (the simulator). Without it, the order is over the round's workers, kept
    from round to round while they stay the same (the ranks are memoized).
    """

    name: ClassVar[str] = "kleinfarm"

    def __init__(self, identities: Iterable[str] | None = None) -> None:
        self._fixed = identities is not None
        self._owners = Owners(identities or ())

    def owners(self, workers: list[WorkerState]) -> Owners:
        if not self._fixed:
            identities = sorted(worker.identity for worker in workers)
            if identities != self._owners.identities:
                self._owners = Owners(identities)
        return self._owners

    def assign(self, round: Round) -> list[Decision]:
        """Hand jobs to the workers with a free slot, least loaded first, until none takes one more.

        The states and ``round.holders`` are updated as decisions are made, so one round stays
        consistent.
        """
        pending, size = round.pending, round.farm_size or len(round.workers)
        queued = sum(w.queued_ms for w in round.workers) if round.farm_queued_ms is None else round.farm_queued_ms
        owners = self.owners(round.workers)
        choices = _Choices(round)
        decisions: list[Decision] = []
        progress = True
        while progress and pending:
            progress = False
            mean_ms, fair_ms = queued / max(size, 1), (pending.total_ms + queued) / max(size, 1)
            free = sorted((w for w in round.workers if w.free_slots > 0), key=lambda w: (w.queued_ms, w.worker_id))
            # Views in which a worker holding nothing pending found nothing, since the last decision:
            # past rule 1 the answer does not depend on the worker unless it finds something, so
            # the others holding nothing pending are not asked again (hundreds of idle workers).
            idle: set[int] = set()
            for position, worker in enumerate(free):
                # The least-loaded free worker is never over the cap: were every free worker over it
                # (the mean counts busy workers too), nobody would take anything.
                if not pending or worker.free_slots <= 0 or (position and over_cap(worker, mean_ms)):
                    continue
                index = choices.for_worker(worker)
                if id(index) in idle and not holds_pending(worker, index):
                    continue
                take = choose_route(worker, index, choices.holders(index), size, fair_ms, owners)
                if take is None:
                    idle.add(id(index))
                    continue
                decisions.append(commit(worker, choices.take(index, take.route), round.holders))
                queued += decisions[-1].cost_ms
                progress = True
                idle.clear()
        return decisions
