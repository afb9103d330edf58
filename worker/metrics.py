"""Prometheus metrics of one worker: jobs by state, render and queue-wait seconds, its caches."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kleinfarm.shared.records import EngineReport

SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800, 3600)


class CacheCollector(Collector):
    """Reads the engine's cache report at scrape time, so the figures are never stale."""

    def __init__(self, report: Callable[[], EngineReport]) -> None:
        self.report = report

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self.report()
        kv, stats = engine.kv, engine.kv.stats
        # Counters (they only grow while the worker lives), so dashboards can take their rate.
        events = CounterMetricFamily("kleinfarm_kv_cache_events", "Reference K/V cache events", labels=["event"])
        for event in ("hits_device", "hits_host", "misses", "demotions", "evictions"):
            events.add_metric([event], float(stats.get(event, 0)))
        yield events
        held = GaugeMetricFamily("kleinfarm_kv_cache_bytes", "Bytes of reference K/V held", labels=["tier"])
        budget = GaugeMetricFamily("kleinfarm_kv_cache_budget_bytes", "Byte budget of each tier", labels=["tier"])
        for name, tier in (("device", kv.device), ("host", kv.host)):
            held.add_metric([name], float(sum(tier.keys.values())))
            budget.add_metric([name], float(tier.budget))
        yield held
        yield budget
        memory = GaugeMetricFamily("kleinfarm_memory_bytes", "Memory in use by the worker", labels=["kind"])
        for kind, value in engine.memory.items():
            memory.add_metric([kind], float(value))
        yield memory


class WorkerMetrics:
    """The worker's own registry, served on ``port`` (0 picks a free one)."""

    def __init__(self, report: Callable[[], EngineReport]) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("kleinfarm_jobs", "Jobs this worker ended, by state", ["state"], registry=self.registry)
        self.render_seconds = Histogram(
            "kleinfarm_render_seconds", "Seconds rendering a job", buckets=SECONDS_BUCKETS, registry=self.registry
        )
        self.queue_wait_seconds = Histogram(
            "kleinfarm_queue_wait_seconds",
            "Seconds from submission to the start of rendering",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(CacheCollector(report))

    def serve(self, port: int) -> int:
        server, _thread = start_http_server(port, addr="0.0.0.0", registry=self.registry)  # noqa: S104
        return int(server.server_port)

    def job_started(self, wait_s: float | None) -> None:
        if wait_s is not None:
            self.queue_wait_seconds.observe(wait_s)

    def job_ended(self, state: str, render_s: float | None) -> None:
        self.jobs.labels(state=state).inc()
        if render_s is not None:
            self.render_seconds.observe(render_s)
