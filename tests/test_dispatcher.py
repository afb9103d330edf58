"""The dispatcher applies the routing policy against real Redis and a real Celery broker."""

from __future__ import annotations

import pytest

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.broker import make_celery
from kleinfarm.shared.control import BLOCKLIST_THRESHOLD, CampaignControl
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.records import WorkerReport
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.routing import POLICIES, policy_by_name
from kleinfarm.shared.states import JobState
from kleinfarm.worker.farm.dispatcher import Dispatcher


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
