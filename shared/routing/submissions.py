"""What the affinity policy knows of submissions: the jobs that came in together (a campaign, a
bulk edit, a trace's burst), kept in step by ``PendingIndex`` as jobs come and go.

Two questions (``docs/routing.md``, "Submissions"):

- Is a set's pending work a *lump*? At least half of it came in one submission of two or more of
  its jobs (the submission of its oldest or of its newest pending job). A campaign's kit is one:
  its backlog came whole and will drain, so spreading it or stealing it early buys little and costs
  builds. A set fed by a steady stream (a Zipf trace's hot set) never is one.
- Which set of a *singletons* submission is cheapest? A submission whose every job opened a set of
  its own (a bulk product edit: one photo per product) builds each set once whatever the order, so
  its jobs run cheapest first: shortest processing time first, the most jobs done soonest.
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
    """Pending work per set and submission, and each singletons submission's sets by cost."""

    def __init__(self) -> None:
        # route -> submission -> [pending work in ms, pending jobs]
        self._by_route: dict[str, dict[str, list[int]]] = {}
        # submission -> [jobs added, jobs that opened a set of their own]: never taken back, as a
        # submission is singletons by what it brought, not by what is left of it.
        self._counts: dict[str, list[int]] = {}
        # submission -> (cost ms, order, route, job) of the jobs that opened a set, cheapest first;
        # entries of jobs since taken are dropped when met.
        self._cheapest: dict[str, list[tuple[int, int, str, PendingJob]]] = {}
        self._order = 0

    def added(self, job: PendingJob, opened: bool) -> None:
        """``job`` joined the index; ``opened``: its set had no pending job before it."""
        submission = job.submission
        if submission is None:
            return
        counts = self._counts.setdefault(submission, [0, 0])
        counts[0] += 1
        if job.route is None:
            return
        pending = self._by_route.setdefault(job.route, {}).setdefault(submission, [0, 0])
        pending[0] += job.work_ms
        pending[1] += 1
        if opened:
            counts[1] += 1
            self._order += 1
            entry = (job.work_ms + job.build_ms, self._order, job.route, job)
            heapq.heappush(self._cheapest.setdefault(submission, []), entry)

    def taken(self, job: PendingJob) -> None:
        """``job`` left the index."""
        if job.submission is None or job.route is None:
            return
        submissions = self._by_route[job.route]
        pending = submissions[job.submission]
        pending[0] -= job.work_ms
        pending[1] -= 1
        if not pending[1]:
            del submissions[job.submission]
        if not submissions:
            del self._by_route[job.route]

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
        """Whether every job ``submission`` brought opened a set of its own."""
        counts = self._counts.get(submission) if submission is not None else None
        return counts is not None and counts[0] == counts[1]

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
