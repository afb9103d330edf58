"""Affinity routing on the real farm: jobs go where their K/V are, and no job is lost or doubled."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry, WorkerView
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool

REFS = Path(__file__).parent.parent / "examples" / "refs"
WAIT_S = 300
SHARED_SETS = [
    [str(REFS / "product-mug.png")],
    [str(REFS / "product-lamp.png"), str(REFS / "logo.png")],
    [str(REFS / "brand-background.png"), str(REFS / "product-mug.png")],
]


def kv_hits(view: WorkerView) -> int:
    stats = view.report.engine.kv.stats
    return int(stats.get("hits_device", 0)) + int(stats.get("hits_host", 0))


def uploaded_locator(client: FarmClient, path: Path) -> str:
    """Where the client uploaded a local reference: the farm's bucket, by content."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"s3://{client.settings.s3_bucket}/{client.settings.reference_upload_prefix}/{digest}.png"


def manifest(storage: Storage, campaign_id: str) -> list[dict[str, object]]:
    body = storage.get(f"kleinfarm/{campaign_id}/manifest.jsonl").decode()
    return [json.loads(line) for line in body.splitlines()]


def wait_for(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_shared_reference_sets_are_built_by_few_workers_and_hit_after(
    client: FarmClient, storage: Storage, workers: WorkerPool, tmp_path: Path
) -> None:
    registry = Registry(client.state, lapse_s=3)
    hits_before = sum(kv_hits(view) for view in registry.live_workers())
    singles = []
    for index in range(10):
        path = tmp_path / f"single-{index}.png"
        path.write_bytes((REFS / "logo.png").read_bytes() + b"\0" * index)  # same pixels, other bytes
        singles.append({"prompt": f"single {index}", "references": [str(path)]})
    shared = [{"prompt": f"shared {i}", "references": SHARED_SETS[i % 3]} for i in range(24)]
    plain = [{"prompt": f"plain {i}"} for i in range(6)]
    jobs = [job for trio in zip(shared[:10], singles, plain + [None] * 4, strict=True) for job in trio if job]
    jobs += shared[10:]
    handle = client.submit(Campaign.from_raw("affinity", jobs, defaults={"width": 256, "height": 256}))
    assert handle.wait(progress=False, timeout=WAIT_S).succeeded == len(jobs)

    lines = manifest(storage, handle.id)
    for references in SHARED_SETS:
        uploaded = [uploaded_locator(client, Path(path)) for path in references]  # what the jobs name
        sources = [line["kv"] for line in lines if line["references"] == uploaded]
        assert len(sources) == 8
        assert sources.count("miss") <= len(workers.alive()), sources
    misses = sum(line["kv"] == "miss" for line in lines)
    wait_for(
        lambda: sum(kv_hits(view) for view in registry.live_workers()) - hits_before >= 24 - 3 * len(workers.alive()),
        "the workers' own hit counters to show the hits",
    )
    assert misses <= 10 + 3 * len(workers.alive())


def test_a_worker_killed_mid_campaign_leaves_every_job_done_exactly_once(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    (victim,) = workers.start(name="victim")
    registry = Registry(client.state, lapse_s=3)
    victim_id = next(view.worker_id for view in registry.live_workers() if view.identity == "victim")
    jobs = [{"prompt": f"big {i}", "width": 1024, "height": 1024, "seed": i} for i in range(12)]
    handle = client.submit(Campaign.from_raw("kill", jobs))

    def victim_is_rendering() -> bool:
        return any(job.state == "running" and job.worker == victim_id for job in client.state.jobs(handle.id))

    wait_for(victim_is_rendering, "the victim to start a job")
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait()
    wait_for(lambda: victim_id not in {view.worker_id for view in registry.live_workers()}, "the victim to lapse")
    wait_for(lambda: not client.state.redis.exists(f"kf:worker:{victim_id}"), "the victim to be retired", 30)
    assert time.monotonic() - killed_at < 30

    status = handle.wait(progress=False, timeout=WAIT_S)
    assert (status.succeeded, status.failed, status.cancelled) == (12, 0, 0)
    rows = {str(line["job_id"]): line for line in manifest(storage, handle.id)}
    assert len(rows) == 12 and all(line["state"] == "succeeded" for line in rows.values())
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"kleinfarm/{handle.id}/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    assert keys == sorted([f"kleinfarm/{handle.id}/manifest.jsonl", *(str(line["key"]) for line in rows.values())])
    assert any(int(str(line["attempt"])) > 1 for line in rows.values())  # the victim's job was run again


def test_a_restarted_worker_is_retired_at_once_by_its_identity_and_not_credited_with_its_old_cache(
    client: FarmClient, workers: WorkerPool
) -> None:
    (first,) = workers.start(name="phoenix")
    registry = Registry(client.state, lapse_s=3)
    old = next(view for view in registry.live_workers() if view.identity == "phoenix")
    jobs = [{"prompt": f"p{i}", "references": SHARED_SETS[i % 3], "width": 256, "height": 256} for i in range(12)]
    handle = client.submit(Campaign.from_raw("before-restart", jobs))
    handle.wait(progress=False, timeout=WAIT_S)

    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    # The old entry stays fresh, as if its process were only slow: its lapse cannot retire it, only
    # the new process registering under the same identity can.
    client.state.redis.zadd(keys.WORKERS, {old.worker_id: client.state.server_time() + 120})
    try:
        workers.start(name="phoenix")
        current = [view for view in registry.live_workers() if view.identity == "phoenix"]
        assert [view.worker_id for view in current] != [old.worker_id] and len(current) == 1
        assert current[0].routes == set()  # nothing of the old process's cache is believed
        assert not client.state.redis.exists(keys.worker(old.worker_id))
        assert client.state.redis.zscore(keys.WORKERS, old.worker_id) is None
    finally:
        registry.retire(old.worker_id, reason="test cleanup")  # a no-op once it was retired
