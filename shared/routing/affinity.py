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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from kleinfarm.shared.routing.catchup import CatchUp
from kleinfarm.shared.routing.fleet_view import CapableOwners, Cards, Choices
from kleinfarm.shared.routing.pending import PendingIndex
from kleinfarm.shared.routing.policy import Decision, Policy, Round, WorkerState, commit

if TYPE_CHECKING:
    pass

_T = TypeVar("_T")

LOAD_CAP = 1.25
SPREAD_SLACK = 2.0
# A worker with nothing better builds a set held elsewhere when the holders' backlog per holder
# outlasts building it here this many times over. Not more than once: under a lasting overload the
# spread rule covers about half the farm (``SPREAD_SLACK``) and these steals keep the rest busy; at
# 2, 4 and 16 a 512-worker Zipf farm left workers idle behind its backlog (``docs/routing.md``).
STEAL_RATIO = 1.0
# A lump (``submissions.py``: a set whose backlog came mostly in one submission, a campaign's kit)
# drains by itself: it is stolen only when its holders' backlog per holder outlasts
# min(LUMP_STEAL_FAIR fair shares, LUMP_STEAL_JOBS of its jobs with a build), and it spreads to a
# holder per LUMP_SPREAD_JOBS of its jobs at least. On a short backlog (a campaign on a quiet farm)
# that saves builds; on a long one the bar is the usual one.
LUMP_STEAL_FAIR = 3.0
LUMP_STEAL_JOBS = 20.0
LUMP_SPREAD_JOBS = 10.0


@dataclass(frozen=True)
class Take:
    """A decision: the worker takes the next job of ``route`` (None: a job without references)."""

    route: str | None


def rendezvous(route: str, identity: str) -> int:
    """Highest-random-weight score: each worker ranks the reference sets in its own stable order."""
    return int.from_bytes(hashlib.blake2b(f"{route}|{identity}".encode(), digest_size=8).digest(), "big")


class Ranks(Protocol):
    def rank(self, route: str, identity: str) -> int:
        """Where ``identity`` stands in ``route``'s rendezvous order: its first ``k`` are its owners."""


class Owners:
    """Each reference set's workers in rendezvous order, memoized: its first ``k`` are its owners."""

    def __init__(self, identities: Iterable[str]) -> None:
        self.identities = sorted(identities)
        self._ranks: dict[str, dict[str, int]] = {}
        self._among: dict[tuple[str, frozenset[str]], dict[str, int]] = {}

    def rank(self, route: str, identity: str) -> int:
        ranks = self._ranks.get(route)
        if ranks is None:
            order = sorted(self.identities, key=lambda name: rendezvous(route, name), reverse=True)
            ranks = self._ranks[route] = {name: index for index, name in enumerate(order)}
        return ranks.get(identity, len(self.identities))

    def rank_among(self, route: str, identity: str, eligible: frozenset[str]) -> int:
        """``rank`` counting only the ``eligible`` identities (the workers that can run a job):
        a set's owners are chosen among those."""
        ranks = self._among.get((route, eligible))
        if ranks is None:
            self.rank(route, identity)
            order = sorted(self._ranks[route], key=self._ranks[route].__getitem__)
            ranks = {name: index for index, name in enumerate(name for name in order if name in eligible)}
            self._among[(route, eligible)] = ranks
        return ranks.get(identity, len(self.identities))


def desired_holders(backlog: float, fair: float, workers: int, least_per_holder: float = 0.0) -> int:
    """How many workers a reference set's backlog should spread over (all in one unit of time).

    A set spreads only once its backlog passes ``SPREAD_SLACK`` fair shares: a worker busy with
    one set while others finish is cheaper than building the set again elsewhere, until then; and
    each holder gets at least ``least_per_holder`` of it.
    """
    per_holder = max(SPREAD_SLACK * fair, least_per_holder)
    if per_holder <= 0:
        return 1
    return max(1, min(workers, math.ceil(backlog / per_holder - 1e-9)))


def over_cap(worker: WorkerState, mean_queued_ms: float, cap: float = LOAD_CAP) -> bool:
    """Bounded load: a worker with work queued beyond ``cap`` x the mean waits its turn."""
    return worker.queued_ms > 0 and worker.queued_ms > cap * mean_queued_ms


def choose_route(
    worker: WorkerState,
    pending: PendingIndex,
    holders: Mapping[str, int],
    workers: int,
    fair_ms: float,
    owners: Ranks | None = None,
    catchup: CatchUp | None = None,
) -> Take | None:
    """Where ``worker`` should take its next job from; None when it should wait.

    ``holders`` counts, per route, the workers holding it or already handed a job of it that may
    take its next job. ``fair_ms`` is a worker's fair share of the farm's work. ``catchup``: the
    farm is catching up on an old backlog, and its rules choose instead (``catchup.py``).
    """
    if not pending:
        return None
    top = pending.top_priority
    held = held_routes(worker, pending, top)
    window = [route for route in pending.window() if pending.head_priority(route) == top]
    if catchup is not None:

        def steal() -> str | None:  # asked only when nothing older is due
            take = last_resort(window, pending, holders, fair_ms)
            return None if take is None else take.route

        pick = catchup.choose(pending, holders, workers, fair_ms, held, window, steal)
        return None if pick is None else Take(pick.route)
    if held:
        # Ties by name: a set's iteration order changes with PYTHONHASHSEED, and results must not.
        return Take(max(held, key=lambda route: (pending.backlog_ms[route], route)))
    return cheapest_first(_unheld_choice(worker, pending, holders, workers, fair_ms, owners, window), pending, holders)


