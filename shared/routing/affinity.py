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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from kleinfarm.shared.routing.pending import PendingIndex
from kleinfarm.shared.routing.policy import NOBODY, Decision, PendingJob, Policy, Round, WorkerState, commit, fits

if TYPE_CHECKING:
    from kleinfarm.shared.capacity import Capability, JobShape

_T = TypeVar("_T")

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
    owners: Ranks | None = None,
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


class Cards:
    """What the policy knows of the fleet's cards: each identity's capability, as rounds show them.

    A job is *restricted* when some known card cannot run it (``Capability.fits``); only then do
    its set's holders and owners need counting one by one. Answers are memoized per shape object
    and forgotten when the fleet's cards change.
    """

    def __init__(self) -> None:
        self.by_identity: dict[str, Capability | None] = {}
        self._kinds: list[Capability] = []  # the distinct capabilities
        self._restricted: dict[int, tuple[JobShape, bool]] = {}
        self._eligible: dict[int, tuple[JobShape, frozenset[str]]] = {}
        self._runs_every: dict[int, tuple[Capability, PendingIndex, int]] = {}
        self._canonical: dict[Capability, Capability] = {}
        self._canonical_ids: dict[int, tuple[Capability, Capability]] = {}

    def learn(self, workers: Iterable[WorkerState]) -> None:
        changed = False
        for worker in workers:
            known = self.by_identity.get(worker.identity, self)
            if known is worker.capability or (known is not self and known == worker.capability):
                continue
            self.by_identity[worker.identity] = worker.capability
            changed = True
        if changed:
            kinds = {capability for capability in self.by_identity.values() if capability is not None}
            self._kinds = sorted(kinds, key=lambda capability: (capability.job_bytes or 0, capability.speed))
            self._restricted.clear()
            self._eligible.clear()

    def canonical(self, capability: Capability) -> Capability:
        """The first capability object seen of ``capability``'s value."""
        known = self._canonical_ids.get(id(capability))
        if known is not None and known[0] is capability:
            return known[1]
        if len(self._canonical_ids) >= MEMO_MAX:  # new objects every round on the farm
            self._canonical_ids.clear()
        if len(self._canonical) >= MEMO_MAX:
            self._canonical.clear()
        canonical = self._canonical.setdefault(capability, capability)
        self._canonical_ids[id(capability)] = (capability, canonical)
        return canonical

    def runs_every(self, capability: Capability, index: PendingIndex) -> bool:
        """Whether ``capability`` can run every job pending in ``index`` (remembered until a shape
        not pending there joins it)."""
        known = self._runs_every.get(id(capability))
        if known is not None and known[0] is capability and known[1] is index and known[2] == index.shapes_added:
            return True
        if any(not fits(capability, shape) for shape in index.shapes()):
            return False
        if len(self._runs_every) >= MEMO_MAX:  # the farm makes new capability objects every round
            self._runs_every.clear()
        self._runs_every[id(capability)] = (capability, index, index.shapes_added)
        return True

    def restricted(self, job: PendingJob) -> bool:
        """Whether some card of the fleet cannot run ``job``."""
        shape = job.shape
        if shape is None:
            return False
        known = self._restricted.get(id(shape))
        if known is not None and known[0] is shape:
            return known[1]
        answer = any(not fits(capability, shape) for capability in self._kinds)
        self._remember(self._restricted, shape, answer)
        return answer

    def eligible(self, shape: JobShape) -> frozenset[str]:
        """The identities whose card can run ``shape`` (a worker without a capability runs anything)."""
        known = self._eligible.get(id(shape))
        if known is not None and known[0] is shape:
            return known[1]
        answer = frozenset(
            identity
            for identity, capability in self.by_identity.items()
            if capability is None or fits(capability, shape)
        )
        self._remember(self._eligible, shape, answer)
        return answer

    @staticmethod
    def _remember(memo: dict[int, tuple[JobShape, _T]], shape: JobShape, answer: _T) -> None:
        if len(memo) >= MEMO_MAX:  # the farm makes new shape objects every round
            memo.clear()
        memo[id(shape)] = (shape, answer)


MEMO_MAX = 65_536


class _CapableOwners:
    """A set's owners among the workers that can run its next job in ``index`` (rule 2)."""

    def __init__(self, owners: Owners, index: PendingIndex, cards: Cards) -> None:
        self.owners, self.index, self.cards = owners, index, cards

    def rank(self, route: str, identity: str) -> int:
        head = self.index.queues[route][0]
        if head.shape is not None and self.cards.restricted(head):
            return self.owners.rank_among(route, identity, self.cards.eligible(head.shape))
        return self.owners.rank(route, identity)


