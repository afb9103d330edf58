"""The pending jobs of one round, indexed by route for the affinity policy's questions.

Part of the interface (``policy.py`` re-exports both): the job as a policy sees it, and the index.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from kleinfarm.shared.costmodel import to_ms
from kleinfarm.shared.routing.submissions import Submissions

if TYPE_CHECKING:
    from kleinfarm.shared.capacity import JobShape

WINDOW_ROUTES = 64  # how far down the pending queue a decision looks, in distinct reference sets


@dataclass
class PendingJob:
    """A job waiting for a worker, as a policy sees it."""

    job_id: str
    route: str | None  # reference-set routing key; None for a job without references
    work_s: float  # seconds when its K/V are held (or it has none)
    build_s: float  # seconds a miss adds
    priority: int = 0
    campaign: str | None = None  # for exclusions: a campaign may keep some workers off its jobs
    # What its memory depends on (``shared/capacity.py``), for who can run it; None: any worker can.
    shape: JobShape | None = None
    # The jobs it came with (a campaign, a burst of a trace) and when they came (seconds, the farm's
    # clock): what ``submissions.py`` and the catch-up rule (``catchup.py``) go by. None: unknown.
    submission: str | None = None
    submitted_s: float | None = None
    # The same costs in whole milliseconds, what load is counted in (``costmodel.to_ms``).
    work_ms: int = field(init=False, repr=False, compare=False)
    build_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.work_ms, self.build_ms = to_ms(self.work_s), to_ms(self.build_s)


class PendingIndex:
    """Pending jobs by route, routes in the order their oldest job arrived, jobs FIFO within.

    It also keeps every job's arrival order (``jobs``), for the policies that place jobs one by one.
    Backlogs are whole milliseconds, so they return to exactly zero however many jobs pass.
    """

    def __init__(self, jobs: Iterable[PendingJob] = ()) -> None:
        self.queues: OrderedDict[str | None, deque[PendingJob]] = OrderedDict()
        self.backlog_ms: dict[str | None, int] = {}
        self.total_ms = 0
        self._priorities: dict[int, int] = {}
        # Keyed by object identity, not job_id: a copy shares the jobs, and ids need not be unique.
        self._order: dict[int, PendingJob] = {}
        # The distinct shapes pending (by identity: a trace shares one object per shape), with counts.
        self._shapes: dict[int, tuple[JobShape, int]] = {}
        self.shapes_added = 0  # how many times a shape not pending joined: answers about shapes() expire
        # Sub-indexes kept in step with this one (``view``): the jobs one kind of worker can run.
        self._views: dict[Hashable, tuple[Callable[[PendingJob], bool], PendingIndex]] = {}
        self.submissions: Submissions[PendingJob] = Submissions()
        for job in jobs:
            self.add(job)

    def __bool__(self) -> bool:
        return bool(self.queues)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, route: object) -> bool:
        return route in self.queues

    def add(self, job: PendingJob) -> None:
        opened = job.route not in self.queues
        self.queues.setdefault(job.route, deque()).append(job)
        self.backlog_ms[job.route] = self.backlog_ms.get(job.route, 0) + job.work_ms
        self.total_ms += job.work_ms
        self._priorities[job.priority] = self._priorities.get(job.priority, 0) + 1
        self._order[id(job)] = job
        if job.shape is not None:
            shape, count = self._shapes.get(id(job.shape), (job.shape, 0))
            self._shapes[id(shape)] = (shape, count + 1)
            self.shapes_added += not count
        self.submissions.added(job, opened)
        for accepts, view in self._views.values():
            if accepts(job):
                view.add(job)

    def pop(self, route: str | None) -> PendingJob:
        """Take the oldest job of ``route``."""
        job = self.queues[route].popleft()
        self._forget(job, was_oldest=True)
        return job

    def remove(self, job: PendingJob) -> None:
        """Take out ``job``, wherever it is in its route's queue (KeyError if it is not pending)."""
        queue = self.queues[job.route]
        was_oldest = queue[0] is job
        if was_oldest:  # the usual case: cheap
            queue.popleft()
        else:
            # By identity: equal jobs (same fields) may both be pending, and only this one goes.
            position = next((index for index, queued in enumerate(queue) if queued is job), None)
            if position is None:
                raise KeyError(job.job_id)
            del queue[position]
        self._forget(job, was_oldest)

    def _forget(self, job: PendingJob, was_oldest: bool) -> None:
        """Update the totals for a job just taken out of its route's queue (``was_oldest``: from its head)."""
        self.backlog_ms[job.route] -= job.work_ms
        self.total_ms -= job.work_ms
        queue = self.queues[job.route]
        self.submissions.taken(job, was_oldest, queue[0] if was_oldest and queue else None)
        self._priorities[job.priority] -= 1
        if not self._priorities[job.priority]:
            del self._priorities[job.priority]
        del self._order[id(job)]
        if not self.queues[job.route]:
            del self.queues[job.route]
            del self.backlog_ms[job.route]
        if job.shape is not None:
            shape, count = self._shapes[id(job.shape)]
            if count > 1:
                self._shapes[id(shape)] = (shape, count - 1)
            else:
                del self._shapes[id(shape)]
        for _, view in self._views.values():
            if id(job) in view._order:
                view.remove(job)

    def holds(self, job: PendingJob) -> bool:
        """Whether ``job`` itself (not an equal one) is pending here."""
        return id(job) in self._order

    def shapes(self) -> Iterator[JobShape]:
        """The distinct shapes of the pending jobs that have one."""
        return (shape for shape, _ in self._shapes.values())

    def view(self, key: Hashable, accepts: Callable[[PendingJob], bool]) -> PendingIndex:
        """The pending jobs ``accepts`` keeps (those one kind of worker can run), as an index of its own.

        Made on first use and kept in step from then on: a job added here is added to it if
        accepted, a job taken out here is taken out of it. Its routes and jobs keep this index's
        order, and it shares the job objects, so a job chosen from it can be ``remove``-d from this
        one. ``key`` names it: the same key, the same view (and ``accepts`` must not change).
        """
        known = self._views.get(key)
        if known is not None:
            return known[1]
        view = self._subset(accepts)
        self._views[key] = (accepts, view)
        return view

    def existing_view(self, key: Hashable) -> PendingIndex | None:
        """The view made under ``key``, if one was."""
        known = self._views.get(key)
        return None if known is None else known[1]

    def _subset(self, keeps: Callable[[PendingJob], bool]) -> PendingIndex:
        """A copy of the jobs ``keeps`` keeps, in the same order (routes and jobs alike)."""
        copy = PendingIndex()
        for queue in self.queues.values():
            for job in queue:
                if keeps(job):
                    copy.add(job)
        # Routes were added in this index's route order; the arrival order is this index's too.
        copy._order = {key: job for key, job in self._order.items() if key in copy._order}
        return copy

    def excluding(self, campaigns: frozenset[str]) -> PendingIndex:
        """A copy without the jobs of ``campaigns``, in the same order (routes and jobs alike).

        The copy shares the job objects, so a job chosen from it can be ``remove``-d from this one.
        """
        return self._subset(lambda job: job.campaign not in campaigns)

    @property
    def top_priority(self) -> int:
        return max(self._priorities)

    def head_priority(self, route: str | None) -> int:
        return self.queues[route][0].priority

    def window(self) -> Iterator[str | None]:
        return islice(self.queues, WINDOW_ROUTES)

    def jobs(self) -> Iterator[PendingJob]:
        """Every pending job, in the order it was added."""
        return iter(self._order.values())
