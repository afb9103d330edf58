"""One job, start to end: claim, fetch references, render, store once, record the outcome.

How an attempt that raises ends depends on whose fault it is (``docs/architecture.md``, "Failures:
whose fault"): the job's (bad input) fails it at once; a transient fault (storage, network, Redis)
sends it back to the queue after a delay that grows with each one, blaming nobody; anything else
fails it and counts against this worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import botocore.exceptions
import redis.exceptions
from pydantic import TypeAdapter

from kleinfarm.shared import keys
from kleinfarm.shared.control import CampaignControl
from kleinfarm.shared.errors import (
    JobCancelledError,
    JobNotFoundError,
    KleinfarmError,
    OutputConflictError,
    TransientError,
)
from kleinfarm.shared.jobs import EditJob, GenerateJob, Job
from kleinfarm.shared.locators import redact
from kleinfarm.shared.logs import log_context
from kleinfarm.shared.manifest import output_key, write_manifest
from kleinfarm.shared.records import JobRecord, RoutingInfo
from kleinfarm.shared.state import Claim
from kleinfarm.shared.states import JobState, Move
from kleinfarm.worker.context import WorkerContext
from kleinfarm.worker.encoding import CONTENT_TYPES, encode_image, header_value
from kleinfarm.worker.engine import ImageResult
from kleinfarm.worker.farm.holding import HELD
from kleinfarm.worker.farm.revisions import campaign_model

log = logging.getLogger(__name__)
JOB_ADAPTER: TypeAdapter[GenerateJob | EditJob] = TypeAdapter(Job)
EventSender = Callable[..., Any]
T = TypeVar("T")
ASCII_PROMPT_CHARS = 1000
ASCII_MODEL_CHARS = 200
# Library errors that mean a service was unreachable or timed out, not that the job is bad: the
# object store's (until storage.py turns them into StorageUnavailableError) and Redis's.
TRANSIENT_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
)
# The outcome of an attempt is written through a short Redis outage (a restart from AOF) rather
# than lost; past these waits the reconciler returns the job to the queue instead.
RECORD_RETRY_WAITS_S = (0.5, 1.0, 2.0, 4.0)
PINNED_MODELS_KEPT = 1024  # campaigns whose model pin a worker remembers


class Fault(StrEnum):
    """Whose fault an attempt's failure is."""

    NONE = "none"  # it succeeded, or its campaign was cancelled
    JOB = "job"  # bad input: fails at once, never retried, nobody blamed
    TRANSIENT = "transient"  # a service unreachable or throttled: retried after a backoff, nobody blamed
    WORKER = "worker"  # anything else: fails, and counts against this worker for the campaign


@dataclass
class Ending:
    """How an attempt ended: the state to record, its fields, and whose fault a failure was."""

    state: JobState
    fields: dict[str, str] = field(default_factory=dict)
    fault: Fault = Fault.NONE


def classify(error: BaseException) -> Fault:
    """Whose fault ``error`` is; a transient cause anywhere in its chain makes it transient."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (TransientError, *TRANSIENT_LIBRARY_ERRORS)):
            return Fault.TRANSIENT
        cause = cause.__cause__
    return Fault.JOB if isinstance(error, KleinfarmError) else Fault.WORKER


def run_job(context: WorkerContext, job_id: str, attempt: int, send_event: EventSender) -> str:
    """Run ``job_id`` if this delivery still holds its attempt; return the job's state after it."""
    if context.registry.is_draining(context.identity):
        # Drained after the dispatcher chose it: back to the queue (only if still this attempt with
        # this worker), for a worker that takes jobs; the one it is running goes on to its end.
        context.registry.give_back(job_id, context.worker_id, "worker draining", attempt=attempt)
        log.info("draining: gave %s back to the queue", job_id)
        return JobState.PENDING
    campaign_id = keys.campaign_of(job_id)
    if (model := _campaign_model(context, campaign_id)) != context.engine.model:
        # Handed out before its campaign was pinned to another revision: back, for a worker running it.
        context.registry.give_back(job_id, context.worker_id, f"its campaign runs {model}", attempt=attempt)
        log.info("%s runs on %s, not %s: given back", job_id, model, context.engine.model)
        return JobState.PENDING
    with log_context(campaign=campaign_id, job=job_id):
        state, worker, started = context.state, context.worker_id, time.time()
        claim = state.claim(job_id, attempt, worker, started)
        if not claim.outcome.changed:
            # A late redelivery of a job since done, requeued or cancelled: it is someone else's now,
            # and so are its slot and its hold (nothing is given back for it here).
            log.info("skipping %s attempt %s: it is %s", job_id, attempt, claim.outcome.previous or "unknown")
            return claim.outcome.previous
    HELD.add(job_id)  # held until recorded: by this thread, or by the finisher after a render
    handed_over = False
    try:
        with log_context(campaign=campaign_id, job=job_id):
            if context.metrics is not None:
                submitted = claim.campaign.get("created")
                context.metrics.job_started(started - float(submitted) if submitted else None)
            outcome = _execute(context, job_id, claim, send_event)
            if isinstance(outcome, Ending):
                return _end(context, job_id, attempt, outcome)
            context.finisher.hand_over(lambda: _store_and_end(context, job_id, attempt, outcome))
            handed_over = True
            return JobState.RUNNING  # rendered; its image is stored and its job recorded off this path
    finally:
        if not handed_over:
            _let_go(context, job_id)


