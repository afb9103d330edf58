"""A mixed fleet on the real farm (issues 9 and 14): workers whose cards hold different jobs.

Real redis-server, S3 server and worker processes on the tiny model, each worker told how much of
its "card" it may use (``KLEINFARM_CARD_MEMORY_MB``), so the engine's own memory arithmetic decides
what it accepts. A job too big for one card goes to another that can run it; a job too big for
every live card waits, saying why, and runs when a worker that can run it joins. No job is failed
or bounced for it, and every worker stays alive.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from PIL import Image

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import RedisServer
from kleinfarm.producer.queue_metrics import read_figures
from kleinfarm.shared.capacity import JobShape
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool, settings_from

FLEET_DATABASE = 4
WAIT_S = 300
# MiB of "card" per worker (the tiny model's weights are 0.4 MiB): the small card runs a 256 px
# generate (7.5 MB) but no edit (its VAE encode of a 1 MP reference: 115 MB); the medium card runs
# a one-reference 256 px edit but not a 1024 px edit with four references (128 MB).
SMALL_CARD_MB, MEDIUM_CARD_MB = 20, 120


@dataclass
class Fleet:
    client: FarmClient
    pool: WorkerPool
    env: dict[str, str]


@pytest.fixture()
def fleet(
    farm_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{FLEET_DATABASE}"
    # A 1 MiB prompt cache: the engine counts its budget as held on the card beside every job.
    env = {**farm_env, "KLEINFARM_REDIS_URL": url, "KLEINFARM_PROMPT_CACHE_MB": "1"}
    client = FarmClient(settings_from(env))
    client.state.redis.flushdb()
    pool = WorkerPool(env, tmp_path_factory.mktemp("fleet-worker-logs"))
    try:
        yield Fleet(client, pool, env)
    finally:
        pool.stop()
        client.state.redis.flushdb()


def start(fleet: Fleet, name: str, card_mb: int | None) -> None:
    extra = {"KLEINFARM_CARD_MEMORY_MB": str(card_mb)} if card_mb else {}
    fleet.pool.start(1, name=name, env=extra)


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def reference(storage: Storage) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), "teal").save(buffer, format="PNG")
    storage.client.put_object(Bucket=storage.bucket, Key="fleet/ref.png", Body=buffer.getvalue())
    return f"s3://{storage.bucket}/fleet/ref.png"


def test_each_job_runs_on_a_card_that_can_hold_it_and_a_job_no_card_can_hold_waits_for_one(
    fleet: Fleet, storage: Storage
) -> None:
    start(fleet, "small-card", SMALL_CARD_MB)
    start(fleet, "medium-card", MEDIUM_CARD_MB)
    registry = Registry(fleet.client.state, lapse_s=3)
    limits = {view.identity: view.report.engine.capability for view in registry.live_workers()}
    small, medium = limits["small-card"], limits["medium-card"]
    assert small is not None and medium is not None
    edit, huge = JobShape.worst_case(256, 256, 1), JobShape.worst_case(1024, 1024, 4)
    assert not small.fits(edit) and medium.fits(edit) and not medium.fits(huge)  # what the test relies on

    ref = reference(storage)
    campaign = Campaign.from_raw(
        "fleet",
        [
            {"id": "gen-a", "prompt": "a mug"},
            {"id": "gen-b", "prompt": "a lamp"},
            {"id": "edit", "prompt": "on brand", "references": [ref]},
            {"id": "huge", "prompt": "four refs", "references": [ref] * 4, "width": 1024, "height": 1024},
        ],
        defaults={"width": 256, "height": 256},
    )
    handle = fleet.client.submit(campaign)
    wait_for(lambda: handle.status().succeeded == 3, "the three jobs some card can run")
    status = handle.status()
    assert (status.pending, status.failed) == (1, 0)
    assert status.waiting == "waiting: no live worker can run 1024x1024 with 4 references"
    jobs = {
        row.local_id: row
        for row in (fleet.client.state.job(job_id) for job_id in fleet.client.state.job_ids(handle.id))
    }
    assert jobs["edit"].worker is not None and jobs["edit"].worker.startswith("medium-card")
    assert jobs["huge"].state == "pending" and jobs["huge"].attempt == 0  # never handed to a card

    start(fleet, "large-card", None)
    final = handle.wait(progress=False, timeout=WAIT_S)
    assert (final.succeeded, final.failed, final.waiting) == (4, 0, None)
    huge_job = fleet.client.state.job(f"{handle.id}/huge")
    assert huge_job.worker is not None and huge_job.worker.startswith("large-card") and huge_job.attempt == 1
    assert len(fleet.pool.alive()) == 3


def test_a_campaign_stays_on_the_model_revision_it_started_on_while_the_farm_is_upgraded(fleet: Fleet) -> None:
    label = fleet.env["KLEINFARM_MODEL"]
    fleet.env["KLEINFARM_MODEL_REVISION"] = "rev-b"
    start(fleet, "old-card", None)
    raw = [{"prompt": f"kit {index}"} for index in range(8)]
    handle = fleet.client.submit(Campaign.from_raw("upgrade", raw, defaults={"width": 256, "height": 256}))
    wait_for(lambda: handle.status().succeeded >= 1, "the campaign to start on rev-b")
    campaign = fleet.client.campaign(handle.id)
    campaign.pause()
    wait_for(lambda: handle.status().running == 0, "the running jobs to end")
    fleet.pool.stop()  # the rev-b card goes for its upgrade; rev-a cards join
    registry = Registry(fleet.client.state, lapse_s=3)
    assert read_figures(fleet.client.state, registry).retirements == {"stopped": 1}  # the exporter's figure
    fleet.env["KLEINFARM_MODEL_REVISION"] = "rev-a"
    start(fleet, "new-card", None)
    campaign.resume()
    left = handle.status().pending
    assert left > 0
    wait_for(lambda: handle.status().waiting is not None, "the campaign to say why it waits")
    assert handle.status().waiting == f"waiting: no live worker runs {label}@rev-b, the model it is pinned to"
    assert handle.status().pending == left  # none went to the rev-a card

    fleet.env["KLEINFARM_MODEL_REVISION"] = "rev-b"
    start(fleet, "old-card-back", None)
    final = handle.wait(progress=False, timeout=WAIT_S)
    assert (final.succeeded, final.failed, final.waiting) == (8, 0, None)
    workers = {fleet.client.state.job(job_id).worker or "" for job_id in fleet.client.state.job_ids(handle.id)}
    assert workers and not any(worker.startswith("new-card") for worker in workers)
