"""``kleinfarm bench farm`` on CPU with the tiny model: both farms render every job of one campaign
(real redis-server, S3 server, kleinfarm workers and plain Celery workers), and the figures come
from the jobs' own records. The speed figures are the benchmark's to print, not asserted here."""

from __future__ import annotations

from typing import Any

from kleinfarm.producer.bench.farm import FarmPlan, run


def test_both_farms_render_the_whole_campaign_and_report_their_figures() -> None:
    rows: list[dict[str, Any]] = []
    summary = run(FarmPlan(jobs=10, sets=2, devices=("cpu",)), say=rows.append)
    ours, theirs = rows[0], rows[1]
    assert summary["all_rendered"] and ours["rendered"] == theirs["rendered"] == 10
    assert ours["farm"] == "kleinfarm" and ours["kv_hits"] > 0 and theirs["kv_hits"] == 0
    for row in (ours, theirs):
        assert row["images_per_hour"] > 0 and row["latency_p95_s"] >= row["latency_p50_s"] > 0
        (busy,) = row["busy_fraction"].values()  # one device: one worker in each farm
        assert 0 < busy <= 1
    assert summary["kleinfarm_over_plain"] > 0
