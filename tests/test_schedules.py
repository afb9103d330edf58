"""Scheduled bulk product edits with the S3 server and a real beat process."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import S3Server
from kleinfarm.producer.schedules import ScheduleBook
from kleinfarm.shared.schedules import Schedule
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool

REFS = Path(__file__).parent.parent / "examples" / "refs"
KLEINFARM = [sys.executable, "-m", "kleinfarm.producer"]


def photo(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_scheduled_run_edits_only_the_photos_added_or_changed_since_the_last(
    client: FarmClient, storage: Storage, farm_env: dict[str, str], workers: WorkerPool, tmp_path: Path
) -> None:
    env = {**os.environ, **farm_env}
    put = storage.client.put_object
    put(Bucket=storage.bucket, Key="products/mug.png", Body=photo("red"))
    put(Bucket=storage.bucket, Key="products/lamp.png", Body=photo("blue"))
    schedule_file = tmp_path / "nightly.yaml"
    schedule_file.write_text(
        "name: nightly\n"
        f"source: s3://{storage.bucket}/products/\n"
        "prompt: the product on the brand background\n"
        f"references: [{REFS / 'brand-background.png'}]\n"
        f"output: s3://{storage.bucket}/edited\n"
        "width: 256\nheight: 256\ncron: '* * * * *'\n"
    )
    added = subprocess.run([*KLEINFARM, "schedule", "add", str(schedule_file)], env=env, capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert client.state.redis.exists("kf:redbeat:kleinfarm-nightly")  # the schedule lives in Redis

    first = subprocess.run(
        [*KLEINFARM, "schedule", "run", "nightly", "--wait"], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr
    first_campaign = first.stdout.strip()
    assert client.campaign(first_campaign).status().succeeded == 2

    put(Bucket=storage.bucket, Key="products/mug.png", Body=photo("red"))  # re-uploaded, identical
    put(Bucket=storage.bucket, Key="products/lamp.png", Body=photo("green"))  # changed
    put(Bucket=storage.bucket, Key="products/vase.png", Body=photo("white"))  # new
    log = (tmp_path / "beat.log").open("wb")
    beat = subprocess.Popen([*KLEINFARM, "beat"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        book = ScheduleBook(client)
        deadline = time.monotonic() + 150
        while len(book.runs("nightly")) < 2:
            assert beat.poll() is None and time.monotonic() < deadline, (tmp_path / "beat.log").read_text()
            time.sleep(0.5)
    finally:
        beat.terminate()
        beat.wait(timeout=60)
    run = book.runs("nightly")[1]
    assert (run["photos"], run["submitted"], run["already_edited"]) == (3, 2, 1)
    second = client.campaign(run["campaign"])
    assert second.wait(progress=False, timeout=300).succeeded == 2
    edited = sorted(client.state.job(f"{second.id}/{row['job_id']}").references[0] for row in second.results())
    assert edited == [f"s3://{storage.bucket}/products/lamp.png", f"s3://{storage.bucket}/products/vase.png"]
    assert all(str(row["key"]).startswith(f"edited/{second.id}/") for row in second.results())


MIB = 1024 * 1024
PHOTO_BYTE_LIMIT = 6 * MIB


@pytest.fixture()
def photo_farm(scratch_farm: FarmClient, s3_server: S3Server) -> FarmClient:
    """A farm no worker serves (its jobs stay pending), with a bucket of its own and a 6 MiB limit
    on references; its schedule ``nightly`` edits what is under ``products/``."""
    settings = FarmSettings(
        redis_url=scratch_farm.settings.redis_url,
        s3_endpoint_url=s3_server.url,
        s3_access_key_id=SecretStr(s3_server.access_key),
        s3_secret_access_key=SecretStr(s3_server.secret_key),
        s3_bucket=f"photos-{secrets.token_hex(4)}",
        reference_max_bytes=PHOTO_BYTE_LIMIT,
    )
    client = FarmClient(settings)
    client.storage.ensure_bucket()
    bucket = settings.s3_bucket
    schedule = Schedule(
        name="nightly",
        source=f"s3://{bucket}/products/",
        prompt="the product on white",
        output=f"s3://{bucket}/edited",
        width=256,
        height=256,
        cron="0 2 * * *",
    )
    ScheduleBook(client).add(schedule)
    return client


def put_multipart(storage: Storage, key: str, parts: list[bytes]) -> None:
    client, bucket = storage.client, storage.bucket
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    done = []
    for number, body in enumerate(parts, start=1):
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=body)["ETag"]
        done.append({"ETag": etag, "PartNumber": number})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done})


def test_a_run_submits_at_most_its_cap_and_says_how_many_are_left_for_the_next(photo_farm: FarmClient) -> None:
    storage = photo_farm.storage
    for index in range(7):
        storage.put(f"products/{index}.png", f"photo {index}".encode(), "image/png")
    book = ScheduleBook(photo_farm, max_photos=3)

    summaries = []
    for _ in range(3):  # no worker: each run's jobs stay in flight, so the next run takes the next photos
        handle = book.run("nightly")
        summary = book.runs("nightly")[-1]
        summaries.append((summary["submitted"], summary["in_flight"], summary["left_for_next_run"]))
        assert handle is not None and handle.status().total == summary["submitted"]
    assert summaries == [(3, 0, 4), (3, 3, 1), (1, 6, 0)]
    assert book.run("nightly") is None  # all seven in flight, none left


def test_a_photo_over_the_byte_limit_is_skipped_not_downloaded_and_multipart_ones_are_hashed_in_chunks(
    photo_farm: FarmClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = photo_farm.storage
    put_multipart(storage, "products/huge.png", [b"h" * (5 * MIB), b"h" * (2 * MIB)])  # 7 MiB
    put_multipart(storage, "products/multi.png", [b"a small photo, uploaded in parts"])
    storage.put("products/plain.png", b"a plain photo", "image/png")
    read: list[str] = []
    get_object = storage.client.get_object

    def recording_get_object(**kwargs: Any) -> Any:
        read.append(kwargs["Key"])
        return get_object(**kwargs)

    monkeypatch.setattr(storage.client, "get_object", recording_get_object)

    handle = ScheduleBook(photo_farm).run("nightly")
    summary = ScheduleBook(photo_farm).runs("nightly")[-1]
    assert (summary["photos"], summary["submitted"], summary["too_large"]) == (2, 2, 1)
    assert read == ["products/multi.png"]  # the huge one is never read; the plain one's ETag is its MD5
    assert handle is not None
    edited = sorted(photo_farm.state.job(f"{handle.id}/{row['job_id']}").references[0] for row in handle.results())
    assert edited == [f"s3://{storage.bucket}/products/multi.png", f"s3://{storage.bucket}/products/plain.png"]
