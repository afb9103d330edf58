"""Each worker serves Prometheus metrics: jobs by state, render and wait seconds, its K/V cache."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry

from conftest import WorkerPool

REFS = Path(__file__).parent.parent / "examples" / "refs"


def scrape(client: FarmClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every live worker's samples, summed over workers."""
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for view in Registry(client.state, lapse_s=3).live_workers():
        port = view.report.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def test_workers_count_jobs_render_seconds_and_cache_events(client: FarmClient, workers: WorkerPool) -> None:
    before = scrape(client)
    jobs = [{"prompt": f"m{i}", "references": [str(REFS / "logo.png")]} for i in range(4)]
    handle = client.submit(Campaign.from_raw("metrics", jobs, defaults={"width": 256, "height": 256}))
    assert handle.wait(progress=False, timeout=300).succeeded == 4
    after = scrape(client)

    def grew(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert grew("kleinfarm_jobs_total", (("state", "succeeded"),)) == 4
    assert grew("kleinfarm_render_seconds_count") == 4
    assert grew("kleinfarm_queue_wait_seconds_count") == 4
    cache_lookups = sum(
        grew("kleinfarm_kv_cache_events_total", (("event", event),)) for event in ("hits_device", "misses")
    )
    assert cache_lookups >= 4
    assert after[("kleinfarm_kv_cache_bytes", (("tier", "device"),))] > 0
    assert after[("kleinfarm_memory_bytes", (("kind", "process_peak_rss"),))] > 0


def test_every_series_the_grafana_dashboard_plots_is_served_by_a_worker_or_the_exporter(
    client: FarmClient, workers: WorkerPool
) -> None:
    import json
    import re

    from kleinfarm.producer.queue_metrics import serve_queue_metrics

    dashboard = json.loads((REFS.parent.parent / "deploy" / "grafana" / "kleinfarm-dashboard.json").read_text())
    plotted = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(kleinfarm_[a-z_]+)", target["expr"])
    }
    # A job ended and a retirement counted: every labelled series has a sample.
    handle = client.submit(Campaign.from_raw("dashboard", [{"prompt": "d", "width": 256, "height": 256}]))
    assert handle.wait(progress=False, timeout=300).succeeded == 1
    client.state.redis.hincrby(keys.RETIREMENTS, "retired_lapsed", 0)
    port = serve_queue_metrics(client.state, 3, 0, "127.0.0.1")
    exporter = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    served = {name for name, _labels in scrape(client)}
    served |= {sample.name for family in text_string_to_metric_families(exporter) for sample in family.samples}
    assert len(plotted) >= 10 and not plotted - served, sorted(plotted - served)