def _campaign_model(context: WorkerContext, campaign_id: str) -> str:
    """The campaign's model revision, pinned to this worker's if it had none: read once per
    campaign, since a pin never changes."""
    model = context.pinned_models.get(campaign_id)
    if model is None:
        model = campaign_model(context.state.redis, campaign_id, context.engine.model)
        if len(context.pinned_models) >= PINNED_MODELS_KEPT:
            context.pinned_models.clear()
        context.pinned_models[campaign_id] = model
    return model


def _end(context: WorkerContext, job_id: str, attempt: int, ending: Ending) -> str:
    """Record how the attempt ended: back to the queue after a transient fault, else its final state."""
    if ending.fault == Fault.TRANSIENT:
        return _back_off(context, job_id, attempt, ending)
    return _finish(context, job_id, attempt, ending)


def _store_and_end(context: WorkerContext, job_id: str, attempt: int, rendered: Rendered) -> None:
    """The finisher's part: store the image, record the outcome, give the slot back."""
    try:
        with log_context(campaign=keys.campaign_of(job_id), job=job_id):
            try:
                ending = Ending(JobState.SUCCEEDED, _store(context, rendered))
            except Exception as error:  # noqa: BLE001 - classified (and logged) by _failure
                ending = _failure(job_id, error)
            _end(context, job_id, attempt, ending)
    finally:
        _let_go(context, job_id)


def _let_go(context: WorkerContext, job_id: str) -> None:
    """The job is recorded: it leaves the heartbeat's list and frees its slot."""
    HELD.remove(job_id)
    _persist(lambda: context.registry.release(context.worker_id, job_id))


@dataclass
class Rendered:
    """A job whose image is rendered and not yet stored."""

    record: JobRecord
    job: GenerateJob | EditJob
    result: ImageResult
    fields: dict[str, str]
    output_prefix: str  # the campaign's, read with the claim


def _execute(context: WorkerContext, job_id: str, claim: Claim, send_event: EventSender) -> Ending | Rendered:
    """Render the job; return its image, or how it ended and, for a failure, whose fault it was."""
    try:
        if reason := claim.cancel_reason:
            raise JobCancelledError(reason)
        if claim.record is None:
            raise JobNotFoundError(f"job {job_id!r} is not known to this farm")
        job = JOB_ADAPTER.validate_python(claim.record.spec)
        return _render(context, claim.record, job, claim, send_event)
    except JobCancelledError as error:
        return Ending(JobState.CANCELLED, {"error": str(error)})
    except Exception as error:  # noqa: BLE001 - one bad job must not take the worker down: _failure logs it
        return _failure(job_id, error)


def _failure(job_id: str, error: Exception) -> Ending:
    """How an attempt that raised ``error`` ends, and whose fault it is."""
    fault = classify(error)
    if fault == Fault.WORKER:
        log.exception("job %s failed unexpectedly", job_id)
        return Ending(JobState.FAILED, {"error": f"internal error: {type(error).__name__}: {error}"}, fault)
    text = str(error) if isinstance(error, KleinfarmError) else f"{type(error).__name__}: {error}"
    return Ending(JobState.FAILED, {"error": text}, fault)


