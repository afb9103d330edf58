"""Late binding: pending jobs go to a worker only when it has room, chosen with what it holds now.

Every worker process runs a dispatcher thread; a Redis lock elects one leader at a time, so any
number may run and the farm keeps dispatching when the leader dies. Each worker holds at most
``worker_slots`` jobs (one running, one waiting), so no job waits behind a busy or dead worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any

from celery import Celery
from redis.exceptions import LockError, RedisError

from kleinfarm.shared.control import CampaignControl
from kleinfarm.shared.jobs import JobState
from kleinfarm.shared.registry import Registry, WorkerView, assigned_key
from kleinfarm.shared.routing import PendingIndex, PendingJob, WorkerState, assign_round
from kleinfarm.shared.state import PENDING, PREFIX, WAKE, FarmState, campaign_of, job_key
from kleinfarm.worker.celery_app import EDIT_TASK, GENERATE_TASK

log = logging.getLogger(__name__)
LOCK = f"{PREFIX}:dispatcher:lock"
WINDOW_JOBS = 2048  # how deep into the pending queue one dispatch round looks


class Dispatcher:
    """Moves jobs from the pending queue to workers' own Celery queues."""

    def __init__(self, app: Celery, state: FarmState, registry: Registry, tick_s: float) -> None:
        self.app = app
        self.state = state
        self.registry = registry
        self.tick_s = tick_s
        self.stopping = threading.Event()
        self.control = CampaignControl(state)
        self._lock = state.redis.lock(LOCK, timeout=max(3 * tick_s, 5.0))
        self._leading = False

    def run_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except RedisError:
                log.exception("dispatcher lost Redis; retrying")
                self._leading = False
                self.stopping.wait(self.tick_s)

    def stop(self) -> None:
        self.stopping.set()
        if self._leading:
            with contextlib.suppress(LockError):
                self._lock.release()

    def tick(self) -> None:
        """Lead if we can; reap lapsed workers; dispatch; then wait for the next wake-up."""
        if not self._lead():
            self.stopping.wait(self.tick_s)
            return
        for worker_id in self.registry.lapsed_workers():
            requeued = self.registry.retire(worker_id, reason=f"heartbeat of {worker_id} lapsed")
            log.warning("worker %s lapsed: %d job(s) requeued", worker_id, requeued)
        self.dispatch()
        # Block on the wake list, not a timer: submissions and finished jobs push to it.
        self.state.redis.blpop([WAKE], timeout=self.tick_s)
        self.state.redis.delete(WAKE)

    def _lead(self) -> bool:
        if self._leading:
            try:
                self._lock.reacquire()
                return True
            except LockError:
                self._leading = False
                return False
        if self._lock.acquire(blocking=False):
            self._leading = True
            self._republish_unclaimed()
        return self._leading

    def dispatch(self) -> int:
        """Fill every worker's free slots from the head of the pending queue; return jobs dispatched.

        The decisions are ``kleinfarm.shared.routing.assign_round``'s, on what every worker holds
        and has been handed right now: the same code the simulator runs.
        """
        views = {view.worker_id: view for view in self.registry.live_workers()}
        if not any(view.room for view in views.values()):
            return 0
        members: list[str] = self.state.redis.zrange(PENDING, 0, WINDOW_JOBS - 1)  # type: ignore[assignment]
        if not members:
            return 0
        pending_jobs = [
            PendingJob(member, info.route, info.work_s, info.build_s, info.priority)
            if info
            else PendingJob(member, None, 1.0, 0.0)  # no routing record: route it like a generate job
            for member, info in zip(members, self.state.routing(members), strict=True)
        ]
        pending = PendingIndex(pending_jobs)
        states = [self._worker_state(view) for view in views.values()]
        holders: dict[str, int] = {}
        for state in states:
            for route in state.holds:
                holders[route] = holders.get(route, 0) + 1
        blocked = self.control.blocked({campaign_of(job.member) for job in pending_jobs})
        dispatched = 0
        for decision in assign_round(pending, states, holders):
            view = views[decision.worker.worker_id]
            member = decision.job.member
            if view.identity in blocked.get(campaign_of(member), set()):
                continue  # kept off this campaign: the job stays pending for another worker
            attempt = self.state.assign(member, view.worker_id, assigned_key(view.worker_id), decision.cost_s)
            if attempt:
                self.publish(member, attempt, view)
                dispatched += 1
        return dispatched

    def _worker_state(self, view: WorkerView) -> WorkerState:
        """Holdings: what the worker reports cached, plus the sets of the jobs already handed to it."""
        handed = [info.route for info in self.state.routing(list(view.assigned)) if info and info.route]
        return WorkerState(view.worker_id, view.identity, view.queued_s, view.room, view.routes | set(handed))

    def publish(self, member: str, attempt: int, worker: WorkerView) -> None:
        """Send the job as a Celery task to the worker's queue, with arguments Flower can show."""
        record = self.state.job(member)
        spec: dict[str, Any] = json.loads(record["spec"])
        references = spec.get("references") or []
        self.app.send_task(
            EDIT_TASK if references else GENERATE_TASK,
            kwargs={
                "job": member,
                "attempt": attempt,
                "campaign": campaign_of(member),
                "prompt": spec["prompt"][:200],
                "size": f"{spec['width']}x{spec['height']}",
                "seed": spec.get("seed"),
                "references": len(references),
            },
            queue=worker.queue,
            task_id=f"{member.replace('/', '.')}.{attempt}",
        )

    def _republish_unclaimed(self) -> None:
        """A new leader re-sends what its predecessor assigned but may have died before sending.

        The attempt is bumped, so if the old message did arrive its claim fails and it is skipped.
        """
        for worker in self.registry.live_workers():
            for member in self.registry.assigned(worker.worker_id):
                attempt = self.state.redis.hget(job_key(member), "attempt")
                if attempt is None:
                    continue
                bumped = str(int(str(attempt)) + 1)
                outcome = self.state.transition(
                    member, JobState.ASSIGNED, [JobState.ASSIGNED], if_attempt=str(attempt), fields={"attempt": bumped}
                )
                if outcome.changed:
                    self.publish(member, int(bumped), worker)
