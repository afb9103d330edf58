"""Faults on the real farm (redis-server, S3 server, worker processes): whose fault a failure is,
transient faults retried with backoff, nothing left stuck, and ``kleinfarm local`` keeping on.

The fault farm is a farm of its own (another Redis database, one worker) whose S3 endpoint is a
proxy the tests can cut, so an outage is real: connections reset, new ones refused.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from kleinfarm.producer.bench.proxy import CuttableProxy
from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import RedisServer, S3Server
from kleinfarm.shared import keys
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.states import JobState, Move
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool, settings_from

WAIT_S = 300
FAULT_DATABASE = 5  # the session's workers serve database 0, the scratch farm 7
LOCAL_FARM_DATABASE = 6
BACKOFF_S = 1.0
TRANSIENT_RETRIES = 2  # each try of an unreachable S3 takes botocore several seconds of its own retries


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def database_url(redis_server: RedisServer, database: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{database}"


@dataclass
class FaultFarm:
    client: FarmClient
    proxy: CuttableProxy
    pool: WorkerPool


@pytest.fixture(scope="module")
def fault_farm(
    farm_env: dict[str, str],
    redis_server: RedisServer,
    s3_server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FaultFarm]:
    with CuttableProxy(("127.0.0.1", s3_server.port)) as proxy:
        env = {
            **farm_env,
            "KLEINFARM_REDIS_URL": database_url(redis_server, FAULT_DATABASE),
            "KLEINFARM_S3_ENDPOINT_URL": proxy.url,
            "KLEINFARM_TRANSIENT_BACKOFF_S": str(BACKOFF_S),
            "KLEINFARM_TRANSIENT_RETRIES": str(TRANSIENT_RETRIES),
        }
        client = FarmClient(settings_from(env))
        client.state.redis.flushdb()
        pool = WorkerPool(env, tmp_path_factory.mktemp("fault-worker-logs"))
        try:
            pool.start(1)
            yield FaultFarm(client, proxy, pool)
        finally:
            pool.stop()
            client.state.redis.flushdb()


def blamed(client: FarmClient, campaign_id: str) -> tuple[dict[str, str], set[str]]:
    redis = client.state.redis
    failures: dict[str, str] = redis.hgetall(keys.campaign_worker_failures(campaign_id))  # type: ignore[assignment]
    return failures, set(redis.smembers(keys.campaign_blocked(campaign_id)))  # type: ignore[arg-type]


def test_a_multi_line_prompt_renders_and_blames_no_worker(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    prompt = "a mug on marble,\nsoft light\n\twarm tones — no glare\r\n"  # YAML `prompt: |` keeps the line breaks
    handle = client.submit(Campaign.from_raw("multi-line", [{"prompt": prompt, "width": 256, "height": 256}]))
    status = handle.wait(progress=False, timeout=WAIT_S)
    assert (status.succeeded, status.failed) == (1, 0), handle.results()
    assert blamed(client, handle.id) == ({}, set())
    key = str(handle.results()[0]["key"])
    assert storage.metadata(key)["prompt"] == "a mug on marble, soft light warm tones ? no glare"
    image = Image.open(io.BytesIO(storage.get(key)))
    assert json.loads(image.info["kleinfarm"])["prompt"] == prompt  # the PNG keeps the prompt as written


def test_a_storage_outage_is_retried_with_backoff_and_blames_nobody(fault_farm: FaultFarm, storage: Storage) -> None:
    client, redis = fault_farm.client, fault_farm.client.state.redis
    fault_farm.proxy.cut()
    try:
        handle = client.submit(Campaign.from_raw("outage", [{"prompt": "p", "width": 256, "height": 256}]))
        (job_id,) = client.state.job_ids(handle.id)
        wait_for(lambda: redis.zscore(keys.DELAYED, job_id) is not None, "the job to back off")
        fields: dict[str, str] = redis.hgetall(keys.job(job_id))  # type: ignore[assignment]
        assert fields["state"] == JobState.PENDING and int(fields["transient_failures"]) >= 1
        assert "S3" in fields["transient_error"] and not fields.get("error")
        backoff_ends = redis.zscore(keys.DELAYED, job_id)
        assert backoff_ends is not None and backoff_ends > client.state.server_time() - 1
        assert handle.status().failed == 0
    finally:
        fault_farm.proxy.restore()
    status = handle.wait(progress=False, timeout=WAIT_S)
    assert (status.succeeded, status.failed) == (1, 0)
    record = client.state.job(job_id)
    assert record.attempt >= 2 and record.error is None
    assert blamed(client, handle.id) == ({}, set())
    assert record.key is not None and storage.metadata(record.key)["job"] == job_id


def test_transient_faults_past_the_limit_fail_the_job_with_the_last_message(fault_farm: FaultFarm) -> None:
    client, retries = fault_farm.client, TRANSIENT_RETRIES
    fault_farm.proxy.cut()
    try:
        handle = client.submit(Campaign.from_raw("long-outage", [{"prompt": "p", "width": 256, "height": 256}]))
        wait_for(lambda: handle.status().finished, "the job to end", timeout=WAIT_S)
    finally:
        fault_farm.proxy.restore()
    status = handle.wait(progress=False, timeout=WAIT_S)  # its manifest could not be written before
    assert (status.succeeded, status.failed) == (0, 1)
    record = client.state.job(client.state.job_ids(handle.id)[0])
    assert record.error is not None and record.error.startswith(f"gave up after {retries + 1} transient failures")
    assert "S3" in record.error
    assert record.attempt == retries + 1
    assert blamed(client, handle.id) == ({}, set())


def test_a_job_left_running_with_no_live_holder_is_given_back_and_completes(fault_farm: FaultFarm) -> None:
    client, state = fault_farm.client, fault_farm.client.state
    # Hold the dispatcher's lock while the stuck job is made, so the farm cannot take it first.
    state.redis.set(keys.DISPATCHER_LOCK, "held-by-the-test", ex=60)
    time.sleep(2.0)  # a round under way when the lock was taken ends
    handle = client.submit(Campaign.from_raw("stuck", [{"prompt": "p", "width": 256, "height": 256}]))
    (job_id,) = state.job_ids(handle.id)
    # A worker claimed it and was gone before its end was recorded: the record outlived the truth.
    assert state.assign(job_id, "gone-worker", 1.0) == 1
    assert state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="gone-worker").changed
    state.redis.delete(keys.DISPATCHER_LOCK)

    status = handle.wait(progress=False, timeout=90)
    assert (status.succeeded, status.failed) == (1, 0)
    record = state.job(job_id)
    assert record.attempt == 2 and record.worker != "gone-worker"
    assert state.redis.hget(keys.job(job_id), "lost") == "1"
    assert state.active_job_ids() == []


def test_kleinfarm_local_restarts_a_worker_that_dies_and_says_so(
    farm_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {**os.environ, **farm_env, "KLEINFARM_REDIS_URL": database_url(redis_server, LOCAL_FARM_DATABASE)}
    settings = settings_from({key: value for key, value in env.items() if key.startswith("KLEINFARM_")})
    registry = Registry(FarmClient(settings).state, lapse_s=3)
    registry.redis.flushdb()
    output = tmp_path / "local.log"
    with output.open("wb") as sink:
        farm = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kleinfarm.producer",
                "local",
                "--workers",
                "1",
                "--env-file",
                str(tmp_path / "env"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "farm ready" in output.read_text(), "the local farm to start")
        (first,) = registry.live_workers()
        os.kill(first.report.pid, signal.SIGKILL)
        wait_for(lambda: "restarted it as pid" in output.read_text(), "the farm to restart the worker", timeout=30)
        said = output.read_text()
        assert f"exited ({-signal.SIGKILL})" in said
        restarted = re.search(r"restarted it as pid\s+(\d+)", said)
        assert restarted is not None
        new_pid = int(restarted.group(1))
        wait_for(lambda: new_pid in {view.report.pid for view in registry.live_workers()}, "the new worker to join")
        assert farm.poll() is None  # the farm went on
    finally:
        farm.send_signal(signal.SIGTERM)
        assert farm.wait(timeout=60) == 0, output.read_text()
        registry.redis.flushdb()


def test_failures_are_classified_by_whose_fault_they_are() -> None:
    from botocore.exceptions import EndpointConnectionError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from kleinfarm.shared.errors import ReferenceNotFoundError, StorageError, StorageUnavailableError
    from kleinfarm.worker.jobrunner import Fault, classify

    def caused(error: Exception, cause: BaseException) -> Exception:
        error.__cause__ = cause
        return error

    unreachable = EndpointConnectionError(endpoint_url="http://s3")
    assert classify(ReferenceNotFoundError("s3://b/k does not exist")) == Fault.JOB
    assert classify(StorageError("403 AccessDenied")) == Fault.JOB
    assert classify(StorageUnavailableError("S3 throttled")) == Fault.TRANSIENT
    assert classify(RedisConnectionError("Redis unreachable")) == Fault.TRANSIENT
    assert classify(unreachable) == Fault.TRANSIENT
    assert classify(caused(StorageError("writing"), unreachable)) == Fault.TRANSIENT
    assert classify(ValueError("a bug")) == Fault.WORKER


def test_a_worker_killed_after_rendering_and_before_storing_leaves_its_job_rendered_again_and_stored_once(
    fault_farm: FaultFarm, storage: Storage
) -> None:
    client, state = fault_farm.client, fault_farm.client.state
    (worker,) = fault_farm.pool.alive()
    fault_farm.proxy.cut()  # the finisher's upload hangs on a dead S3 while the card moves on
    try:
        handle = client.submit(Campaign.from_raw("killed-storing", [{"prompt": "p", "width": 256, "height": 256}]))
        (job_id,) = state.job_ids(handle.id)
        wait_for(lambda: state.job(job_id).progress == "4/4", "the render to end")
        assert state.job(job_id).state == JobState.RUNNING  # rendered, not yet stored
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        fault_farm.proxy.restore()
    fault_farm.pool.start(1)
    status = handle.wait(progress=False, timeout=WAIT_S)
    assert (status.succeeded, status.failed) == (1, 0)
    record = state.job(job_id)
    assert record.attempt >= 2 and state.redis.hget(keys.job(job_id), "lost") == "1"
    assert record.key is not None and storage.metadata(record.key)["job"] == job_id
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"kleinfarm/{handle.id}/")
    assert [item["Key"] for item in listed["Contents"] if not item["Key"].endswith(".jsonl")] == [record.key]