def _unheld_choice(
    worker: WorkerState,
    pending: PendingIndex,
    holders: Mapping[str, int],
    workers: int,
    fair_ms: float,
    owners: Ranks | None,
    window: list[str | None],
) -> Take | None:
    """Rules 2 to 4, for a worker holding no set with a job pending."""
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
    return last_resort(window, pending, holders, fair_ms)


def cheapest_first(take: Take | None, pending: PendingIndex, holders: Mapping[str, int]) -> Take | None:
    """A set of a singletons submission (a bulk edit: each job its own set, ``submissions.py``) with
    one job and no holder: the cheapest such set of that submission instead. Each is built once
    whatever the order, so no hit is lost, and the most jobs are done soonest."""
    if take is None or take.route is None or not _single(pending, holders, take.route):
        return take
    submission = pending.queues[take.route][0].submission
    if submission is None or not pending.submissions.singletons(submission):
        return take
    cheapest = pending.submissions.cheapest(submission, pending.holds, lambda route: _single(pending, holders, route))
    return take if cheapest is None else Take(cheapest)


def _single(pending: PendingIndex, holders: Mapping[str, int], route: str) -> bool:
    queue = pending.queues.get(route)
    return queue is not None and len(queue) == 1 and not holders.get(route, 0)


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
    queue = pending.queues[route]
    head = queue[0]
    least = LUMP_SPREAD_JOBS * (head.build_ms + head.work_ms) if lump(pending, route) else 0.0
    return desired_holders(pending.backlog_ms[route], fair_ms, min(workers, len(queue)), least)


def lump(pending: PendingIndex, route: str) -> bool:
    """Whether ``route``'s pending work came mostly in one submission (``submissions.py``)."""
    queue = pending.queues[route]
    return pending.submissions.lump(route, queue[0], queue[-1], pending.backlog_ms[route])


def last_resort(
    window: list[str | None], pending: PendingIndex, holders: Mapping[str, int], fair_ms: float
) -> Take | None:
    """For a worker that would otherwise idle: the set whose holders are most swamped, if their
    backlog per holder outlasts building it here ``STEAL_RATIO`` times over (a lump: more)."""
    best: tuple[float, str] | None = None
    for route in window:
        if route is None:
            continue
        head = pending.queues[route][0]
        cost = head.build_ms + head.work_ms
        share = pending.backlog_ms[route] / max(holders.get(route, 0), 1)
        bar = STEAL_RATIO * cost
        if share > bar and lump(pending, route):
            bar = max(bar, min(LUMP_STEAL_FAIR * fair_ms, LUMP_STEAL_JOBS * cost))
        gain = share - bar
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, route)
    return Take(best[1]) if best else None


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
        self._cards = Cards()
        self._catchup = CatchUp()

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
        # A mixed fleet: some worker's card cannot run every job, or runs at its own speed.
        cards: Cards | None = None
        if round.fleet is not None or any(worker.capability is not None for worker in round.workers):
            cards = self._cards
            cards.learn(round.workers)  # every worker is in some round before it holds anything
        choices = Choices(round, cards)
        catchup = self._catchup if self._catchup.engaged(round) else None
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
            firsts: set[int] = set()  # on a mixed fleet: the views whose least-loaded free worker came
            for position, worker in enumerate(free):
                if not pending or worker.free_slots <= 0:
                    continue
                # The least-loaded free worker is never over the cap: were every free worker over it
                # (the mean counts busy workers too), nobody would take anything. On a mixed fleet,
                # the least-loaded of each view (the workers that can run the same jobs): else a
                # job only some cards can run would wait while each of them is over the cap.
                if cards is None:
                    if position and over_cap(worker, mean_ms):
                        continue
                    index = choices.for_worker(worker)
                else:
                    index = choices.for_worker(worker)
                    if id(index) in firsts and over_cap(worker, mean_ms):
                        continue
                    firsts.add(id(index))
                if id(index) in idle and not holds_pending(worker, index):
                    continue
                ranks: Ranks = owners if cards is None else CapableOwners(owners, index, cards)
                take = choose_route(worker, index, choices.holders(index), size, fair_ms, ranks, catchup)
                if take is None:
                    idle.add(id(index))
                    continue
                decisions.append(commit(worker, choices.take(index, take.route), round.holders))
                queued += decisions[-1].cost_ms
                progress = True
                idle.clear()
        self._catchup.dispatched(len(decisions))
        return decisions
