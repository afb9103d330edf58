"""The worker's heartbeat: every few seconds, say it is alive and what it holds."""

from __future__ import annotations

import logging
import os
import threading

from kleinfarm.shared.records import WorkerReport
from kleinfarm.worker.context import WorkerContext
from kleinfarm.worker.farm.holding import HELD

log = logging.getLogger(__name__)


def worker_report(ctx: WorkerContext) -> WorkerReport:
    """What the farm needs to know of this worker right now."""
    engine = ctx.engine.report()
    if engine.capability is not None:
        engine = engine.model_copy(
            update={"capability": engine.capability.model_copy(update={"speed": ctx.speed.speed})}
        )
    return WorkerReport(
        identity=ctx.identity,
        queue=ctx.queue,
        pid=os.getpid(),
        slots=ctx.settings.worker_slots,
        device=str(ctx.engine.device),
        gpu=ctx.settings.gpu,
        model=ctx.engine.model,
        metrics_port=ctx.metrics_port,
        routes=ctx.held_routes(),
        counters=dict(ctx.counters),
        engine=engine,
    )


def beat_until(ctx: WorkerContext, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            ctx.registry.heartbeat(ctx.worker_id, worker_report(ctx), holding=HELD.snapshot())
        except Exception:  # a dead heartbeat thread would get a working worker reaped
            log.exception("heartbeat failed; retrying")
        stop.wait(ctx.settings.heartbeat_s)
