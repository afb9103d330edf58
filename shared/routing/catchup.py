"""Catching up: while the farm drains an old backlog, the oldest jobs go first (``docs/routing.md``).

Affinity lets a held set's jobs jump ahead of older ones, which is what keeps the K/V hit rate
high under a lasting overload. After a transient one (a bulk edit submitted whole, while campaigns
keep arriving) it leaves the jobs submitted during the backlog behind later ones, and a hot set
submitted then runs on one worker while first-in-first-out would have spread it. So, once per
round, the policy asks whether the farm is *catching up*:

- it is draining: fewer jobs were submitted since the oldest pending one than ``DRAINING`` times
  the jobs it dispatched in that time (a lasting overload submits more than it dispatches);
- and the oldest pending job has waited more than ``OLD_S``.

Then a free worker takes, in order:

1. a job of a set it holds, if that set's oldest job came at most ``JUMP_S`` after the oldest
   pending one (largest backlog first);
2. the oldest of: a job without references, a set nobody holds, a set with fewer holders than it
   needs to finish by when first-in-first-out would (its backlog over ``HORIZON_SHARE`` times the
   time the farm takes to clear the work submitted up to its newest job);
3. else the affinity policy's last resort, else a held set.

Outside catch-up the affinity rules run unchanged.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kleinfarm.shared.routing.pending import PendingIndex, PendingJob
from kleinfarm.shared.routing.policy import Round

DRAINING = 0.9
OLD_S = 600.0
JUMP_S = 90.0
HORIZON_SHARE = 0.5
HISTORY_MAX = 100_000  # rounds remembered (each a time and two counters)


@dataclass(frozen=True)
class Pick:
    """A catch-up decision: the next job of ``route`` (None: a job without references)."""

    route: str | None


class Order:
    """Where each set stands in one index's submission order (its order of insertion), for one
    round: its oldest job's place, and the pending work submitted up to its newest job."""

    def __init__(self, index: PendingIndex) -> None:
        self.head: dict[str | None, int] = {}
        self.work_to_last: dict[str | None, int] = {}
        total = 0
        for place, job in enumerate(index.jobs()):
            total += job.work_ms
            self.head.setdefault(job.route, place)
            self.work_to_last[job.route] = total


class CatchUp:
    """The catch-up test's memory (submitted and dispatched jobs over time) and its choice."""

    def __init__(self) -> None:
        self._times: list[float] = []
        self._counts: list[tuple[int, int]] = []  # (submitted, dispatched) as of each time
        self._dispatched = 0
        self._orders: dict[int, tuple[PendingIndex, Order]] = {}

    def engaged(self, round: Round) -> bool:
        """Record this round, and say whether the farm is catching up on an old backlog."""
        self._orders.clear()
        now, submitted = round.now_s, round.submitted_jobs
        if now is None or submitted is None or not round.pending:
            return False
        self._remember(now, submitted)
        oldest = _oldest_takeable(round, now)
        if oldest is None:
            return False
        since = max(bisect.bisect_right(self._times, oldest) - 1, 0)
        then_submitted, then_dispatched = self._counts[since]
        return submitted - then_submitted < DRAINING * (self._dispatched - then_dispatched)

    def dispatched(self, jobs: int) -> None:
        self._dispatched += jobs

    def _remember(self, now: float, submitted: int) -> None:
        counts = (submitted, self._dispatched)
        if self._counts and self._counts[-1] == counts:
            return
        if self._times and now < self._times[-1]:  # a clock that stepped back: start again
            self._times, self._counts = [], []
        self._times.append(now)
        self._counts.append(counts)
        if len(self._times) > HISTORY_MAX:
            del self._times[: HISTORY_MAX // 2], self._counts[: HISTORY_MAX // 2]

    def order(self, index: PendingIndex) -> Order:
        known = self._orders.get(id(index))
        if known is None or known[0] is not index:
            known = self._orders[id(index)] = (index, Order(index))
        return known[1]

    def choose(
        self,
        index: PendingIndex,
        holders: Mapping[str, int],
        workers: int,
        fair_ms: float,
        held: list[str],
        window: list[str | None],
        steal: Callable[[], str | None],
    ) -> Pick | None:
        """What a worker holding ``held`` takes while the farm catches up (rules 1-3 above), from the
        sets of ``window``; ``steal``: the affinity policy's last resort, asked last. None: nothing."""
        oldest = oldest_submitted(index.queues[route][0] for route in window)
        if oldest is not None:
            recent = [route for route in held if _head_submitted(index, route) <= oldest + JUMP_S]
            if recent:
                return Pick(max(recent, key=lambda route: (index.backlog_ms[route], route)))
        order = self.order(index)
        queued_ms = max(fair_ms * workers - index.total_ms, 0.0)
        due = [
            route
            for route in window
            if route is None or _short_of_holders(index, route, holders.get(route, 0), order, queued_ms, workers)
        ]
        if due:
            return Pick(min(due, key=lambda route: order.head[route]))
        stolen = steal()
        if stolen is not None:
            return Pick(stolen)
        if held:
            return Pick(max(held, key=lambda route: (index.backlog_ms[route], route)))
        return None


def oldest_submitted(heads: Iterable[PendingJob]) -> float | None:
    """When the oldest of ``heads`` was submitted (None: none, or one's time is unknown)."""
    times = [head.submitted_s for head in heads]
    known = [time for time in times if time is not None]
    return min(known) if known and len(known) == len(times) else None


def _oldest_takeable(round: Round, now: float) -> float | None:
    """When the oldest job some worker may take was submitted, if that is over ``OLD_S`` ago: of the
    window's sets at the top priority. A job no card can run, or of a campaign every worker is kept
    off, waits by design and must not keep the farm catching up for ever. None: not that old."""
    index = round.pending
    top = index.top_priority
    heads = [index.queues[route][0] for route in index.window() if index.head_priority(route) == top]
    oldest = oldest_submitted(heads)
    if oldest is None or now - oldest <= OLD_S:
        return None
    fleet = round.workers if round.fleet is None else round.fleet
    if round.exclusions or any(worker.capability is not None for worker in fleet):
        takeable = [
            head
            for head in heads
            if any(worker.identity not in round.kept_off(head) and worker.can_run(head) for worker in fleet)
        ]
        oldest = oldest_submitted(takeable)
        if oldest is None or now - oldest <= OLD_S:
            return None
    return oldest


def _head_submitted(index: PendingIndex, route: str) -> float:
    submitted = index.queues[route][0].submitted_s
    return math.inf if submitted is None else submitted


def _short_of_holders(
    index: PendingIndex, route: str, holders: int, order: Order, queued_ms: float, workers: int
) -> bool:
    """Whether ``route`` has no holder, or fewer than it needs to finish when first-in-first-out would."""
    if not holders:
        return True
    horizon_ms = (order.work_to_last.get(route, 0) + queued_ms) / max(workers, 1)
    queue = index.queues[route]
    wanted = math.ceil(index.backlog_ms[route] / (HORIZON_SHARE * max(horizon_ms, 1.0)) - 1e-9)
    return holders < min(wanted, len(queue), workers)
