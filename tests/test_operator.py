"""What an operator runs a farm with: a worker drained and undrained, the farm's queue metrics, host
memory read from the cgroup and shared among a host's workers, JSON logs, the checks a worker makes
before its model load, and two workers that share a name not retiring each other for ever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.queue_metrics import read_figures, serve_queue_metrics
from kleinfarm.shared import keys
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.records import WorkerReport
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.worker.farm.heartbeat import keep_identity_unique
from kleinfarm.worker.hostmem import Budgets, HostShare, cgroup_memory_limit, plan_budgets

from conftest import WorkerPool, settings_from

GIB = 1 << 30
MIB = 1 << 20
DRAIN_DATABASE = 5
WAIT_S = 60.0


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kleinfarm.producer", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_until(condition: object, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def one_full_dispatch_round(client: FarmClient) -> None:
    """Return once the dispatcher has run a whole round that began after this call."""
    for _ in range(2):  # the second wake is consumed only after a round that followed the first
        client.state.redis.rpush(keys.WAKE, "test")
        wait_until(lambda: client.state.redis.llen(keys.WAKE) == 0, "the dispatcher to take its wake-up")


def test_a_drained_worker_gets_no_job_until_undrained_and_the_queue_metrics_say_so(
    farm_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **farm_env,
        "KLEINFARM_REDIS_URL": farm_env["KLEINFARM_REDIS_URL"].rsplit("/", 1)[0] + f"/{DRAIN_DATABASE}",
        "KLEINFARM_KV_HOST_BUDGET_MB": "64",  # alone: it used to count only if all three were set
        "KLEINFARM_LOG_FORMAT": "json",
    }
    client = FarmClient(settings_from(env))
    client.state.redis.flushdb()
    pool = WorkerPool(env, tmp_path)
    try:
        pool.start(1, name="drain-test-gpu0")
        registry = Registry(client.state, lapse_s=3)
        (view,) = registry.live_workers()
        assert view.report.engine.kv.host.budget == 64 * MIB

        drained = cli(env, "worker", "drain", "drain-test-gpu0")
        assert drained.returncode == 0, drained.stderr
        wait_until(lambda: registry.live_workers()[0].report.slots == 0, "the drained worker's heartbeat")
        assert registry.live_workers()[0].report.draining

        handle = client.submit(Campaign.from_raw("drained", [{"prompt": "a", "width": 256, "height": 256}] * 2))
        one_full_dispatch_round(client)
        assert client.state.redis.zcard(keys.PENDING) == 2
        assert registry.assigned(view.worker_id) == []
        figures = read_figures(client.state, registry)
        assert (figures.pending, figures.live_workers, figures.draining_workers, figures.free_slots) == (2, 1, 1, 0)
        assert figures.oldest_pending_s > 0
        port = serve_queue_metrics(client.state, 3, 0, "127.0.0.1")
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "kleinfarm_farm_pending_jobs 2.0" in scraped and "kleinfarm_farm_up 1.0" in scraped

        undrained = cli(env, "worker", "undrain", "drain-test-gpu0")
        assert undrained.returncode == 0, undrained.stderr
        assert handle.wait(progress=False, timeout=WAIT_S).succeeded == 2
        assert read_figures(client.state, registry).pending == 0
    finally:
        pool.stop()
        client.state.redis.flushdb()
    lines = [json.loads(line) for line in pool.logs().splitlines() if line.startswith("{")]
    job_lines = [line for line in lines if line.get("job", "").startswith(handle.id)]
    assert job_lines and all(line["worker"] == view.worker_id for line in job_lines)


def test_a_worker_stops_before_its_model_load_when_its_cache_cannot_be_written(
    farm_env: dict[str, str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**farm_env, "KLEINFARM_CACHE_DIR": str(blocker / "cache"), "KLEINFARM_MODEL": "no/such-model"}
    result = cli(env, "worker")
    assert result.returncode == 2
    assert f"KLEINFARM_CACHE_DIR {blocker / 'cache'} is not writable" in result.stderr
    assert "no/such-model" not in result.stderr + result.stdout  # it never got as far as the model


def test_a_worker_creates_the_farms_bucket_before_its_model_load(farm_env: dict[str, str], tmp_path: Path) -> None:
    from kleinfarm.shared.storage import Storage

    env = {**farm_env, "KLEINFARM_S3_BUCKET": "fresh-bucket", "KLEINFARM_MODEL": str(tmp_path / "no-model")}
    result = cli(env, "worker")
    assert result.returncode != 0  # the model is missing: the bucket came first
    storage = Storage.from_settings(settings_from(env))
    storage.client.head_bucket(Bucket="fresh-bucket")


def test_a_live_worker_whose_name_another_took_goes_on_under_its_own_id(scratch_farm: FarmClient) -> None:
    registry = Registry(scratch_farm.state, lapse_s=10)
    ctx = SimpleNamespace(registry=registry, identity="farm-gpu0", worker_id="farm-gpu0-aaaaaa", registered=False)
    registry.heartbeat("farm-gpu0-bbbbbb", WorkerReport(identity="farm-gpu0", queue="q", pid=1))
    keep_identity_unique(ctx)  # type: ignore[arg-type]
    assert ctx.identity == "farm-gpu0"  # not registered yet: a restart takes the name over
    ctx.registered = True
    keep_identity_unique(ctx)  # type: ignore[arg-type]
    assert ctx.identity == "farm-gpu0-aaaaaa"
    assert registry.holder("farm-gpu0") == "farm-gpu0-bbbbbb"  # the other one keeps it


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_cgroup_memory_limit_is_read_from_v2_and_v1_and_the_lowest_on_the_path_binds(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/farm.slice/worker.scope\n")
    write(tmp_path / "v2" / "farm.slice" / "memory.max", str(48 * GIB))
    write(tmp_path / "v2" / "farm.slice" / "worker.scope" / "memory.max", "max")
    assert cgroup_memory_limit(tmp_path / "v2", proc) == 48 * GIB
    write(proc, "0::/\n")  # inside a container's cgroup namespace
    write(tmp_path / "v2" / "memory.max", str(64 * GIB))
    assert cgroup_memory_limit(tmp_path / "v2", proc) == 64 * GIB
    write(proc, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    write(tmp_path / "v1" / "memory" / "docker" / "abc" / "memory.limit_in_bytes", str(32 * GIB))
    assert cgroup_memory_limit(tmp_path / "v1", proc) == 32 * GIB
    write(tmp_path / "v1" / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_memory_limit(tmp_path / "v1", proc) is None  # v1's "no limit"


def test_host_caches_fit_the_workers_share_of_the_limit_and_one_budget_variable_counts_alone() -> None:
    settings = FarmSettings(host_workers=2)
    share = HostShare.measure(settings, limit=64 * GIB, physical=512 * GIB)
    assert (share.source, share.share) == ("cgroup", 32 * GIB)
    # A 5090 profile: the engine planned a quarter of the machine (128 GiB) for host K/V.
    default = Budgets(kv_device=8 * GIB, kv_host=128 * GIB, prompts=GIB // 2)
    text_encoder_in_host_memory = 16 * GIB
    planned = plan_budgets(settings, share, text_encoder_in_host_memory, default)
    assert planned == Budgets(8 * GIB, 32 * GIB - 16 * GIB - 4 * GIB, GIB // 2)
    squeezed = plan_budgets(settings, HostShare(40 * GIB, "cgroup", 2, 20 * GIB), text_encoder_in_host_memory, default)
    assert squeezed.kv_host == 0  # nothing left beside the encoder: no host tier, not the OOM killer
    alone = plan_budgets(FarmSettings(kv_host_budget_mb=1024), share, 0, default)
    assert alone == Budgets(8 * GIB, GIB, GIB // 2)
    assert HostShare.measure(FarmSettings(), limit=None, physical=256 * GIB).share == 256 * GIB
