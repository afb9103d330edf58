"""The dispatcher applies the routing policy against real Redis and a real Celery broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from pydantic import SecretStr

from kleinfarm.producer.bench.proxy import CuttableProxy
from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import RedisServer, S3Server
from kleinfarm.shared import keys
from kleinfarm.shared.broker import make_celery
from kleinfarm.shared.control import BLOCKLIST_THRESHOLD, CampaignControl
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.records import WorkerReport
from kleinfarm.shared.registry import MAX_ATTEMPTS, Registry
from kleinfarm.shared.routing import POLICIES, policy_by_name
from kleinfarm.shared.states import JobState, Move
from kleinfarm.worker.farm.dispatcher import Dispatcher
from kleinfarm.worker.farm.reconciler import Reconciler


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def register(registry: Registry, worker_id: str, identity: str) -> None:
    """A worker as the registry sees it (no process: the test looks at what is dispatched to it)."""
    registry.heartbeat(worker_id, WorkerReport(identity=identity, queue=keys.worker_queue(worker_id), pid=1))


def test_a_blocked_campaign_at_the_head_of_the_queue_does_not_stop_another_in_the_same_round(
    scratch_farm: FarmClient,
) -> None:
    registry = Registry(scratch_farm.state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    blocked = scratch_farm.submit(Campaign.from_raw("urgent", [{"prompt": f"u{i}"} for i in range(4)], priority=5))
    other = scratch_farm.submit(Campaign.from_raw("routine", [{"prompt": "r"}]))
    control = CampaignControl(scratch_farm.state)
    for _ in range(BLOCKLIST_THRESHOLD):
        control.record_worker_failure(blocked.id, "host-gpu0")

    dispatcher = Dispatcher(make_celery(scratch_farm.settings), scratch_farm.state, registry, tick_s=1.0)
    assert dispatcher.dispatch() == 1

    (routine,) = scratch_farm.state.job_ids(other.id)
    record = scratch_farm.state.job(routine)
    assert (record.state, record.worker, record.attempt) == (JobState.ASSIGNED, "w1", 1)
    assert registry.assigned("w1") == [routine]
    assert scratch_farm.state.redis.llen(keys.worker_queue("w1")) == 1  # the Celery message, on the worker's own queue
    assert {job.state for job in scratch_farm.state.jobs(blocked.id)} == {JobState.PENDING}
    assert scratch_farm.state.redis.zcard(keys.PENDING) == 4


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_worker_with_room_gets_the_head_of_the_queue_and_a_full_one_nothing(
    scratch_farm: FarmClient, policy: str
) -> None:
    registry = Registry(scratch_farm.state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    handle = scratch_farm.submit(Campaign.from_raw("plain", [{"prompt": f"p{i}"} for i in range(5)]))
    settings = scratch_farm.settings.model_copy(update={"routing_policy": policy})
    dispatcher = Dispatcher(
        make_celery(settings), scratch_farm.state, registry, tick_s=1.0, policy=policy_by_name(settings.routing_policy)
    )
    assert dispatcher.dispatch() == 2  # two slots: one running, one waiting
    assert dispatcher.dispatch() == 0
    assigned = [job.local_id for job in scratch_farm.state.jobs(handle.id) if job.state == JobState.ASSIGNED]
    assert assigned == ["job-0", "job-1"]


def running_on(scratch_farm: FarmClient, registry: Registry, count: int) -> list[str]:
    """``count`` jobs dispatched to w1 (its Celery messages on its queue), then claimed by it."""
    handle = scratch_farm.submit(Campaign.from_raw("held", [{"prompt": f"p{i}"} for i in range(count)]))
    dispatcher = Dispatcher(make_celery(scratch_farm.settings), scratch_farm.state, registry, tick_s=1.0)
    assert dispatcher.dispatch() == count
    job_ids = scratch_farm.state.job_ids(handle.id)
    for job_id in job_ids:
        assert scratch_farm.state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="w1").changed
    return job_ids


def test_a_running_job_its_live_worker_does_not_hold_is_given_back_on_the_second_pass(
    scratch_farm: FarmClient,
) -> None:
    state = scratch_farm.state
    registry = Registry(state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    held, lost = running_on(scratch_farm, registry, 2)
    # w1 runs one; the other's final move and release never reached Redis (it was unreachable).
    registry.heartbeat("w1", WorkerReport(identity="host-gpu0", queue=keys.worker_queue("w1"), pid=1), [held])
    reconciler = Reconciler(state, registry, interval_s=0)
    assert reconciler.run() == 0  # first seen: only noted, it may have been claimed a moment ago
    assert reconciler.run() == 1
    record = state.job(lost)
    assert (record.state, record.attempt) == (JobState.PENDING, 1)
    assert state.redis.hget(keys.job(lost), "lost") == "1"
    assert state.redis.zrange(keys.PENDING, 0, -1) == [lost]
    assert registry.assigned("w1") == [held]  # the slot is free again
    assert state.job(held).state == JobState.RUNNING and state.active_job_ids() == [held]
    assert reconciler.run() == 0


def test_an_assigned_job_is_held_while_its_message_waits_and_given_back_when_it_is_gone(
    scratch_farm: FarmClient,
) -> None:
    state = scratch_farm.state
    registry = Registry(state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    handle = scratch_farm.submit(Campaign.from_raw("queued", [{"prompt": "p"}]))
    dispatcher = Dispatcher(make_celery(scratch_farm.settings), state, registry, tick_s=1.0)
    assert dispatcher.dispatch() == 1
    (job_id,) = state.job_ids(handle.id)
    reconciler = Reconciler(state, registry, interval_s=0)
    assert reconciler.run() == 0 and reconciler.run() == 0  # its message is on w1's queue
    state.redis.delete(*keys.worker_queue_lists("w1"))  # the message is lost
    assert reconciler.run() == 0 and reconciler.run() == 1
    assert state.job(job_id).state == JobState.PENDING and state.redis.hget(keys.job(job_id), "lost") is None
    assert registry.assigned("w1") == []


def test_a_job_recorded_with_a_worker_that_is_not_live_is_given_back(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    registry = Registry(state, lapse_s=60)
    handle = scratch_farm.submit(Campaign.from_raw("ghost", [{"prompt": "p"}]))
    (job_id,) = state.job_ids(handle.id)
    assert state.assign(job_id, "ghost", 1.0) == 1
    assert state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="ghost").changed
    reconciler = Reconciler(state, registry, interval_s=0)
    assert [reconciler.run(), reconciler.run()] == [0, 1]
    assert state.job(job_id).state == JobState.PENDING
    assert state.redis.zcard(keys.worker_assigned("ghost")) == 0


def test_a_job_lost_three_times_while_running_fails_with_the_reason(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    registry = Registry(state, lapse_s=60)
    handle = scratch_farm.submit(Campaign.from_raw("poison", [{"prompt": "p"}]))
    (job_id,) = state.job_ids(handle.id)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        register(registry, f"w{attempt}", f"host-gpu{attempt}")
        assert state.assign(job_id, f"w{attempt}", 1.0) == attempt
        assert state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=attempt, if_worker=f"w{attempt}").changed
        assert registry.retire(f"w{attempt}", reason="killed") == 1
    record = state.job(job_id)
    assert record.state == JobState.FAILED
    assert record.error == f"worker lost {MAX_ATTEMPTS} times while rendering this job (last: killed)"
    assert state.status(handle.id).failed == 1


def test_heartbeats_and_lapses_are_timed_by_the_redis_clock_not_the_workers(
    scratch_farm: FarmClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(scratch_farm.state, lapse_s=1.0)
    true_time = time.time
    monkeypatch.setattr(time, "time", lambda: true_time() - 30)  # this worker's clock is 30 s slow
    register(registry, "slow", "host-slow")
    monkeypatch.setattr(time, "time", lambda: true_time() + 3600)  # and this one's an hour fast
    register(registry, "fast", "host-fast")
    monkeypatch.setattr(time, "time", true_time)  # the leader's clock is right
    assert {view.worker_id for view in registry.live_workers()} == {"slow", "fast"}
    assert registry.lapsed_workers() == []
    time.sleep(1.2)  # both stop beating: both lapse on time
    assert registry.live_workers() == [] and sorted(registry.lapsed_workers()) == ["fast", "slow"]


def test_the_dispatcher_survives_a_broker_it_cannot_reach_and_gives_the_job_back(
    scratch_farm: FarmClient, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    state = scratch_farm.state
    registry = Registry(state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    with CuttableProxy(("127.0.0.1", redis_server.port)) as broker:
        through_proxy = scratch_farm.settings.redis_url.replace(f":{redis_server.port}/", f":{broker.port}/")
        app = make_celery(scratch_farm.settings.model_copy(update={"redis_url": through_proxy}))
        broker.cut()
        dispatcher = Dispatcher(app, state, registry, tick_s=0.2)
        thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
        thread.start()
        try:
            handle = scratch_farm.submit(Campaign.from_raw("no-broker", [{"prompt": "p"}]))
            (job_id,) = state.job_ids(handle.id)
            wait_for(lambda: "dispatch round failed" in caplog.text, "the failed round to be logged")
            assert thread.is_alive()
            assert state.job(job_id).state == JobState.PENDING and registry.assigned("w1") == []
            assert state.redis.zrange(keys.PENDING, 0, -1) == [job_id]  # given back, not stuck assigned
            broker.restore()
            wait_for(lambda: state.redis.llen(keys.worker_queue("w1")) == 1, "the job to be dispatched")
            assert state.job(job_id).state == JobState.ASSIGNED and registry.assigned("w1") == [job_id]
        finally:
            dispatcher.stop()
            thread.join(timeout=10)


def test_retry_failed_lifts_the_block_its_failures_built_through_the_dispatcher(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    registry = Registry(state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    handle = scratch_farm.submit(Campaign.from_raw("blocked", [{"prompt": "p"}]))
    (job_id,) = state.job_ids(handle.id)
    dispatcher = Dispatcher(make_celery(scratch_farm.settings), state, registry, tick_s=1.0)
    assert dispatcher.dispatch() == 1
    assert state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="w1").changed
    assert state.move(job_id, Move.FINISH, JobState.FAILED, if_attempt=1, fields={"error": "internal error"}).changed
    registry.release("w1", job_id)
    control = CampaignControl(state)
    assert [control.record_worker_failure(handle.id, "host-gpu0") for _ in range(BLOCKLIST_THRESHOLD)][-1]

    assert control.retry_failed(handle.id) == 1
    assert control.exclusions({handle.id}) == {}
    assert not state.redis.exists(keys.campaign_worker_failures(handle.id))
    assert dispatcher.dispatch() == 1  # the only worker, kept off before, takes the retried job
    assert state.job(job_id).worker == "w1"


def test_a_new_leader_reissues_what_its_predecessor_assigned_and_the_old_message_is_then_skipped(
    scratch_farm: FarmClient,
) -> None:
    registry = Registry(scratch_farm.state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    handle = scratch_farm.submit(Campaign.from_raw("handover", [{"prompt": "p"}]))
    first = Dispatcher(make_celery(scratch_farm.settings), scratch_farm.state, registry, tick_s=1.0)
    assert first.dispatch() == 1
    (job_id,) = scratch_farm.state.job_ids(handle.id)
    # The old leader died; the next one leads and re-sends under a new attempt.
    scratch_farm.state.redis.delete(keys.DISPATCHER_LOCK)
    second = Dispatcher(make_celery(scratch_farm.settings), scratch_farm.state, registry, tick_s=1.0)
    assert second._lead()
    assert scratch_farm.state.job(job_id).attempt == 2
    assert scratch_farm.state.redis.llen(keys.worker_queue("w1")) == 2  # the old message and the new one
    stale = scratch_farm.state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="w1")
    fresh = scratch_farm.state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=2, if_worker="w1")
    assert not stale.changed and fresh.changed


def test_wait_writes_the_manifest_of_a_campaign_whose_last_worker_died_before_writing_it(
    scratch_farm: FarmClient, s3_server: S3Server
) -> None:
    settings = scratch_farm.settings.model_copy(
        update={
            "s3_endpoint_url": s3_server.url,
            "s3_access_key_id": SecretStr(s3_server.access_key),
            "s3_secret_access_key": SecretStr(s3_server.secret_key),
            "s3_bucket": "orphans",
        }
    )
    client = FarmClient(settings)
    client.storage.ensure_bucket()
    handle = client.submit(Campaign.from_raw("orphan", [{"prompt": "p"}]))
    (job_id,) = client.state.job_ids(handle.id)
    client.state.move(job_id, Move.CANCEL, JobState.CANCELLED)  # ended, and nobody wrote the manifest
    assert handle.status().manifest_key is None
    client.state.redis.hincrbyfloat(keys.campaign(handle.id), "changed_at", -3600)  # an hour ago
    status = handle.wait(progress=False, timeout=30)
    assert status.done and client.storage.exists(f"kleinfarm/{handle.id}/manifest.jsonl")
