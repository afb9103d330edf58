"""The farm end to end: real Redis, S3 server and worker processes on the tiny model."""

from __future__ import annotations

import io
import json
import time
from itertools import pairwise
from pathlib import Path

import pytest
from celery import Celery
from PIL import Image

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry, WorkerView
from kleinfarm.shared.states import JobState
from kleinfarm.shared.storage import Storage

from conftest import TEST_PIXEL_LIMIT, WorkerPool

REFS = Path(__file__).parent.parent / "examples" / "refs"
WAIT_S = 300


def upload_reference(storage: Storage, key: str, data: bytes) -> str:
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=data)
    return f"s3://{storage.bucket}/{key}"


def png_bytes(size: tuple[int, int], color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_mixed_campaign_ends_with_every_image_in_s3_and_a_complete_manifest(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    s3_ref = upload_reference(storage, "inputs/mug.png", (REFS / "product-mug.png").read_bytes())
    campaign = Campaign.from_raw(
        "mixed",
        [
            {"prompt": "a mug", "width": 256, "height": 256},
            {"prompt": "a lamp", "width": 320, "height": 256},
            {"id": "edit-local", "prompt": "on brand", "references": [str(REFS / "product-mug.png")]},
            {"id": "edit-s3", "prompt": "two refs", "references": [s3_ref, str(REFS / "logo.png")], "height": 384},
        ],
        defaults={"width": 256, "height": 256},
    )
    handle = client.submit(campaign)
    status = handle.wait(progress=False, timeout=WAIT_S)
    assert (status.succeeded, status.failed, status.pending, status.running) == (4, 0, 0, 0)

    rows = {row["job_id"]: row for row in handle.results()}
    expected_sizes = {"job-0": (256, 256), "job-1": (320, 256), "edit-local": (256, 256), "edit-s3": (256, 384)}
    for job_id, size in expected_sizes.items():
        row = rows[job_id]
        assert row["key"] == f"kleinfarm/{handle.id}/{job_id}.png"
        image = Image.open(io.BytesIO(storage.get(row["key"])))
        image.load()
        assert image.size == size == (row["width"], row["height"])
        assert json.loads(image.info["kleinfarm"])["seed"] == row["seed"]

    manifest = storage.get(f"kleinfarm/{handle.id}/manifest.jsonl").decode().splitlines()
    lines = [json.loads(line) for line in manifest]
    assert sorted(line["job_id"] for line in lines) == sorted(expected_sizes)
    assert all(line["state"] == "succeeded" and line["key"] for line in lines)
    by_id = {line["job_id"]: line for line in lines}
    assert by_id["edit-s3"]["refset"].startswith("rs-") and by_id["job-0"]["refset"] is None


def test_edit_jobs_sharing_references_are_served_from_the_workers_kv_cache(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    shared_refs = [str(REFS / "product-lamp.png"), str(REFS / "brand-background.png")]
    jobs = [{"prompt": f"lamp {i}", "references": shared_refs, "width": 256, "height": 256} for i in range(8)]
    handle = client.submit(Campaign.from_raw("shared-refs", jobs))
    assert handle.wait(progress=False, timeout=WAIT_S).succeeded == 8
    lines = [json.loads(line) for line in storage.get(f"kleinfarm/{handle.id}/manifest.jsonl").decode().splitlines()]
    sources = [line["kv"] for line in lines]
    assert len({line["refset"] for line in lines}) == 1
    assert sources.count("miss") <= len(workers.alive())  # built at most once per worker
    assert sources.count("device") >= 8 - len(workers.alive())
    # What the workers publish of their caches names the set, with its bytes.
    refset = lines[0]["refset"]
    deadline = time.monotonic() + 30
    while not any(refset in published_kv_keys(view) for view in Registry(client.state, 3).live_workers()):
        assert time.monotonic() < deadline, "no worker published the reference set it holds"
        time.sleep(0.2)


def published_kv_keys(view: WorkerView) -> dict[str, int]:
    kv = view.report.engine.kv
    return {**kv.device.keys, **kv.host.keys}


def test_the_same_seed_gives_the_same_image(client: FarmClient, storage: Storage, workers: WorkerPool) -> None:
    job = {"prompt": "a lamp", "width": 256, "height": 256, "seed": 1234, "references": [str(REFS / "logo.png")]}
    first = client.submit(Campaign.from_raw("seed-a", [job]))
    second = client.submit(Campaign.from_raw("seed-b", [job, {**job, "seed": 99}]))
    first.wait(progress=False, timeout=WAIT_S)
    second.wait(progress=False, timeout=WAIT_S)

    def pixels(handle: object, index: int) -> bytes:
        key = handle.results()[index]["key"]  # type: ignore[attr-defined]
        return Image.open(io.BytesIO(storage.get(key))).tobytes()

    assert pixels(first, 0) == pixels(second, 0)
    assert pixels(second, 0) != pixels(second, 1)


def test_bad_references_fail_their_jobs_with_a_clear_message_while_the_rest_succeed(
    client: FarmClient, storage: Storage, workers: WorkerPool, tmp_path: Path
) -> None:
    alive_before = len(workers.alive())
    good = png_bytes((300, 300))
    truncated = upload_reference(storage, "inputs/truncated.png", good[: len(good) // 2])
    not_image = upload_reference(storage, "inputs/notes.png", b"these are notes, not pixels")
    huge = upload_reference(storage, "inputs/huge.png", png_bytes((1100, 1000)))
    missing = f"s3://{storage.bucket}/inputs/does-not-exist.png"
    jobs = {
        "truncated": truncated,
        "not-image": not_image,
        "huge": huge,
        "missing": missing,
    }
    raw = [{"id": job_id, "prompt": "p", "references": [url]} for job_id, url in jobs.items()]
    raw.append({"id": "fine", "prompt": "p", "references": [upload_reference(storage, "inputs/ok.png", good)]})
    handle = client.submit(Campaign.from_raw("bad-refs", raw, defaults={"width": 256, "height": 256}))
    status = handle.wait(progress=False, timeout=WAIT_S)
    assert (status.succeeded, status.failed) == (1, 4)

    errors = {row["job_id"]: row["error"] for row in handle.results()}
    assert errors["fine"] is None
    assert errors["truncated"] == f"reference {truncated} is truncated or corrupt: image file is truncated"
    assert errors["not-image"] == f"reference {not_image} is not an image (PNG, JPEG or WebP)"
    assert errors["huge"] == (
        f"reference {huge} is 1100x1000 = 1100000 pixels: the limit is {TEST_PIXEL_LIMIT} "
        "(KLEINFARM_REFERENCE_MAX_PIXELS)"
    )
    assert errors["missing"] == f"{missing} does not exist"
    assert len(workers.alive()) == alive_before


def test_a_pickled_message_is_refused_and_never_runs(client: FarmClient, workers: WorkerPool) -> None:
    registry = Registry(client.state, lapse_s=3)
    target = registry.live_workers()[0]
    sender = Celery(broker=client.settings.redis_url)
    sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    sender.send_task("kleinfarm.generate", kwargs={"job": "evil/job", "attempt": 1}, queue=target.queue)

    deadline = time.monotonic() + 60
    while "Refusing to deserialize untrusted content of type pickle" not in workers.logs():
        assert time.monotonic() < deadline, "the worker never reported refusing the pickled message"
        time.sleep(0.1)
    assert client.state.redis.llen(target.queue) == 0
    assert "evil/job" not in workers.logs().split("Refusing to deserialize")[0]
    # The worker is still there and serving.
    handle = client.submit(Campaign.from_raw("after-pickle", [{"prompt": "p", "width": 256, "height": 256}]))
    assert handle.wait(progress=False, timeout=WAIT_S).succeeded == 1


def test_a_cancel_mid_render_stops_the_job_at_its_next_step_with_nothing_written_and_the_farm_goes_on(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    steps = 50
    jobs = [{"prompt": f"job {i}", "width": 1024, "height": 1024, "steps": steps} for i in range(8)]
    handle = client.submit(Campaign.from_raw("to-cancel", jobs))

    def mid_render() -> bool:
        return any(
            job.state == JobState.RUNNING and job.progress and 0 < int(job.progress.split("/")[0]) < steps
            for job in client.state.jobs(handle.id)
        )

    deadline = time.monotonic() + WAIT_S
    while not mid_render():
        assert time.monotonic() < deadline, "no job of the campaign started rendering"
        time.sleep(0.05)
    dropped = handle.cancel()
    status = handle.wait(progress=False, timeout=WAIT_S)
    assert dropped > 0 and status.done and status.failed == 0
    assert status.succeeded + status.cancelled == len(jobs)
    records = list(client.state.jobs(handle.id))
    stopped = [job for job in records if job.error and "stopped at step" in job.error]
    assert stopped, [job.error for job in records]
    for job in stopped:
        done, total = job.error.rsplit("stopped at step ", 1)[1].rstrip(")").split(" of ")  # type: ignore[union-attr]
        assert job.state == JobState.CANCELLED and 0 < int(done) < int(total) == steps
    for job in records:
        if job.state == JobState.CANCELLED:
            assert job.key is None and not storage.exists(f"kleinfarm/{handle.id}/{job.local_id}.png")
    queued = client.state.redis.zrange(keys.PENDING, 0, -1)
    assert not [job_id for job_id in queued if str(job_id).startswith(handle.id)]
    manifest = storage.get(f"kleinfarm/{handle.id}/manifest.jsonl").decode().splitlines()
    assert len(manifest) == len(jobs)

    after = client.submit(Campaign.from_raw("after-cancel", [{"prompt": "p", "width": 256, "height": 256}]))
    assert after.wait(progress=False, timeout=WAIT_S).succeeded == 1


def test_status_and_results_answer_from_a_fresh_client(client: FarmClient, workers: WorkerPool) -> None:
    handle = client.submit(Campaign.from_raw("restart", [{"prompt": "p", "width": 256, "height": 256}]))
    handle.wait(progress=False, timeout=WAIT_S)
    fresh = FarmClient(client.settings).campaign(handle.id)
    assert fresh.status().as_dict() == handle.status().as_dict()
    assert fresh.results()[0]["state"] == "succeeded"


def test_a_retried_job_never_writes_a_second_copy(storage: Storage) -> None:
    assert storage.put_if_absent("dup/one.png", b"first", "image/png", {}) is True
    assert storage.put_if_absent("dup/one.png", b"second", "image/png", {}) is False
    assert storage.get("dup/one.png") == b"first"


def test_submitting_ten_thousand_jobs_is_pipelined(client: FarmClient) -> None:
    jobs = [{"prompt": f"product {i}", "width": 256, "height": 256} for i in range(10_000)]
    campaign = Campaign.from_raw("big", jobs, priority=-100)
    handle = client.submit(campaign)
    assert handle.status().total == 10_000
    handle.cancel()
    assert handle.status().cancelled >= 9_990


def test_an_unknown_campaign_is_reported_by_id(client: FarmClient) -> None:
    from kleinfarm.shared.errors import CampaignNotFoundError

    with pytest.raises(CampaignNotFoundError, match="campaign 'nope' is not known"):
        client.campaign("nope")


def test_jobs_are_stored_as_png_jpeg_or_webp_each_carrying_its_full_record(
    client: FarmClient, storage: Storage, workers: WorkerPool, tmp_path: Path
) -> None:
    from kleinfarm.worker.encoding import embedded_record

    prompt = "a mug,\non marble — warm"
    campaign = Campaign.from_raw(
        "formats",
        [
            {"id": "lossless", "prompt": prompt},
            {"id": "photo", "prompt": prompt, "format": "jpeg", "quality": 80},
            {"id": "web", "prompt": prompt, "format": "webp"},
        ],
        defaults={"width": 256, "height": 256},
    )
    handle = client.submit(campaign)
    assert handle.wait(progress=False, timeout=WAIT_S).succeeded == 3
    rows = {row["job_id"]: row for row in handle.results()}
    expected = {"lossless": (".png", "PNG"), "photo": (".jpg", "JPEG"), "web": (".webp", "WEBP")}
    for job_id, (suffix, kind) in expected.items():
        key = str(rows[job_id]["key"])
        assert key == f"kleinfarm/{handle.id}/{job_id}{suffix}"
        data = storage.get(key)
        assert Image.open(io.BytesIO(data)).format == kind
        record = embedded_record(data)
        assert (record["prompt"], record["job"]) == (prompt, f"{handle.id}/{job_id}")
    head = storage.client.head_object(Bucket=storage.bucket, Key=str(rows["photo"]["key"]))
    assert head["ContentType"] == "image/jpeg"
    manifest = [json.loads(line) for line in storage.get(f"kleinfarm/{handle.id}/manifest.jsonl").splitlines()]
    assert {row["job_id"]: row["format"] for row in manifest} == {"lossless": "png", "photo": "jpeg", "web": "webp"}
    files = handle.download(tmp_path)
    assert sorted(path.name for path in files) == ["lossless.png", "photo.jpg", "web.webp"]


def test_a_quality_for_a_png_is_refused_before_submit_naming_the_field(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from kleinfarm.producer.campaign_files import load_campaign
    from kleinfarm.shared.errors import CampaignFileError

    with pytest.raises(ValidationError, match="quality=80 applies to format jpeg or webp"):
        Campaign.from_raw("bad-quality", [{"prompt": "p", "quality": 80}])
    file = tmp_path / "bad.jsonl"
    file.write_text('{"prompt": "p", "quality": 80}\n')
    with pytest.raises(CampaignFileError, match="quality=80 applies to format jpeg or webp"):
        load_campaign(file)


def test_a_worker_starts_its_next_render_while_the_last_image_is_being_stored(
    client: FarmClient, workers: WorkerPool
) -> None:
    handle = client.submit(
        Campaign.from_raw("pipelined", [{"prompt": f"p{i}"} for i in range(8)], defaults={"width": 256, "height": 256})
    )
    assert handle.wait(progress=False, timeout=WAIT_S).succeeded == 8
    records = [record for record in client.state.jobs(handle.id)]
    overlaps = 0
    for worker in {record.worker for record in records}:
        mine = sorted((r for r in records if r.worker == worker), key=lambda r: r.started or 0.0)
        for earlier, later in pairwise(mine):
            assert earlier.finished is not None and later.started is not None
            overlaps += later.started < earlier.finished  # claimed before the earlier one was recorded
    assert overlaps > 0


def test_references_whose_kv_are_held_are_not_decoded_again(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    ref = upload_reference(storage, "inputs/held-set.png", png_bytes((320, 320), "teal"))
    decoded = []
    for index in range(2):  # the second campaign's job goes to the worker holding the set
        job = {"prompt": f"held {index}", "references": [ref], "width": 256, "height": 256}
        handle = client.submit(Campaign.from_raw(f"held-{index}", [job]))
        assert handle.wait(progress=False, timeout=WAIT_S).succeeded == 1
        (job_id,) = client.state.job_ids(handle.id)
        record = client.state.job(job_id)
        decoded.append((record.kv, client.state.redis.hget(keys.job(job_id), "refs_decoded")))
        registry = Registry(client.state, lapse_s=3)
        deadline = time.monotonic() + WAIT_S
        while not any(record.route in view.routes for view in registry.live_workers()):
            assert time.monotonic() < deadline, "the holder never reported the set"  # its next heartbeat does
            time.sleep(0.1)
    assert decoded == [("miss", "1"), ("device", "0")]
