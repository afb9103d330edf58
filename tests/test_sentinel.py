"""Redis without a single point of failure (issue 12): the farm on Sentinel URLs goes on when its
master dies mid-campaign, and every job ends once.

A real master, replica and three Sentinels (``producer/localfarm/sentinel.py``), the S3 server and
two worker processes on the tiny model, all on ``sentinel://`` URLs. The master is killed while
the campaign renders; the Sentinels promote the replica, the workers, the dispatcher and the
client's ``wait()`` find it, and the reconciler gives back what the last unreplicated writes lost.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.sentinel import SentinelRedis, sentinel_redis
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.redis_urls import SentinelURL, connect
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool, settings_from

JOBS = 24
WAIT_S = 400


@pytest.fixture()
def sentinels() -> Iterator[SentinelRedis]:
    with sentinel_redis() as group:
        yield group


def test_a_sentinel_url_names_the_sentinels_the_password_and_the_database() -> None:
    parsed = SentinelURL.parse("sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://h3:5000")
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("h3", 5000))
    assert (parsed.password, parsed.db) == ("pw", 2)
    encoded = SentinelURL.parse("sentinel://farm:p%40ss@h:1/3;sentinel://other:pw@h2:2/5")
    assert (encoded.username, encoded.password, encoded.db) == ("farm", "p@ss", 3)  # the first part's, decoded


def test_the_farm_goes_on_when_the_master_dies_mid_campaign_and_every_job_ends_once(
    sentinels: SentinelRedis, farm_env: dict[str, str], storage: Storage, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {**farm_env, "KLEINFARM_REDIS_URL": sentinels.url, "KLEINFARM_WORKER_LAPSE_S": "10"}
    settings = settings_from(env)
    assert connect(settings).ping()
    pool = WorkerPool(env, tmp_path_factory.mktemp("sentinel-worker-logs"))
    try:
        pool.start(2)
        client = FarmClient(settings)
        raw = [{"prompt": f"failover {index}"} for index in range(JOBS)]
        handle = client.submit(Campaign.from_raw("failover", raw, defaults={"width": 256, "height": 256}))
        deadline = time.monotonic() + WAIT_S
        while handle.status().succeeded < 3:
            assert time.monotonic() < deadline, pool.logs()[-3000:]
            time.sleep(0.2)
        old_master = sentinels.master.port
        assert sentinels.master.process is not None
        os.kill(sentinels.master.process.pid, signal.SIGKILL)

        status = handle.wait(progress=False, timeout=WAIT_S)
        assert sentinels.current_master_port() == sentinels.replica.port != old_master
        assert (status.succeeded, status.failed, status.cancelled) == (JOBS, 0, 0), pool.logs()[-3000:]
        keys = [row["key"] for row in handle.results()]
        assert len(set(keys)) == JOBS
        prefix = f"kleinfarm/{handle.id}/"
        listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=prefix)
        images = [item["Key"] for item in listed.get("Contents", []) if item["Key"].endswith(".png")]
        assert sorted(images) == sorted(keys)  # each once: no image lost, none written under another key
        assert len(pool.alive()) == 2
    finally:
        pool.stop()
