"""Farm-wide queue metrics for Prometheus (``kleinfarm exporter``): what an autoscaler needs.

Each worker serves its own metrics; how many jobs wait, how long the oldest has waited and how many
workers are live are the farm's, read from Redis at scrape time by one small process. KEDA's
Prometheus scaler scales the worker StatefulSet on them (``deploy/k8s/monitoring/``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from kleinfarm.shared import keys
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.state import FarmState

log = logging.getLogger(__name__)
# Campaigns are read oldest first in pages of this many until one with queued jobs is found.
CAMPAIGN_PAGE = 200


@dataclass(frozen=True)
class QueueFigures:
    pending: int  # queued for a worker (paused campaigns' jobs excluded)
    delayed: int  # waiting out a transient fault's backoff
    active: int  # assigned to or running on a worker
    oldest_pending_s: float  # age of the oldest campaign with queued jobs (0 when none)
    live_workers: int
    draining_workers: int
    free_slots: int  # slots live workers offer now (draining ones offer none)
    retirements: dict[str, int]  # workers retired since the farm began, by cause (lapsed, restarted, stopped)


def read_figures(state: FarmState, registry: Registry) -> QueueFigures:
    pipe = state.redis.pipeline(transaction=False)
    pipe.zcard(keys.PENDING)
    pipe.zcard(keys.DELAYED)
    pipe.scard(keys.ACTIVE)
    pipe.hgetall(keys.RETIREMENTS)
    pending, delayed, active, retired = pipe.execute()
    workers = registry.live_workers()
    return QueueFigures(
        pending=int(pending),
        delayed=int(delayed),
        active=int(active),
        oldest_pending_s=oldest_pending_age(state),
        live_workers=len(workers),
        draining_workers=sum(1 for view in workers if view.report.draining),
        free_slots=sum(view.room for view in workers),
        retirements={name.removeprefix("retired_"): int(count) for name, count in retired.items()},
    )


def oldest_pending_age(state: FarmState) -> float:
    """Seconds since the oldest campaign that still has jobs queued (not paused) was submitted."""
    start = 0
    while True:
        page: list[str] = state.redis.zrange(keys.CAMPAIGNS, start, start + CAMPAIGN_PAGE - 1)  # type: ignore[assignment]
        if not page:
            return 0.0
        pipe = state.redis.pipeline(transaction=False)
        for campaign_id in page:
            pipe.hmget(keys.campaign(campaign_id), ["n_pending", "paused", "created"])
        for n_pending, paused, created in pipe.execute():
            if int(n_pending or 0) > 0 and str(paused or "0") in ("0", "") and created:
                return max(time.time() - float(created), 0.0)
        start += CAMPAIGN_PAGE


class QueueCollector(Collector):
    """Reads the figures at scrape time; Redis unreachable is ``kleinfarm_farm_up 0``, not an error page."""

    def __init__(self, state: FarmState, registry: Registry) -> None:
        self.state = state
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            figures = read_figures(self.state, self.registry)
        except (RedisError, OSError, ValueError) as error:  # a scrape answers even when Redis does not
            log.warning("reading the farm's queue failed: %s", error)
            yield GaugeMetricFamily("kleinfarm_farm_up", "1 if the farm's Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("kleinfarm_farm_up", "1 if the farm's Redis answered this scrape", value=1)
        for name, help_text, value in (
            ("pending_jobs", "Jobs queued for a worker (paused campaigns excluded)", figures.pending),
            ("delayed_jobs", "Jobs waiting out a transient fault's backoff", figures.delayed),
            ("active_jobs", "Jobs assigned to or running on a worker", figures.active),
            ("oldest_pending_seconds", "Age of the oldest campaign with queued jobs", figures.oldest_pending_s),
            ("live_workers", "Workers whose heartbeat is current", figures.live_workers),
            ("draining_workers", "Live workers an operator drained", figures.draining_workers),
            ("free_slots", "Job slots live workers offer now", figures.free_slots),
        ):
            yield GaugeMetricFamily(f"kleinfarm_farm_{name}", help_text, value=float(value))
        retired = CounterMetricFamily(
            "kleinfarm_farm_workers_retired", "Workers retired since the farm began, by cause", labels=["cause"]
        )
        for cause, count in sorted(figures.retirements.items()):
            retired.add_metric([cause], float(count))
        yield retired


def serve_queue_metrics(state: FarmState, lapse_s: float, port: int, address: str) -> int:
    """Serve the farm's queue metrics on ``port`` (0 picks one); returns the port."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(state, Registry(state, lapse_s)))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return int(server.server_port)
