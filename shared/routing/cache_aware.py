"""SGLang's ``cache_aware`` router, with a reference set as the prefix (a baseline).

Shortest queue when the load is imbalanced; otherwise the least busy worker that has already
been sent the job's reference set, if the match rate passes a threshold; else the shortest queue.
Loads are counted in jobs in flight, as SGLang counts requests. SGLang keeps a radix tree of the
text routed to each worker; a reference set matches whole or not at all, so a set per worker is
that tree here.
"""

from __future__ import annotations

from typing import ClassVar

from kleinfarm.shared.routing.policy import PendingJob, PerJobPolicy, WorkerState

MATCH_THRESHOLD = 0.3
BALANCE_ABS = 64
BALANCE_REL = 1.5


class CacheAwarePolicy(PerJobPolicy):
    name: ClassVar[str] = "sglang_cache_aware"

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}  # identity -> routes sent to it (SGLang's tree)

    def choose(self, job: PendingJob, candidates: list[WorkerState]) -> WorkerState:
        loads = [worker.queued_jobs for worker in candidates]
        shortest = min(range(len(candidates)), key=loads.__getitem__)
        high, low = max(loads), min(loads)
        if high - low > BALANCE_ABS and high > BALANCE_REL * low:
            return candidates[shortest]
        if job.route is not None:
            matches = [
                index for index, worker in enumerate(candidates) if job.route in self._seen.get(worker.identity, ())
            ]
            match_rate = 1.0 if matches else 0.0  # a reference set matches whole or not at all
            if match_rate > MATCH_THRESHOLD:
                return candidates[min(matches, key=loads.__getitem__)]
        return candidates[shortest]

    def placed(self, job: PendingJob, worker: WorkerState) -> None:
        if job.route is not None:
            self._seen.setdefault(worker.identity, set()).add(job.route)
