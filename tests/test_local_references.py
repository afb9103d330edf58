"""Local reference files: the client uploads them by content at submit; a worker opens no path a
job names, and says so in the same words whether the path exists or not."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from kleinfarm.producer import uploads
from kleinfarm.producer.campaign_files import load_schedule
from kleinfarm.producer.client import CampaignHandle, FarmClient, new_campaign_id, prepare_jobs, routing_info
from kleinfarm.producer.schedules import ScheduleBook
from kleinfarm.shared import keys
from kleinfarm.shared.errors import JobSpecError, ReferenceRefusedError
from kleinfarm.shared.jobs import Campaign, EditJob, GenerateJob
from kleinfarm.shared.refset import route_key
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.state import NewJob
from kleinfarm.shared.storage import Storage
from kleinfarm.worker.references import ReferenceFetcher

from conftest import WorkerPool

WAIT_S = 300
REFUSAL = (
    "reference {} is a local path: workers open no path a job names; "
    "submit it with the kleinfarm client, which uploads local files"
)


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), color).save(buffer, format="PNG")
    return buffer.getvalue()


def own_prefix_client(client: FarmClient) -> FarmClient:
    """A client of the test farm uploading under a prefix of its own, so its objects can be counted."""
    prefix = f"refs-test-{secrets.token_hex(4)}"
    return FarmClient(client.settings.model_copy(update={"reference_upload_prefix": prefix}))


def uploaded_keys(client: FarmClient) -> list[str]:
    storage = client.storage
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=client.settings.reference_upload_prefix + "/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


# -- the worker ----------------------------------------------------------------------------------


def bypassing_job(local_id: str, reference: str) -> NewJob:
    """An edit job as someone with write access to Redis could queue it, without the client."""
    job = EditJob(prompt="p", references=["s3://placeholder/ref.png"], width=256, height=256, seed=1)
    spec = {**job.model_dump(mode="json", exclude={"id"}), "references": [reference]}
    return NewJob(local_id, spec, dataclasses.replace(routing_info(job), route=route_key([reference])))


def test_a_job_naming_a_local_path_fails_on_the_worker_in_words_that_do_not_tell_if_it_exists(
    client: FarmClient, workers: WorkerPool
) -> None:
    alive_before = len(workers.alive())
    references = {
        "existing": "/etc/hostname",
        "missing": "/nonexistent/kleinfarm/nothing-here.png",
        "file-url": "file:///etc/passwd",
        "relative": "../../../../etc/hostname",
        "environ": "/proc/self/environ",
    }
    fine = GenerateJob(prompt="fine", width=256, height=256, seed=2)
    jobs = [bypassing_job(local_id, reference) for local_id, reference in references.items()]
    jobs.append(NewJob("fine", fine.model_dump(mode="json", exclude={"id"}), routing_info(fine)))
    campaign_id = new_campaign_id("bypass")
    client.state.create_campaign(campaign_id, {"name": "bypass", "output_prefix": "kleinfarm"}, 0, jobs)

    status = CampaignHandle(client, campaign_id).wait(progress=False, timeout=WAIT_S)
    assert (status.succeeded, status.failed) == (1, len(references))
    errors = {row["job_id"]: row["error"] for row in CampaignHandle(client, campaign_id).results()}
    assert errors["fine"] is None
    assert errors["existing"] == REFUSAL.format("/etc/hostname")
    assert errors["missing"] == REFUSAL.format("/nonexistent/kleinfarm/nothing-here.png")
    assert errors["file-url"] == REFUSAL.format("/etc/passwd")  # the job schema drops the file:// prefix
    assert errors["relative"] == REFUSAL.format("../../../../etc/hostname")
    assert errors["environ"] == REFUSAL.format("/proc/self/environ")
    assert len(workers.alive()) == alive_before


@pytest.mark.parametrize("reference", ["/etc/hostname", "file:///etc/passwd", "fifo", "nothing-here.png"])
def test_the_fetcher_refuses_a_local_path_without_looking_at_it(tmp_path: Path, reference: str) -> None:
    os.mkfifo(tmp_path / "fifo")  # opening it would block: the fetcher must not even try
    fetcher = ReferenceFetcher(Storage(client=None, bucket="farm"), FarmSettings(cache_dir=tmp_path / "cache"))
    path = reference if reference.startswith(("/", "file:")) else str(tmp_path / reference)
    with pytest.raises(ReferenceRefusedError) as caught:
        fetcher.fetch(path)
    assert str(caught.value) == REFUSAL.format(path)


# -- the client ----------------------------------------------------------------------------------


def test_local_references_are_uploaded_once_by_content_and_jobs_name_the_uploads(
    client: FarmClient,
    workers: WorkerPool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    photos = {name: png((index * 30, 200 - index * 20, 90)) for index, name in enumerate("abcdefg")}
    for name, data in photos.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    (tmp_path / "a-copy.png").write_bytes(photos["a"])  # another path, the same bytes
    path = {name: str(tmp_path / f"{name}.png") for name in [*photos, "a-copy"]}
    reads: Counter[str] = Counter()
    real_read = uploads.read_local_file

    def counting_read(where: str, max_bytes: int) -> bytes:
        reads[where] += 1
        return real_read(where, max_bytes)

    monkeypatch.setattr(uploads, "read_local_file", counting_read)
    farm = own_prefix_client(client)
    jobs = [{"prompt": f"mug {i}", "references": [path["a"]]} for i in range(5)]
    jobs.append({"prompt": "four", "references": [path["a-copy"], path["b"], path["c"], path["d"]]})
    jobs.append({"prompt": "three", "references": [path["e"], path["f"], path["g"]]})
    first = farm.submit(Campaign.from_raw("uploads", jobs, defaults={"width": 256, "height": 256}), progress=True)

    assert "uploading references" in capfd.readouterr().err  # more than a handful, and asked for
    assert reads == Counter(path.values())  # each distinct path read once
    prefix = farm.settings.reference_upload_prefix
    expected = {name: f"{prefix}/{hashlib.sha256(data).hexdigest()}.png" for name, data in photos.items()}
    assert uploaded_keys(farm) == sorted(expected.values())  # seven contents, seven objects
    bucket = farm.storage.bucket
    specs = [farm.state.job(f"{first.id}/job-{index}") for index in range(len(jobs))]
    assert [record.references for record in specs[:5]] == [[f"s3://{bucket}/{expected['a']}"]] * 5
    assert specs[5].references == [f"s3://{bucket}/{expected[name]}" for name in "abcd"]
    assert all(ref.startswith(f"s3://{bucket}/{prefix}/") for record in specs for ref in record.references)

    second = farm.submit(Campaign.from_raw("again", [{"prompt": "the same mug", "references": [path["a-copy"]]}]))
    assert "uploading references" not in capfd.readouterr().err  # one file, and no bar asked for
    assert uploaded_keys(farm) == sorted(expected.values())  # found there, not uploaded again
    assert farm.state.job(f"{second.id}/job-0").route == specs[0].route  # same content, same routing key

    assert first.wait(progress=False, timeout=WAIT_S).succeeded == len(jobs)
    assert second.wait(progress=False, timeout=WAIT_S).succeeded == 1


def a_fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.png")
    return folder / "pipe.png"


def a_link_to_a_fifo(folder: Path) -> Path:
    (folder / "link.png").symlink_to(a_fifo(folder))
    return folder / "link.png"


def a_directory(folder: Path) -> Path:
    (folder / "photos.png").mkdir()
    return folder / "photos.png"


def an_oversize_file(folder: Path) -> Path:
    (folder / "big.png").write_bytes(png((1, 2, 3)) + b"\0" * 4096)
    return folder / "big.png"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (a_fifo, "is a FIFO: a reference must be a regular file"),
        (a_link_to_a_fifo, "is a FIFO: a reference must be a regular file"),
        (a_directory, "is a directory: a reference must be a regular file"),
        (an_oversize_file, r"is \d+ bytes: the limit is 4096 \(KLEINFARM_REFERENCE_MAX_BYTES\)"),
    ],
)
def test_a_file_that_is_not_a_small_regular_file_is_refused_at_submit_by_field(
    scratch_farm: FarmClient, tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    bad = make(tmp_path)
    good = tmp_path / "good.png"
    good.write_bytes(png((10, 20, 30)))
    # The farm's storage is never reached: every file is checked before the first upload.
    farm = FarmClient(scratch_farm.settings.model_copy(update={"reference_max_bytes": 4096}))
    jobs = [{"prompt": "fine", "references": [str(good)]}, {"prompt": "bad", "references": [str(good), str(bad)]}]
    with pytest.raises(JobSpecError, match=rf"^jobs\[1\]\.references\[1\]: {re.escape(str(bad))} {problem}$"):
        farm.submit(Campaign.from_raw("bad-file", jobs))
    assert farm.state.redis.dbsize() == 0  # nothing queued


def test_no_local_path_reaches_a_job_spec_unless_it_was_uploaded() -> None:
    campaign = Campaign.from_raw("c", [{"prompt": "p", "references": ["s3://farm/x.png", "/etc/hostname"]}])
    with pytest.raises(JobSpecError, match=r"^jobs\[0\]\.references\[1\]: /etc/hostname is a local path"):
        prepare_jobs(campaign)
    (job,) = prepare_jobs(campaign, {"/etc/hostname": "s3://farm/refs/abc.png"})
    assert job.spec["references"] == ["s3://farm/x.png", "s3://farm/refs/abc.png"]
    assert job.routing.route == route_key(["s3://farm/x.png", "s3://farm/refs/abc.png"])


# -- schedules -----------------------------------------------------------------------------------


def test_a_schedules_local_references_are_uploaded_when_it_is_added(
    client: FarmClient, storage: Storage, tmp_path: Path
) -> None:
    brand = png((250, 250, 240))
    (tmp_path / "brand.png").write_bytes(brand)
    schedule_file = tmp_path / "uploaded.yaml"
    schedule_file.write_text(
        "name: uploads-at-add\n"
        f"source: s3://{storage.bucket}/products/\n"
        "prompt: the product on the brand background\n"
        "references: [brand.png]\n"  # relative: beside the schedule file
        f"output: s3://{storage.bucket}/edited\n"
        "cron: '0 3 * * *'\n"
    )
    book = ScheduleBook(client)
    book.add(load_schedule(schedule_file))
    try:
        key = f"{client.settings.reference_upload_prefix}/{hashlib.sha256(brand).hexdigest()}.png"
        assert book.get("uploads-at-add").references == [f"s3://{storage.bucket}/{key}"]
        assert storage.get(key) == brand
    finally:
        book.remove("uploads-at-add")


def test_a_stored_schedule_naming_a_local_path_is_not_run(client: FarmClient, storage: Storage) -> None:
    stored = {
        "name": "old-local",
        "source": f"s3://{storage.bucket}/products/",
        "prompt": "p",
        "references": ["/etc/hostname"],
        "output": f"s3://{storage.bucket}/edited",
        "cron": "0 3 * * *",
    }
    client.state.redis.hset(keys.SCHEDULES, "old-local", json.dumps(stored))
    try:
        with pytest.raises(JobSpecError, match=r"schedule old-local: references\[0\]: /etc/hostname is a local path"):
            ScheduleBook(client).run("old-local")
    finally:
        client.state.redis.hdel(keys.SCHEDULES, "old-local")
