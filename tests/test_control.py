"""Campaign control on the real farm: pause and resume, retry the failed jobs, the error limit."""

from __future__ import annotations

import io
import json

from PIL import Image

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.control import BLOCKLIST_THRESHOLD, CampaignControl
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool

WAIT_S = 300


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_paused_campaign_holds_its_queued_jobs_until_resumed(client: FarmClient, workers: WorkerPool) -> None:
    jobs = [{"prompt": f"held {i}", "width": 512, "height": 512} for i in range(30)]
    paused = client.submit(Campaign.from_raw("paused", jobs))
    held = paused.pause()
    assert held > 0 and paused.status().paused

    other = client.submit(Campaign.from_raw("meanwhile", [{"prompt": "p", "width": 256, "height": 256}] * 2))
    assert other.wait(progress=False, timeout=WAIT_S).succeeded == 2
    status = paused.status()
    # Only what workers already held when the pause came could run: two slots per worker.
    assert status.succeeded + status.running <= 2 * len(workers.alive())
    job_ids = set(client.state.job_ids(paused.id))
    assert not job_ids & set(client.state.redis.zrange(keys.PENDING, 0, -1))
    assert client.state.redis.zcard(keys.campaign_paused(paused.id)) == status.pending

    assert paused.resume() == status.pending
    final = paused.wait(progress=False, timeout=WAIT_S)
    assert final.succeeded == 30 and not final.paused


def test_retry_failed_requeues_only_the_failed_jobs(client: FarmClient, storage: Storage, workers: WorkerPool) -> None:
    late = f"s3://{storage.bucket}/late/ref.png"
    jobs = [{"id": "fine", "prompt": "ok"}, {"id": "late", "prompt": "needs ref", "references": [late]}]
    handle = client.submit(Campaign.from_raw("retry", jobs, defaults={"width": 256, "height": 256}))
    first = handle.wait(progress=False, timeout=WAIT_S)
    assert (first.succeeded, first.failed) == (1, 1)
    fine_key = handle.results()[0]["key"]

    storage.client.put_object(Bucket=storage.bucket, Key="late/ref.png", Body=png())
    assert handle.retry_failed() == 1
    second = handle.wait(progress=False, timeout=WAIT_S)
    assert (second.succeeded, second.failed) == (2, 0)
    rows = {row["job_id"]: row for row in handle.results()}
    assert rows["fine"]["key"] == fine_key and rows["late"]["error"] is None
    lines = storage.get(f"kleinfarm/{handle.id}/manifest.jsonl").decode().splitlines()
    assert [json.loads(line)["state"] for line in lines] == ["succeeded", "succeeded"]


def test_a_campaign_past_its_error_limit_fails_and_stops(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    missing = [{"prompt": "bad", "references": [f"s3://{storage.bucket}/gone/{i}.png"]} for i in range(3)]
    slow = [{"prompt": f"slow {i}", "width": 1024, "height": 1024} for i in range(40)]
    handle = client.submit(Campaign.from_raw("limited", missing + slow, error_limit=1))
    status = handle.wait(progress=False, timeout=WAIT_S)
    assert status.failed_reason is not None and "error_limit of 1" in status.failed_reason
    assert status.failed >= 2 and status.cancelled > 0
    cancelled = [row for row in handle.results() if row["state"] == "cancelled"]
    assert all("campaign failed" in str(row["error"]) for row in cancelled)


def test_a_worker_failing_a_campaign_repeatedly_is_kept_off_it(client: FarmClient) -> None:
    control = CampaignControl(client.state)
    verdicts = [control.record_worker_failure("some-campaign", "host-gpu3") for _ in range(BLOCKLIST_THRESHOLD)]
    assert verdicts == [False] * (BLOCKLIST_THRESHOLD - 1) + [True]
    assert control.exclusions({"some-campaign", "other"}) == {"some-campaign": frozenset({"host-gpu3"})}