class _Holders(Mapping[str, int]):
    """Holders of each route that may take its next job in ``index``: not those kept off its
    campaign, nor (on a mixed fleet) those whose card cannot run it.

    Without this, a job whose only holder is blocklisted from its campaign waits for ever: the
    holder never takes it, and every other worker sees its set as held (and not worth rebuilding).
    The same for a job too big for every card that holds its set: the set is "wanted", and a card
    that can run the job builds it.
    """

    def __init__(self, round: Round, index: PendingIndex, cards: Cards | None) -> None:
        self.round, self.index, self.cards = round, index, cards

    def __getitem__(self, route: str) -> int:
        count: int | None = self.get(route)
        if count is None:
            raise KeyError(route)
        return count

    def get(self, route: str, default: Any = None) -> Any:  # rule 2 asks for every set in the window
        count: int | None = self.round.holders.get(route)
        if count is None:
            return default
        queue = self.index.queues.get(route)
        if not queue:
            return count
        head = queue[0]
        kept_off = self.round.kept_off(head) if self.round.exclusions else NOBODY
        if self.cards is not None and self.cards.restricted(head):
            # Counted one by one, busy workers too (``Round.fleet``): only those that can run it.
            fleet = self.round.workers if self.round.fleet is None else self.round.fleet
            return sum(
                1 for state in fleet if route in state.holds and state.identity not in kept_off and state.can_run(head)
            )
        if kept_off:
            count -= sum(1 for state in self.round.workers if route in state.holds and state.identity in kept_off)
        return count

    def __iter__(self) -> Iterator[str]:
        return iter(self.round.holders)

    def __len__(self) -> int:
        return len(self.round.holders)


class _Choices:
    """What each worker may choose from this round: the pending jobs its card can run, less its
    blocked campaigns.

    On a mixed fleet a worker whose card cannot run some pending job sees the index's view of the
    jobs it can (``PendingIndex.view``, one per capability, kept in step by the index itself, from
    round to round where the index lives on). A worker kept off campaigns sees a filtered copy of
    that (one per distinct set of blocked campaigns, made once a round); every job taken comes out
    of the real index, its views and every copy, so they stay in step. With no exclusions and no
    capabilities, every worker sees the real index itself.
    """

    def __init__(self, round: Round, cards: Cards | None) -> None:
        self.round, self.cards = round, cards
        self._views: dict[tuple[int, frozenset[str]], PendingIndex] = {}
        self._runnable: dict[int, PendingIndex] = {}  # by id of the capability, for this round

    def for_worker(self, worker: WorkerState) -> PendingIndex:
        index = self.round.pending
        if self.cards is not None and worker.capability is not None:
            index = self._runnable_by(worker.capability, self.cards)
        if not self.round.exclusions:
            return index
        blocked = self.round.blocked(worker)
        if not blocked:
            return index
        view = self._views.get((id(index), blocked))
        if view is None:
            view = self._views[(id(index), blocked)] = index.excluding(blocked)
        return view

    def _runnable_by(self, capability: Capability, cards: Cards) -> PendingIndex:
        """The jobs ``capability`` can run: the index itself while it can run every pending one."""
        index = self._runnable.get(id(capability))
        if index is None:
            pending = self.round.pending
            # One view per distinct capability, by value (the farm's workers each bring their own
            # object), looked up by the identity of the first object of that value (the view's
            # filter keeps it alive, so its id stays its own).
            capability = cards.canonical(capability)
            key = ("capability", id(capability))
            view = pending.existing_view(key)
            if view is None and not cards.runs_every(capability, pending):
                view = pending.view(key, _runs(capability))
            index = self._runnable[id(capability)] = pending if view is None else view
        return index

    def holders(self, index: PendingIndex) -> Mapping[str, int]:
        """The holder counts a worker choosing from ``index`` goes by."""
        if self.round.exclusions or self.cards is not None:
            return _Holders(self.round, index, self.cards)
        return self.round.holders

    def take(self, index: PendingIndex, route: str | None) -> PendingJob:
        """The oldest job of ``route`` in ``index``, taken out of the round."""
        if index is self.round.pending and not self._views:
            return index.pop(route)  # no copies to keep in step (the index updates its own views)
        job = index.queues[route][0]
        self.round.pending.remove(job)
        for view in self._views.values():
            if view.holds(job):
                view.remove(job)
        return job


def _runs(capability: Capability) -> Callable[[PendingJob], bool]:
    def accepts(job: PendingJob) -> bool:
        return job.shape is None or fits(capability, job.shape)

    return accepts


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
        choices = _Choices(round, cards)
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
                ranks: Ranks = owners if cards is None else _CapableOwners(owners, index, cards)
                take = choose_route(worker, index, choices.holders(index), size, fair_ms, ranks)
                if take is None:
                    idle.add(id(index))
                    continue
                decisions.append(commit(worker, choices.take(index, take.route), round.holders))
                queued += decisions[-1].cost_ms
                progress = True
                idle.clear()
        return decisions
