"""The worker's heartbeat: every few seconds, say it is alive and what it holds."""

from __future__ import annotations

import logging
import os
import threading

from kleinfarm.shared.records import WorkerReport
from kleinfarm.worker.context import WorkerContext
from kleinfarm.worker.farm.holding import HELD

log = logging.getLogger(__name__)


def worker_report(ctx: WorkerContext, draining: bool = False) -> WorkerReport:
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
        # Draining: no free slot, so the dispatcher (which fills free slots only) hands it nothing.
        slots=0 if draining else ctx.settings.worker_slots,
        draining=draining,
        device=str(ctx.engine.device),
        gpu=ctx.settings.gpu,
        model=ctx.engine.model,
        metrics_port=ctx.metrics_port,
        routes=ctx.held_routes(),
        counters=dict(ctx.counters),
        engine=engine,
    )


def beat_once(ctx: WorkerContext) -> None:
    """One heartbeat: alive, what it holds, and whether an operator drained it."""
    keep_identity_unique(ctx)
    draining = ctx.registry.is_draining(ctx.identity)
    ctx.registry.heartbeat(ctx.worker_id, worker_report(ctx, draining), holding=HELD.snapshot())
    ctx.registered = True


def keep_identity_unique(ctx: WorkerContext) -> None:
    """Leave an identity another live worker took after this one registered it.

    A new process taking a card's identity retires the previous one (a restart). If this worker is
    alive and sees its identity taken, two machines share a name (every compose host called
    ``farm``): taking it back would retire the other, which would take it back in turn, for ever.
    So this worker goes on under its own unique id, and says loudly what to fix.
    """
    if not ctx.registered:
        return
    holder = ctx.registry.holder(ctx.identity)
    if holder is None or holder == ctx.worker_id:
        return
    log.error(
        "identity %s was taken by worker %s while this worker (%s) is alive: two workers share a name; "
        "give each machine its own (FARM_HOST in compose, KLEINFARM_WORKER_NAME); going on as %s",
        ctx.identity,
        holder,
        ctx.worker_id,
        ctx.worker_id,
    )
    ctx.identity = ctx.worker_id


def beat_until(ctx: WorkerContext, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            beat_once(ctx)
        except Exception:  # a dead heartbeat thread would get a working worker reaped
            log.exception("heartbeat failed; retrying")
        stop.wait(ctx.settings.heartbeat_s)
