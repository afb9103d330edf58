"""``kleinfarm bench submit``: how fast a campaign goes into the farm (prints JSON figures)."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import RedisServer
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.settings import FarmSettings


def bench_submit(jobs: int, redis_url: str | None, references: int) -> dict[str, float | int]:
    """Validate and submit ``jobs`` edit jobs; time each half. Starts a redis-server if no URL."""
    with ExitStack() as stack:
        if redis_url is None:
            redis_url = stack.enter_context(RedisServer()).url
        client = FarmClient(FarmSettings(redis_url=redis_url))
        refs = [f"s3://products/photo-{index}.png" for index in range(references)]
        raw = [{"prompt": f"product {i} on a white background", "width": 1024, "height": 1024} for i in range(jobs)]
        started = time.perf_counter()
        campaign = Campaign.from_raw("bench", raw, defaults={"references": refs} if refs else None)
        validated = time.perf_counter()
        handle = client.submit(campaign)
        submitted = time.perf_counter()
        assert handle.status().total == jobs
    figures: dict[str, float | int] = {
        "jobs": jobs,
        "validate_s": round(validated - started, 3),
        "submit_s": round(submitted - validated, 3),
        "jobs_per_s": round(jobs / (submitted - started)),
    }
    print(json.dumps(figures))
    return figures
