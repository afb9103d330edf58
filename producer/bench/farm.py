"""``kleinfarm bench farm``: a whole farm on one campaign, against the plain Celery farm a user would
otherwise build (``plainfarm.py``), on the same Redis, S3 server and devices.

The campaign: ``jobs`` jobs, one fifth generates, the rest edits over ``sets`` reference sets of 2
to 4 references, every prompt distinct, in a shuffled order (sets interleave, as campaigns do).
For each farm it prints images per hour (jobs over the wall time from the first job's start to the
last one's end), job latency p50/p95 (from submission), each worker's busy fraction (its seconds
inside the engine or pipeline over its wall time between its first and last job), K/V hits, and
kleinfarm's ratio over the plain farm. A job that failed or never ran is reported, never counted.
"""

from __future__ import annotations

import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.processes import Processes
from kleinfarm.producer.localfarm.services import RedisServer, S3Server, service_env, settings_of, tiny_model
from kleinfarm.shared.errors import FarmTimeoutError
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage

console = Console(stderr=True)
BUCKET = "bench-farm"
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class FarmPlan:
    jobs: int = 200
    sets: int = 8
    size: int = 256  # output side; 1024 with the full-size model on a card
    ref_px: int = 256
    devices: tuple[str, ...] = ("cpu", "cpu")  # one worker per device, in each farm
    model: str | None = None  # a local folder or Hub id; None: the tiny random model
    seed: int = 1
    deadline_s: float = 3600.0


@dataclass(frozen=True)
class JobTiming:
    worker: str
    started: float
    finished: float
    engine_s: float
    kv: str = "none"


def campaign_jobs(plan: FarmPlan, reference_sets: list[list[str]]) -> list[dict[str, Any]]:
    rng = random.Random(plan.seed)
    jobs = []
    for index in range(plan.jobs):
        job: dict[str, Any] = {"id": f"j{index:05d}", "prompt": f"product shot {index}, variant {rng.random():.6f}"}
        job.update(width=plan.size, height=plan.size, seed=rng.randrange(2**32))
        if index % 5:  # four in five are edits
            job["references"] = reference_sets[rng.randrange(len(reference_sets))]
        jobs.append(job)
    rng.shuffle(jobs)
    return jobs


def upload_reference_sets(storage: Storage, plan: FarmPlan) -> list[list[str]]:
    """``sets`` sets of 2 to 4 noise images of ``ref_px``, as keys in the bench bucket."""
    rng = np.random.default_rng(plan.seed)
    sets = []
    for set_index in range(plan.sets):
        keys = []
        for ref_index in range(2 + set_index % 3):
            pixels = (rng.random((plan.ref_px, plan.ref_px, 3)) * 255).astype("uint8")
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            key = f"refs/set{set_index}-{ref_index}.png"
            storage.client.put_object(Bucket=storage.bucket, Key=key, Body=buffer.getvalue())
            keys.append(key)
        sets.append(keys)
    return sets


def figures(name: str, timings: list[JobTiming], submitted: float, jobs: int) -> dict[str, Any]:
    """A farm's row; a job that did not succeed is counted as not rendered, never as an image."""
    row: dict[str, Any] = {"farm": name, "rendered": len(timings), "not_rendered": jobs - len(timings)}
    if not timings:
        return row
    first, last = min(t.started for t in timings), max(t.finished for t in timings)
    latencies = sorted(t.finished - submitted for t in timings)
    busy = {}
    for worker in sorted({t.worker for t in timings}):
        mine = [t for t in timings if t.worker == worker]
        span = max(t.finished for t in mine) - min(t.started for t in mine)
        busy[worker] = round(sum(t.engine_s for t in mine) / span, 3) if span > 0 else None
    row.update(
        images_per_hour=round(len(timings) * 3600 / (last - first), 1) if last > first else None,
        wall_s=round(last - first, 2),
        latency_p50_s=round(statistics.median(latencies), 2),
        latency_p95_s=round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        busy_fraction=busy,
        kv_hits=sum(t.kv in ("device", "host") for t in timings),
    )
    return row