def _render(
    context: WorkerContext, record: JobRecord, job: GenerateJob | EditJob, claim: Claim, send_event: EventSender
) -> Rendered:
    """Fetch the references, render, and measure the card's speed (``claim``: the routing row and
    the campaign's output prefix, read with the claim)."""
    job_id = record.job_id
    context.engine.prompts.start(job.prompt)  # its own prompt first, encoded while references arrive
    fetch_started = time.perf_counter()
    references = context.fetcher.fetch_set(getattr(job, "references", []), context.engine.holds)
    fetch_s = time.perf_counter() - fetch_started

    _encode_ahead(context, job_id)

    def on_step(done: int, total: int) -> None:
        if done == 1:  # a job handed over since this one started waits in the slot behind it
            _encode_ahead(context, job_id)
        reason = context.state.step_done(job_id, done, total)  # progress and the cancel check together
        send_event("task-progress", job=job_id, step=done, total=total)
        if done < total and reason:
            raise JobCancelledError(f"{reason} (stopped at step {done} of {total})")

    result = context.engine.render(job, [(ref.digest, ref.image) for ref in references], on_step)
    _measure_speed(context, claim.routing, result)
    fields = {"refset": result.refset, "kv": result.kv} if result.refset else {}
    fields["prompt"] = result.prompt
    fields["refs_decoded"] = str(sum(ref.decoded for ref in references))
    if result.refset and record.route:
        context.routes[record.route] = result.refset
    result.timings["fetch_s"] = round(fetch_s, 4)
    return Rendered(record, job, result, fields, claim.campaign.get("output_prefix", ""))


def _store(context: WorkerContext, rendered: Rendered) -> dict[str, str]:
    """Encode and upload the image (once: a retry finds its own earlier write); the job's fields."""
    record, job, result, job_id = rendered.record, rendered.job, rendered.result, rendered.record.job_id
    key = output_key(rendered.output_prefix, record.campaign_id, record.local_id, job.format)
    upload_started = time.perf_counter()
    wrote = context.storage.put_if_absent(key, *_encoded(context, job_id, job, result))
    result.timings["upload_s"] = round(time.perf_counter() - upload_started, 4)
    if not wrote:
        _check_own_earlier_write(context, key, job_id)
    return {**rendered.fields, "key": key, "timings": json.dumps(result.timings)}


def _encode_ahead(context: WorkerContext, job_id: str) -> None:
    """Start encoding the prompts of the other jobs handed to this worker, while this one renders."""
    try:
        waiting = [other for other in context.registry.assigned(context.worker_id) if other != job_id]
        prompts = [str(context.state.job(other).spec.get("prompt", "")) for other in waiting]
    except (redis.exceptions.RedisError, KleinfarmError) as error:  # an optimisation: never fail a job for it
        log.warning("no look-ahead for %s: %s", job_id, error)
        return
    if started := context.engine.encode_ahead([prompt for prompt in prompts if prompt]):
        log.info("encoding %d prompt(s) ahead of their jobs", started)


def _measure_speed(context: WorkerContext, info: RoutingInfo | None, result: ImageResult) -> None:
    """The card's speed: the cost model's seconds for this job (its routing row, read with the
    claim) over the seconds it took."""
    if info is None:
        return
    estimated = info.work_s + (info.build_s if result.kv == "miss" else 0.0)
    context.speed.observe(estimated, result.timings.get("total_s", 0.0) + result.timings.get("decode_s", 0.0))


def _check_own_earlier_write(context: WorkerContext, key: str, job_id: str) -> None:
    """An object already at the key counts as this job's image only if this job wrote it."""
    if context.storage.metadata(key).get("job") != job_id:
        raise OutputConflictError(
            f"{key} already exists and was not written by this job: it is not recorded as this job's image"
        )
    log.info("%s already in storage: an earlier attempt wrote it; not writing it twice", key)


