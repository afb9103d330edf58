"""The farm keeps its promises under faults: worker kills and S3 outages during one campaign."""

from __future__ import annotations

from kleinfarm.producer.bench.chaos import ChaosPlan, run_chaos


def test_a_campaign_through_worker_kills_and_s3_outages_keeps_every_promise() -> None:
    figures = run_chaos(ChaosPlan(workers=2, jobs=30, kills=1, outages=1, outage_s=2.0, gap_s=1.5, seed=3))
    assert figures["broken"] == []
    assert len(figures["faults"]) == 2  # the faults really happened while the campaign ran
    assert figures["succeeded"] == figures["jobs"] - figures["expected_failed"]