def wait_until(ready: Callable[[], bool], what: str, processes: Processes, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        processes.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; logs in {processes.log_dir}")
        time.sleep(0.2)


def run_kleinfarm(plan: FarmPlan, env: dict[str, str], jobs: list[dict[str, Any]], log_dir: Path) -> dict[str, Any]:
    settings = settings_of(env)
    client = FarmClient(settings)
    processes = Processes(log_dir)
    try:
        for index, device in enumerate(plan.devices):
            gpu = ["--gpu", device.split(":")[1]] if device.startswith("cuda") else []
            processes.start(f"kleinfarm-{index}", [sys.executable, "-m", "kleinfarm.producer", "worker", *gpu], env)
        registry = Registry(client.state, settings.worker_lapse_s)
        wait_until(
            lambda: len(registry.live_workers()) == len(plan.devices), "kleinfarm's workers", processes, START_TIMEOUT_S
        )
        with_keys = [
            {**job, "references": [f"s3://{BUCKET}/{key}" for key in job.get("references", [])]} for job in jobs
        ]
        submitted = time.time()
        handle = client.submit(Campaign.from_raw("bench-farm", [_without_empty(job) for job in with_keys]))
        try:
            handle.wait(progress=True, timeout=plan.deadline_s)
        except FarmTimeoutError as error:  # what did render is still reported; the rest counts as not rendered
            console.print(f"[red]{error}[/red]")
        timings = [
            JobTiming(
                str(record.worker),
                record.started or 0.0,
                record.finished or 0.0,
                record.timings.get("total_s", 0.0) + record.timings.get("decode_s", 0.0),
                record.kv or "none",
            )
            for record in client.state.jobs(handle.id)
            if record.state == "succeeded" and record.timings
        ]
        return figures("kleinfarm", timings, submitted, len(jobs))
    finally:
        processes.stop()


def _without_empty(job: dict[str, Any]) -> dict[str, Any]:
    """A generate job names no references at all (an empty list is not a generate)."""
    return {key: value for key, value in job.items() if value != []}


def run_plain(plan: FarmPlan, env: dict[str, str], jobs: list[dict[str, Any]], log_dir: Path) -> dict[str, Any]:
    from kleinfarm.producer.bench import plainfarm

    run = f"{time.time_ns()}"
    processes = Processes(log_dir)
    app = plainfarm.app
    app.conf.broker_url = env["PLAIN_REDIS_URL"]
    try:
        for index, device in enumerate(plan.devices):
            command = [sys.executable, "-m", "celery", "-A", "kleinfarm.producer.bench.plainfarm", "worker"]
            command += ["--pool=solo", "-Q", plainfarm.QUEUE, "-n", f"plain{index}@%h", "--loglevel=WARNING"]
            processes.start(f"plain-{index}", command, {**env, "PLAIN_DEVICE": device, "PLAIN_RUN": run})
        wait_until(
            lambda: len(app.control.ping(timeout=1.0) or []) >= len(plan.devices),
            "the plain workers",
            processes,
            START_TIMEOUT_S,
        )
        submitted = time.time()
        for job in jobs:
            app.send_task(
                plainfarm.TASK, kwargs={"job": {**job, "references": job.get("references", [])}}, queue=plainfarm.QUEUE
            )
        results = FarmSettings(redis_url=env["PLAIN_REDIS_URL"])
        redis_client = FarmClient(results).state.redis
        try:
            wait_until(
                lambda: redis_client.hlen(f"plainbench:{run}") >= len(jobs),
                "the plain farm's jobs",
                processes,
                plan.deadline_s,
            )
        except RuntimeError as error:  # what did render is still reported; the rest counts as not rendered
            console.print(f"[red]{error}[/red]")
        rows = [json.loads(raw) for raw in redis_client.hvals(f"plainbench:{run}")]
        timings = [
            JobTiming(row["worker"], row["started"], row["finished"], row["engine_s"])
            for row in rows
            if "error" not in row
        ]
        return figures("plain celery + Flux2KleinKVPipeline", timings, submitted, len(jobs))
    finally:
        processes.stop()


def run(plan: FarmPlan, say: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Both farms on one campaign; prints a row per farm and the summary (JSON), returns the summary."""
    emit = say or (lambda row: print(json.dumps(row), flush=True))
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kleinfarm-bench-farm-")))
        redis_server = stack.enter_context(RedisServer())
        s3 = stack.enter_context(S3Server())
        model = plan.model or tiny_model(work)
        farm_env = {
            **service_env(redis_server, s3, BUCKET),
            "KLEINFARM_MODEL": model,
            "KLEINFARM_CACHE_DIR": str(work / "cache"),
            "KLEINFARM_REFERENCE_BUCKETS": BUCKET,
        }
        settings = settings_of(farm_env)
        storage = Storage.from_settings(settings)
        storage.ensure_bucket()
        jobs = campaign_jobs(plan, upload_reference_sets(storage, plan))
        console.print(f"campaign: {len(jobs)} jobs over {plan.sets} reference sets, {len(plan.devices)} device(s)")
        ours = run_kleinfarm(plan, farm_env, jobs, work)
        emit(ours)
        plain_env = {
            **service_env(redis_server, s3, BUCKET, prefix="PLAIN_"),
            "PLAIN_REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/1",  # a database of its own
            "PLAIN_MODEL": model,
        }
        theirs = run_plain(plan, plain_env, jobs, work)
        emit(theirs)
    summary: dict[str, Any] = {"jobs": plan.jobs, "devices": list(plan.devices), "size": plan.size}
    if ours.get("images_per_hour") and theirs.get("images_per_hour"):
        summary["kleinfarm_over_plain"] = round(ours["images_per_hour"] / theirs["images_per_hour"], 2)
    summary["all_rendered"] = ours["not_rendered"] == 0 and theirs["not_rendered"] == 0
    emit({"summary": summary})
    return summary
