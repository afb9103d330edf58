"""What the affinity policy knows of submissions: the jobs that came in together (a campaign, a
bulk edit, a trace's burst), kept in step by ``PendingIndex`` as jobs come and go.

Two questions (``docs/routing.md``, "Submissions"):

- Is a set's pending work a *lump*? At least half of it came in one submission of two or more of
  its jobs (the submission of its oldest or of its newest pending job). A campaign's kit is one:
  its backlog came whole and will drain, so spreading it or stealing it early buys little and costs
  builds. A set fed by a steady stream (a Zipf trace's hot set) never is one.
- Which set of a *singletons* submission is cheapest? A submission whose every pending job is the
  oldest pending job of a set of its own (a bulk product edit: one photo per product) builds each
  set once whatever the order, so its jobs run cheapest first: shortest processing time first, the
  most jobs done soonest.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Job(Protocol):
    """What this file reads of a pending job (``pending.PendingJob``)."""

    @property
    def submission(self) -> str | None: ...
    @property
    def route(self) -> str | None: ...
    @property
    def work_ms(self) -> int: ...
    @property
    def build_ms(self) -> int: ...


PendingJob = TypeVar("PendingJob", bound=Job)

LUMP_SHARE = 0.5  # of a set's pending work from one submission
LUMP_MIN_JOBS = 2  # a submission brings at least this many of the set's jobs to make it a lump


class Submissions(Generic[PendingJob]):
    """Pending work per set and submission, and each submission's sets by cost. Only what is
    pending counts, so an index rebuilt every round (the farm's) and one kept for hours (the
    simulator's) answer alike, and a submission is forgotten once none of it is pending."""

    def __init__(self) -> None:
        # route -> submission -> [pending work in ms, pending jobs]
        self._by_route: dict[str, dict[str, list[int]]] = {}
        # submission -> [pending jobs, those that are not the oldest pending job of a set of their own]
        self._pending: dict[str, list[int]] = {}
        # submission -> (cost ms, order, route, job) of its jobs that were the oldest of their set
        # when they joined or became so, cheapest first; entries of jobs since taken are dropped
        # when met, and the whole heap when none of the submission is pending.
        self._cheapest: dict[str, list[tuple[int, int, str, PendingJob]]] = {}
        self._order = 0

    def added(self, job: PendingJob, oldest: bool) -> None:
        """``job`` joined the index; ``oldest``: no job of its set was pending before it."""
        submission = job.submission
        if submission is None:
            return
        counts = self._pending.setdefault(submission, [0, 0])
        counts[0] += 1
        if job.route is None or not oldest:
            counts[1] += 1
            if job.route is None:
                return
        pending = self._by_route.setdefault(job.route, {}).setdefault(submission, [0, 0])
        pending[0] += job.work_ms
        pending[1] += 1
        if oldest:
            self._push(submission, job.route, job)

    def taken(self, job: PendingJob, was_oldest: bool, next_oldest: PendingJob | None) -> None:
        """``job`` left the index; ``was_oldest``: it was its set's oldest pending job, and
        ``next_oldest`` is now."""
        submission = job.submission
        if submission is not None:
            counts = self._pending[submission]
            counts[0] -= 1
            if job.route is None or not was_oldest:
                counts[1] -= 1
            if not counts[0]:
                del self._pending[submission]
                self._cheapest.pop(submission, None)
            if job.route is not None:
                submissions = self._by_route[job.route]
                pending = submissions[submission]
                pending[0] -= job.work_ms
                pending[1] -= 1
                if not pending[1]:
                    del submissions[submission]
                if not submissions:
                    del self._by_route[job.route]
        if next_oldest is not None and next_oldest.submission is not None and next_oldest.route is not None:
            self._pending[next_oldest.submission][1] -= 1
            self._push(next_oldest.submission, next_oldest.route, next_oldest)

    def _push(self, submission: str, route: str, job: PendingJob) -> None:
        self._order += 1
        heapq.heappush(self._cheapest.setdefault(submission, []), (job.work_ms + job.build_ms, self._order, route, job))

    def lump(self, route: str, oldest: PendingJob, newest: PendingJob, backlog_ms: int) -> bool:
        """Whether most of ``route``'s pending work (``backlog_ms``, from ``oldest`` to ``newest``)
        came in the submission of its oldest or its newest job."""
        submissions = self._by_route.get(route)
        if not submissions:
            return False
        shares = [
            pending[0]
            for submission in {oldest.submission, newest.submission}
            if submission is not None
            and (pending := submissions.get(submission)) is not None
            and pending[1] >= LUMP_MIN_JOBS
        ]
        return bool(shares) and max(shares) >= LUMP_SHARE * backlog_ms

    def singletons(self, submission: str | None) -> bool:
        """Whether every pending job of ``submission`` is the oldest pending job of a set of its own."""
        counts = self._pending.get(submission) if submission is not None else None
        return counts is not None and counts[1] == 0

    def cheapest(self, submission: str, still: Callable[[PendingJob], bool], fits: Callable[[str], bool]) -> str | None:
        """The cheapest set of ``submission`` whose job is ``still`` pending and ``fits`` the taker."""
        heap = self._cheapest.get(submission)
        if heap is None:
            return None
        aside = []
        found = None
        while heap:
            _cost, _order, route, job = heap[0]
            if not still(job):
                heapq.heappop(heap)  # taken: gone for good
                continue
            if fits(route):
                found = route
                break
            aside.append(heapq.heappop(heap))  # not for this taker now; back in the heap below
        for entry in aside:
            heapq.heappush(heap, entry)
        return found
