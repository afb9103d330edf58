"""The dispatcher applies the routing policy against real Redis and a real Celery broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import RedisServer
from kleinfarm.shared import keys
from kleinfarm.shared.broker import make_celery
from kleinfarm.shared.control import BLOCKLIST_THRESHOLD, CampaignControl
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.records import WorkerReport
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.states import JobState
from kleinfarm.worker.farm.dispatcher import Dispatcher

# A database of its own: the session's worker processes dispatch from database 0.
DATABASE = 7


@pytest.fixture()
def farm(redis_server: RedisServer) -> Iterator[FarmClient]:
    client = FarmClient(FarmSettings(redis_url=redis_server.url.rsplit("/", 1)[0] + f"/{DATABASE}"))
    client.state.redis.flushdb()
    yield client
    client.state.redis.flushdb()


def register(registry: Registry, worker_id: str, identity: str) -> None:
    """A worker as the registry sees it (no process: the test looks at what is dispatched to it)."""
    registry.heartbeat(worker_id, WorkerReport(identity=identity, queue=keys.worker_queue(worker_id), pid=1))


def test_a_blocked_campaign_at_the_head_of_the_queue_does_not_stop_another_in_the_same_round(
    farm: FarmClient,
) -> None:
    registry = Registry(farm.state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    blocked = farm.submit(Campaign.from_raw("urgent", [{"prompt": f"u{i}"} for i in range(4)], priority=5))
    other = farm.submit(Campaign.from_raw("routine", [{"prompt": "r"}]))
    control = CampaignControl(farm.state)
    for _ in range(BLOCKLIST_THRESHOLD):
        control.record_worker_failure(blocked.id, "host-gpu0")

    dispatcher = Dispatcher(make_celery(farm.settings), farm.state, registry, tick_s=1.0)
    assert dispatcher.dispatch() == 1

    (routine,) = farm.state.job_ids(other.id)
    record = farm.state.job(routine)
    assert (record.state, record.worker, record.attempt) == (JobState.ASSIGNED, "w1", 1)
    assert registry.assigned("w1") == [routine]
    assert farm.state.redis.llen(keys.worker_queue("w1")) == 1  # the Celery message, on the worker's own queue
    assert {job.state for job in farm.state.jobs(blocked.id)} == {JobState.PENDING}
    assert farm.state.redis.zcard(keys.PENDING) == 4


def test_a_worker_with_room_gets_the_head_of_the_queue_and_a_full_one_nothing(farm: FarmClient) -> None:
    registry = Registry(farm.state, lapse_s=60)
    register(registry, "w1", "host-gpu0")
    handle = farm.submit(Campaign.from_raw("plain", [{"prompt": f"p{i}"} for i in range(5)]))
    dispatcher = Dispatcher(make_celery(farm.settings), farm.state, registry, tick_s=1.0)
    assert dispatcher.dispatch() == 2  # two slots: one running, one waiting
    assert dispatcher.dispatch() == 0
    assigned = [job.local_id for job in farm.state.jobs(handle.id) if job.state == JobState.ASSIGNED]
    assert assigned == ["job-0", "job-1"]
