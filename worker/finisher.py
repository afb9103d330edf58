"""Storing a rendered job off the render path: the card starts the next job while this one is
encoded, uploaded and recorded.

At most one rendered job is in flight: handing over the next one waits until the previous one
is stored, so a worker never piles up finished images in memory. The job stays held (its
heartbeat reports it, its slot stays taken) until it is recorded; a worker that dies before then
is retired and its job rendered again, never lost, and never written twice (the upload is
conditional and an existing object counts only if this job wrote it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class Finisher:
    """One storing thread with room for one job."""

    def __init__(self) -> None:
        self._slot = threading.Semaphore(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finisher")

    def hand_over(self, store: Callable[[], None]) -> None:
        """Store in the background; waits while the previous job is still being stored."""
        self._slot.acquire()
        try:
            self._executor.submit(self._run, store)
        except BaseException:  # not submitted (the executor is shutting down): the slot is free again
            self._slot.release()
            raise

    def drain(self) -> None:
        """Wait until the job in flight, if any, is stored (before the worker stops)."""
        self._slot.acquire()
        self._slot.release()

    def _run(self, store: Callable[[], None]) -> None:
        try:
            store()
        except Exception:  # the store records its own outcome: anything left is logged, never lost silently
            log.exception("storing a rendered job failed")
        finally:
            self._slot.release()
