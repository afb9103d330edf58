"""What the affinity policy sees of a fleet of unequal cards, and of campaigns that keep workers off
(``docs/routing.md``, "A mixed fleet"): which jobs each worker may choose from this round, which
holders of a set can take its next job, and a set's owners among the cards that can run it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from kleinfarm.shared.routing.pending import PendingIndex
from kleinfarm.shared.routing.policy import NOBODY, PendingJob, Round, WorkerState, fits

if TYPE_CHECKING:
    from kleinfarm.shared.capacity import Capability, JobShape

_T = TypeVar("_T")


class Owners(Protocol):
    """Each set's workers in rendezvous order (``affinity.Owners``)."""

    def rank(self, route: str, identity: str) -> int: ...
    def rank_among(self, route: str, identity: str, eligible: frozenset[str]) -> int: ...


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


class CapableOwners:
    """A set's owners among the workers that can run its next job in ``index`` (rule 2)."""

    def __init__(self, owners: Owners, index: PendingIndex, cards: Cards) -> None:
        self.owners, self.index, self.cards = owners, index, cards

    def rank(self, route: str, identity: str) -> int:
        head = self.index.queues[route][0]
        if head.shape is not None and self.cards.restricted(head):
            return self.owners.rank_among(route, identity, self.cards.eligible(head.shape))
        return self.owners.rank(route, identity)


class HoldersFor(Mapping[str, int]):
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


class Choices:
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
            return HoldersFor(self.round, index, self.cards)
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
