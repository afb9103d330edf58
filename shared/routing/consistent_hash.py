"""Consistent hashing with bounded loads (Mirrokni et al.; epsilon 0.25): a baseline.

A job without references goes to the least busy worker. A job of a reference set walks the hash
ring from the set's point and goes to the first worker whose jobs in flight stay within
``(1 + epsilon)`` times the mean. The ring holds every worker identity the policy has seen, so a
worker that is busy or gone is walked past, not removed: the other sets keep their places.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import ClassVar

from kleinfarm.shared.routing.policy import PendingJob, PerJobPolicy, WorkerState

EPSILON = 0.25
VNODES = 64


def ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class ConsistentHashPolicy(PerJobPolicy):
    name: ClassVar[str] = "bounded_consistent_hash"

    def __init__(self) -> None:
        self._identities: set[str] = set()
        self._ring: list[tuple[int, str]] = []  # (point, identity), by point
        self._points: list[int] = []

    def choose(self, job: PendingJob, candidates: list[WorkerState]) -> WorkerState:
        if job.route is None:
            return min(candidates, key=lambda worker: worker.queued_jobs)
        self._grow(candidates)
        by_identity = {worker.identity: worker for worker in candidates}
        cap = (1 + EPSILON) * (sum(worker.queued_jobs for worker in candidates) + 1) / len(candidates)
        # When even the least busy is over the cap (under one job each on average, the cap is below
        # one), the set's own point decides: the first candidate on the ring.
        under_cap = min(worker.queued_jobs for worker in candidates) + 1 <= cap
        start = bisect.bisect(self._points, ring_hash(job.route)) % len(self._ring)
        for step in range(len(self._ring)):
            worker = by_identity.get(self._ring[(start + step) % len(self._ring)][1])
            if worker is not None and (worker.queued_jobs + 1 <= cap or not under_cap):
                return worker
        raise AssertionError("every candidate is on the ring")

    def _grow(self, workers: list[WorkerState]) -> None:
        """Put workers not seen before on the ring, ``VNODES`` points each."""
        new = {worker.identity for worker in workers} - self._identities
        if not new:
            return
        self._identities |= new
        self._ring = sorted(
            (ring_hash(f"{identity}#{vnode}"), identity) for identity in self._identities for vnode in range(VNODES)
        )
        self._points = [point for point, _ in self._ring]
