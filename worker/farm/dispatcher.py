"""Late binding: pending jobs go to a worker only when it has room, chosen with what it holds now.

Routing is *decided* by a policy (``kleinfarm.shared.routing``, pure logic the simulator runs
too) and *applied* here. Every worker process runs a dispatcher thread; a Redis lock elects one
leader at a time, so any number may run and the farm keeps dispatching when the leader dies. Each
worker holds at most ``worker_slots`` jobs (one running, one waiting), so no job waits behind a
busy or dead worker.

The leader also keeps the farm from getting stuck: each tick it queues the jobs whose backoff is
over (``keys.DELAYED``), and every few ticks its reconciler (``reconciler.py``) gives back the jobs
the record gives to a worker that does not hold them. A round that raises anything is logged and
the next tick tries again: a dead dispatcher thread would stop the farm while heartbeats say all
is well.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from celery import Celery
from redis.exceptions import LockError, RedisError

from kleinfarm.shared import keys
from kleinfarm.shared.broker import EDIT_TASK, GENERATE_TASK
from kleinfarm.shared.capacity import JobShape
from kleinfarm.shared.control import CampaignControl
from kleinfarm.shared.registry import Registry, WorkerView
from kleinfarm.shared.routing import AffinityPolicy, PendingIndex, PendingJob, Policy, Round, WorkerState
from kleinfarm.shared.state import FarmState
from kleinfarm.shared.states import Move
from kleinfarm.worker.farm.reconciler import Reconciler, task_id
from kleinfarm.worker.farm.revisions import kept_off, pin_campaigns

log = logging.getLogger(__name__)
WINDOW_JOBS = 2048  # how deep into the pending queue one dispatch round looks
# A reconciler pass every this many ticks: two passes must be several heartbeats apart (the tick is
# the heartbeat period), so a job claimed a moment ago has been reported before it is judged.
RECONCILE_TICKS = 4
PROMPT_SHOWN_CHARS = 200
CREATED_KEPT = 10_000  # campaigns whose submit time the dispatcher remembers


class Dispatcher:
    """Moves jobs from the pending queue to workers' own Celery queues."""

    def __init__(
        self, app: Celery, state: FarmState, registry: Registry, tick_s: float, policy: Policy | None = None
    ) -> None:
        self.app = app
        self.state = state
        self.registry = registry
        self.tick_s = tick_s
        self.policy = policy or AffinityPolicy()
        self.stopping = threading.Event()
        self.control = CampaignControl(state)
        self.reconciler = Reconciler(state, registry, interval_s=RECONCILE_TICKS * tick_s)
        self._lock = state.redis.lock(keys.DISPATCHER_LOCK, timeout=max(3 * tick_s, 5.0))
        # What this leader last wrote as each campaign's "waiting" note ("" for none).
        self._waiting_said: dict[str, str] = {}
        self.models: dict[str, str] = {}  # the model each campaign of the last round is pinned to
        self._created: dict[str, float] = {}  # each campaign's submit time (fixed): read once
        self._leading = False

    def run_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except RedisError:
                log.exception("dispatcher lost Redis; retrying")
                self._leading = False
                self.reconciler.forget()
                self.stopping.wait(self.tick_s)
            except Exception:  # a dead dispatcher thread stops the farm while heartbeats say all is well
                log.exception("dispatch round failed; retrying")
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
            requeued = self.registry.retire(worker_id, reason=f"heartbeat of {worker_id} lapsed", cause="lapsed")
            log.warning("worker %s lapsed: %d job(s) requeued", worker_id, requeued)
        self.state.promote_ready()
        self.reconciler.maybe_run()
        self.dispatch()
        # Block on the wake list, not a timer: submissions and finished jobs push to it.
        self.state.redis.blpop([keys.WAKE], timeout=self.tick_s)
        self.state.redis.delete(keys.WAKE)

    def _lead(self) -> bool:
        if self._leading:
            try:
                self._lock.reacquire()
                return True
            except LockError:
                self._leading = False
                self.reconciler.forget()
                return False
        if self._lock.acquire(blocking=False):
            self._leading = True
            self._waiting_said.clear()  # another leader may have written notes since this one led
            self._reissue_unclaimed()
        return self._leading

    def dispatch(self) -> int:
        """Fill every worker's free slots from the head of the pending queue; return jobs dispatched."""
        views = {view.worker_id: view for view in self.registry.live_workers()}
        if not any(view.room for view in views.values()):
            return 0
        job_ids: list[str] = self.state.redis.zrange(keys.PENDING, 0, WINDOW_JOBS - 1)  # type: ignore[assignment]
        if not job_ids:
            self._write_notes(set(), {})  # nothing pends: no campaign waits
            return 0
        dispatched = 0
        round = self._round(job_ids, views)
        self._say_why_jobs_wait(round, views)
        for decision in self.policy.assign(round):
            view = views[decision.worker.worker_id]
            attempt = self.state.assign(decision.job.job_id, view.worker_id, decision.cost_s)
            if attempt:
                self._publish_or_give_back(decision.job.job_id, attempt, view)
                dispatched += 1
        return dispatched

    def _publish_or_give_back(self, job_id: str, attempt: int, worker: WorkerView) -> None:
        """Publish the job's task; if the broker refuses, the job goes back before the error ends the round."""
        try:
            self.publish(job_id, attempt, worker)
        except Exception:
            reason = "its task could not be sent"
            self.registry.give_back(job_id, worker.worker_id, reason, Move.RECOVER, attempt)
            raise

    def _say_why_jobs_wait(self, round: Round, views: dict[str, WorkerView]) -> None:
        """Mark each campaign in the window with the jobs no live worker's card can run, or clear it.

        Such a job stays pending (never failed, never handed to a card that would fail it) and runs
        once a worker that can run it joins."""
        capabilities = {view.report.engine.capability for view in views.values() if not view.report.draining}
        live_models = {view.report.model for view in views.values() if not view.report.draining}
        runnable: dict[JobShape, bool] = {}
        waiting: dict[str, str] = {}
        campaigns: set[str] = set()
        for job in round.pending.jobs():
            if job.campaign is None:
                continue
            campaigns.add(job.campaign)
            model = self.models.get(job.campaign)
            if model is not None and model not in live_models:
                waiting[job.campaign] = f"waiting: no live worker runs {model}, the model it is pinned to"
            if job.shape is None or job.campaign in waiting:
                continue
            if job.shape not in runnable:
                runnable[job.shape] = any(cap is None or cap.fits(job.shape) for cap in capabilities)
            if not runnable[job.shape]:
                waiting[job.campaign] = f"waiting: no live worker can run {job.shape.describe()}"
        self._write_notes(campaigns, waiting)

    def _write_notes(self, campaigns: set[str], waiting: dict[str, str]) -> None:
        """Write the notes that changed; a campaign noted earlier and gone from the window (or a
        queue now empty) has nothing waiting any more, so its note is cleared."""
        pipe = self.state.redis.pipeline(transaction=False)
        written: dict[str, str] = {}
        for campaign in campaigns | {name for name, note in self._waiting_said.items() if note}:
            note = waiting.get(campaign, "")
            if self._waiting_said.get(campaign) == note:
                continue  # written already: only changes go to Redis
            if note:
                pipe.hset(keys.campaign(campaign), "waiting", note)
            else:
                pipe.hdel(keys.campaign(campaign), "waiting")
            written[campaign] = note
        pipe.execute()  # remembered only once written: a failed write is tried again next round
        said = {**self._waiting_said, **written}
        self._waiting_said = {name: note for name, note in said.items() if note or name in campaigns}

    def _round(self, job_ids: list[str], views: dict[str, WorkerView]) -> Round:
        """The policy's whole input: the queue's head, the workers, who holds what, who is kept off what,
        and the clock and submitted-jobs count its catch-up rule goes by."""
        now_s, submitted = self.state.server_time_and_submitted()
        created = self._submit_times({keys.campaign_of(job_id) for job_id in job_ids})
        pending_jobs = []
        for job_id, info in zip(job_ids, self.state.routing(job_ids), strict=True):
            campaign = keys.campaign_of(job_id)
            # A campaign is one submission; without a routing record, a job counts like a generate.
            route, work_s, build_s, priority = (
                (info.route, info.work_s, info.build_s, info.priority) if info else (None, 1.0, 0.0, 0)
            )
            pending_jobs.append(
                PendingJob(
                    job_id,
                    route,
                    work_s,
                    build_s,
                    priority,
                    campaign,
                    shape=info.shape if info else None,
                    submission=campaign,
                    submitted_s=created.get(campaign),
                )
            )
        workers = [self._worker_state(view) for view in views.values()]
        holders: dict[str, int] = {}
        for view, worker in zip(views.values(), workers, strict=True):
            if view.report.draining:
                continue  # it takes nothing more: a set only it holds is built by another worker
            for route in worker.holds:
                holders[route] = holders.get(route, 0) + 1
        campaigns = {job.campaign for job in pending_jobs if job.campaign}
        exclusions = dict(self.control.exclusions(campaigns))
        self.models = pin_campaigns(self.state.redis, campaigns, views.values())
        for campaign, identities in kept_off(self.models, views.values()).items():
            exclusions[campaign] = exclusions.get(campaign, frozenset()) | identities
        return Round(
            PendingIndex(pending_jobs), workers, holders, exclusions=exclusions, now_s=now_s, submitted_jobs=submitted
        )

    def _submit_times(self, campaigns: set[str]) -> dict[str, float]:
        """Each campaign's submit time, read once (it never changes); unknown ones are left out."""
        unread = sorted(campaigns - self._created.keys())
        if unread:
            pipe = self.state.redis.pipeline(transaction=False)
            for campaign in unread:
                pipe.hget(keys.campaign(campaign), "created")
            for campaign, created in zip(unread, pipe.execute(), strict=True):
                if created is not None:
                    self._created[campaign] = float(created)
        if len(self._created) > CREATED_KEPT:
            self._created = {campaign: self._created[campaign] for campaign in campaigns if campaign in self._created}
        return self._created

    def _worker_state(self, view: WorkerView) -> WorkerState:
        """Holdings: what the worker reports cached, plus the sets of the jobs already handed to it."""
        handed = [info.route for info in self.state.routing(list(view.assigned)) if info and info.route]
        holds = view.routes | set(handed)
        capability = view.report.engine.capability
        return WorkerState(view.worker_id, view.identity, view.queued_s, view.room, holds, capability=capability)

    def publish(self, job_id: str, attempt: int, worker: WorkerView) -> None:
        """Send the job as a Celery task to the worker's queue, with arguments Flower can show."""
        record = self.state.job(job_id)
        spec = record.spec
        self.app.send_task(
            EDIT_TASK if record.references else GENERATE_TASK,
            kwargs={
                "job": job_id,
                "attempt": attempt,
                "campaign": record.campaign_id,
                "prompt": str(spec["prompt"])[:PROMPT_SHOWN_CHARS],
                "size": f"{spec['width']}x{spec['height']}",
                "seed": spec.get("seed"),
                "references": len(record.references),
            },
            queue=worker.queue,
            task_id=task_id(job_id, attempt),
        )

    def _reissue_unclaimed(self) -> None:
        """A new leader re-sends what its predecessor assigned but may have died before sending.

        The attempt is bumped, so if the old message did arrive its claim fails and it is skipped.
        """
        for worker in self.registry.live_workers():
            for job_id in self.registry.assigned(worker.worker_id):
                attempt = self.state.redis.hget(keys.job(job_id), "attempt")
                if attempt is None:
                    continue
                bumped = self.state.reissue(job_id, int(str(attempt)))
                if bumped:
                    self.publish(job_id, bumped, worker)
