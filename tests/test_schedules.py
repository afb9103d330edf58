"""Scheduled bulk product edits with the S3 server and a real beat process."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.schedules import ScheduleBook
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
