"""One job, start to end: claim, fetch references, render, store once, record the outcome."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from PIL import PngImagePlugin
from pydantic import TypeAdapter

from kleinfarm.shared import keys
from kleinfarm.shared.control import CampaignControl
from kleinfarm.shared.errors import JobCancelledError, KleinfarmError, OutputConflictError
from kleinfarm.shared.jobs import EditJob, GenerateJob, Job
from kleinfarm.shared.locators import redact
from kleinfarm.shared.manifest import output_key, write_manifest
from kleinfarm.shared.records import JobRecord
from kleinfarm.shared.states import JobState, Move
from kleinfarm.worker.context import WorkerContext
from kleinfarm.worker.engine import ImageResult

log = logging.getLogger(__name__)
JOB_ADAPTER: TypeAdapter[GenerateJob | EditJob] = TypeAdapter(Job)
EventSender = Callable[..., Any]
ASCII_PROMPT_CHARS = 1000
ASCII_MODEL_CHARS = 200


def run_job(context: WorkerContext, job_id: str, attempt: int, send_event: EventSender) -> str:
    """Run ``job_id`` if this delivery still holds its attempt; return the job's final state."""
    state, worker, started = context.state, context.worker_id, time.time()
    claim = state.move(
        job_id, Move.CLAIM, JobState.RUNNING, if_attempt=attempt, if_worker=worker, fields={"started": str(started)}
    )
    if not claim.changed:
        # A late redelivery of a job since done, requeued or cancelled: it is someone else's now.
        log.info("skipping %s attempt %s: it is %s", job_id, attempt, claim.previous or "unknown")
        return claim.previous
    if context.metrics is not None:
        submitted = state.redis.hget(keys.campaign(keys.campaign_of(job_id)), "created")
        context.metrics.job_started(started - float(str(submitted)) if submitted else None)
    try:
        final, fields, worker_fault = _execute(context, job_id, send_event)
        return _finish(context, job_id, attempt, final, fields, worker_fault)
    finally:
        context.registry.release(worker, job_id)


def _execute(context: WorkerContext, job_id: str, send_event: EventSender) -> tuple[JobState, dict[str, str], bool]:
    """Run the job; return its final state, the fields to record, and whether the worker is at fault."""
    try:
        if reason := context.state.cancel_reason(keys.campaign_of(job_id)):
            raise JobCancelledError(reason)
        record = context.state.job(job_id)
        job = JOB_ADAPTER.validate_python(record.spec)
        fields = _render_and_store(context, record, job, send_event)
        return JobState.SUCCEEDED, fields, False
    except JobCancelledError as error:
        return JobState.CANCELLED, {"error": str(error)}, False
    except KleinfarmError as error:
        return JobState.FAILED, {"error": str(error)}, False
    except Exception as error:  # one bad job must not take the worker down; the worker may be at fault
        log.exception("job %s failed unexpectedly", job_id)
        return JobState.FAILED, {"error": f"internal error: {type(error).__name__}: {error}"}, True


def _render_and_store(
    context: WorkerContext, record: JobRecord, job: GenerateJob | EditJob, send_event: EventSender
) -> dict[str, str]:
    job_id, campaign_id = record.job_id, record.campaign_id
    fetch_started = time.perf_counter()
    references = [context.fetcher.fetch(url) for url in getattr(job, "references", [])]
    fetch_s = time.perf_counter() - fetch_started

    def on_step(done: int, total: int) -> None:
        context.state.set_progress(job_id, done, total)
        send_event("task-progress", job=job_id, step=done, total=total)
        if done < total and (reason := context.state.cancel_reason(campaign_id)):
            raise JobCancelledError(f"{reason} (stopped at step {done} of {total})")

    result = context.engine.render(job, [(ref.digest, ref.image) for ref in references], on_step)
    fields = {"refset": result.refset, "kv": result.kv} if result.refset else {}
    if result.refset and record.route:
        context.routes[record.route] = result.refset
    result.timings["fetch_s"] = round(fetch_s, 4)
    meta = context.state.campaign_meta(campaign_id)
    key = output_key(meta["output_prefix"], campaign_id, record.local_id)
    upload_started = time.perf_counter()
    wrote = context.storage.put_if_absent(key, *_png(context, job_id, job, result))
    result.timings["upload_s"] = round(time.perf_counter() - upload_started, 4)
    if not wrote:
        _check_own_earlier_write(context, key, job_id)
    return {**fields, "key": key, "timings": json.dumps(result.timings)}


def _check_own_earlier_write(context: WorkerContext, key: str, job_id: str) -> None:
    """An object already at the key counts as this job's image only if this job wrote it."""
    if context.storage.metadata(key).get("job") != job_id:
        raise OutputConflictError(
            f"{key} already exists and was not written by this job: it is not recorded as this job's image"
        )
    log.info("%s already in storage: an earlier attempt wrote it; not writing it twice", key)


def _png(
    context: WorkerContext, job_id: str, job: GenerateJob | EditJob, result: ImageResult
) -> tuple[bytes, str, dict[str, str]]:
    """PNG bytes carrying the full record; S3 metadata carries an ASCII subset."""
    record = {
        "job": job_id,
        "prompt": job.prompt,
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "steps": job.steps,
        "model": context.engine.model,
        "references": [redact(url) for url in getattr(job, "references", [])],
        "refset": result.refset,
        "kv": result.kv,
        "timings": result.timings,
    }
    info = PngImagePlugin.PngInfo()
    info.add_itxt("kleinfarm", json.dumps(record))
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=info)
    ascii_meta = {
        "job": job_id,
        "seed": str(job.seed),
        "size": f"{job.width}x{job.height}",
        "model": _ascii(context.engine.model, ASCII_MODEL_CHARS),
        "refset": result.refset or "",
        "prompt": _ascii(job.prompt, ASCII_PROMPT_CHARS),
        "render-s": str(result.timings.get("render_s", "")),
    }
    return buffer.getvalue(), "image/png", ascii_meta


def _ascii(text: str, limit: int) -> str:
    return text.encode("ascii", "replace").decode()[:limit]


def _finish(
    context: WorkerContext, job_id: str, attempt: int, final: JobState, fields: dict[str, str], worker_fault: bool
) -> str:
    fields["finished"] = str(time.time())
    outcome = context.state.move(
        job_id, Move.FINISH, final, if_attempt=attempt, if_worker=context.worker_id, fields=fields
    )
    if not outcome.changed:
        log.warning("%s was taken from this worker while it ran (now %s)", job_id, outcome.previous)
        return outcome.previous
    context.counters[str(final)] = context.counters.get(str(final), 0) + 1
    if context.metrics is not None:
        context.metrics.job_ended(str(final), json.loads(fields.get("timings", "{}")).get("total_s"))
    campaign_id = keys.campaign_of(job_id)
    if final == JobState.FAILED:
        control = CampaignControl(context.state)
        if worker_fault and control.record_worker_failure(campaign_id, context.identity):
            log.warning("%s keeps failing campaign %s: kept off it", context.identity, campaign_id)
        control.fail_if_over_limit(campaign_id)
    if outcome.closed_campaign:
        write_manifest(context.state, context.storage, campaign_id)
    log.info("%s %s%s", job_id, final, f": {fields['error']}" if "error" in fields else "")
    return str(final)