def _encoded(
    context: WorkerContext, job_id: str, job: GenerateJob | EditJob, result: ImageResult
) -> tuple[bytes, str, dict[str, str]]:
    """The image in the job's format carrying the full record; S3 metadata carries an ASCII subset."""
    record = {
        "job": job_id,
        "prompt": job.prompt,
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "steps": job.steps,
        "format": job.format,
        "model": context.engine.model,
        "references": [redact(url) for url in getattr(job, "references", [])],
        "refset": result.refset,
        "kv": result.kv,
        "timings": result.timings,
    }
    data = encode_image(result.image, job.format, job.quality, record)
    ascii_meta = {
        "job": job_id,
        "seed": str(job.seed),
        "size": f"{job.width}x{job.height}",
        "model": context.engine.model[:ASCII_MODEL_CHARS],
        "refset": result.refset or "",
        "prompt": job.prompt[:ASCII_PROMPT_CHARS],
        "render-s": str(result.timings.get("render_s", "")),
    }
    return data, CONTENT_TYPES[job.format], {name: header_value(value) for name, value in ascii_meta.items()}


def _back_off(context: WorkerContext, job_id: str, attempt: int, ending: Ending) -> str:
    """Send the job back to the queue after a delay that grows with each transient fault; fail it
    with the last message once it has met ``transient_retries`` of them."""
    settings, message = context.settings, ending.fields["error"]
    failures = int(_persist(lambda: context.state.redis.hget(keys.job(job_id), "transient_failures")) or 0) + 1
    if failures > settings.transient_retries:
        gave_up = f"gave up after {failures} transient failures; the last: {message}"
        return _finish(context, job_id, attempt, Ending(JobState.FAILED, {"error": gave_up}, Fault.TRANSIENT))
    delay_s = min(settings.transient_backoff_s * 2 ** (failures - 1), settings.transient_backoff_max_s)
    fields = {"transient_failures": str(failures), "transient_error": message}
    outcome = _persist(
        lambda: context.state.move(
            job_id,
            Move.BACKOFF,
            JobState.PENDING,
            if_attempt=attempt,
            if_worker=context.worker_id,
            fields=fields,
            delay_s=delay_s,
        )
    )
    if not outcome.changed:
        log.warning("%s was taken from this worker while it ran (now %s)", job_id, outcome.previous)
        return outcome.previous
    log.warning("%s: transient fault %d, queued again in %.1f s: %s", job_id, failures, delay_s, message)
    return str(JobState.PENDING)


def _finish(context: WorkerContext, job_id: str, attempt: int, ending: Ending) -> str:
    final, fields = ending.state, {**ending.fields, "finished": str(time.time())}
    outcome = _persist(
        lambda: context.state.move(
            job_id, Move.FINISH, final, if_attempt=attempt, if_worker=context.worker_id, fields=fields
        )
    )
    if not outcome.changed:
        log.warning("%s was taken from this worker while it ran (now %s)", job_id, outcome.previous)
        return outcome.previous
    with context.counters_lock:
        context.counters[str(final)] = context.counters.get(str(final), 0) + 1
    if context.metrics is not None:
        context.metrics.job_ended(str(final), json.loads(fields.get("timings", "{}")).get("total_s"))
    campaign_id = keys.campaign_of(job_id)
    if final == JobState.FAILED:
        control = CampaignControl(context.state)
        if ending.fault == Fault.WORKER and control.record_worker_failure(campaign_id, context.identity):
            log.warning("%s keeps failing campaign %s: kept off it", context.identity, campaign_id)
        control.fail_if_over_limit(campaign_id)
    if outcome.closed_campaign:
        _write_manifest(context, campaign_id)
    log.info("%s %s%s", job_id, final, f": {fields['error']}" if "error" in fields else "")
    return str(final)


def _write_manifest(context: WorkerContext, campaign_id: str) -> None:
    """The job's outcome is recorded already: a manifest that cannot be written now is written by
    the client's ``wait()`` (an orphaned campaign) or a ``retry``, not a reason to fail the task."""
    try:
        write_manifest(context.state, context.storage, campaign_id)
    except Exception:  # the campaign is done either way; say why its manifest is missing
        log.exception("manifest of campaign %s not written", campaign_id)


def _persist(write: Callable[[], T]) -> T:
    """Run a Redis write, waiting out a short outage; a longer one raises (the reconciler then
    returns the job to the queue)."""
    for wait_s in RECORD_RETRY_WAITS_S:
        try:
            return write()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            log.warning("Redis unreachable (%s); retrying in %.1f s", error, wait_s)
            time.sleep(wait_s)
    return write()
