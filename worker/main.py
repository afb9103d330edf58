"""``kleinfarm worker``: one Celery worker process per GPU, with heartbeat and dispatcher threads."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from kleinfarm.shared.logs import configure_logging, set_log_context
from kleinfarm.shared.settings import FarmSettings

log = logging.getLogger(__name__)


def pin_gpu(gpu: int | None) -> None:
    """Make ``gpu`` the only visible card; must run before torch is imported."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def run_worker(
    gpu: int | None = None, model: str | None = None, env_file: Path | None = None, profile: str | None = None
) -> None:
    """Load the model once, join the farm, and serve jobs until stopped."""
    settings = FarmSettings.from_env(env_file)
    overrides = {"model": model, "gpu": gpu, "profile": profile}
    settings = settings.model_copy(update={key: value for key, value in overrides.items() if value is not None})
    pin_gpu(settings.gpu)
    configure_logging(settings.log_format)
    # Before the model load: a cache it cannot write or storage it cannot use fails now, in one line.
    from kleinfarm.worker.preflight import preflight

    preflight(settings)

    # Imported only now: torch must not initialise CUDA before the card is pinned.
    from kleinfarm.shared.broker import make_celery
    from kleinfarm.shared.routing import policy_by_name
    from kleinfarm.worker import context
    from kleinfarm.worker.context import WorkerContext, default_identity
    from kleinfarm.worker.engine import RenderEngine
    from kleinfarm.worker.farm.dispatcher import Dispatcher
    from kleinfarm.worker.farm.heartbeat import beat_until
    from kleinfarm.worker.hostmem import apply_budgets
    from kleinfarm.worker.tasks import register_tasks

    card_bytes = settings.card_memory_mb << 20 if settings.card_memory_mb else None
    device = "cuda" if settings.gpu is not None else None
    engine = RenderEngine.load(model_source(settings), device, None, settings.profile, card_bytes, settings.fp8)
    engine.model = model_label(settings)
    apply_budgets(engine, settings)
    ctx = WorkerContext.build(settings, engine, settings.worker_name or default_identity(settings.gpu))
    context.install(ctx)
    set_log_context(worker=ctx.worker_id, identity=ctx.identity)
    if settings.metrics_port is not None:
        from kleinfarm.worker.metrics import WorkerMetrics

        ctx.metrics = WorkerMetrics(ctx.engine.report)
        ctx.metrics_port = ctx.metrics.serve(settings.metrics_port)
        log.info("metrics on port %d", ctx.metrics_port)
    app = make_celery(settings)
    register_tasks(app)
    dispatcher = Dispatcher(app, ctx.state, ctx.registry, settings.heartbeat_s, policy_by_name(settings.routing_policy))
    stop = threading.Event()
    threads = [
        threading.Thread(target=beat_until, args=(ctx, stop), name="heartbeat", daemon=True),
        threading.Thread(target=dispatcher.run_forever, name="dispatcher", daemon=True),
    ]
    for thread in threads:
        thread.start()
    log.info("worker %s serving queue %s", ctx.worker_id, ctx.queue)
    try:
        # Solo pool: the task runs in this process, which never forks after CUDA is initialised.
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "-Q",
                ctx.queue,
                "-n",
                f"{ctx.worker_id}@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "-E",
            ]
        )
    finally:
        ctx.finisher.drain()  # the last rendered job is stored and recorded before the worker goes
        stop.set()
        dispatcher.stop()
        requeued = ctx.registry.retire(ctx.worker_id, reason="worker stopped")
        log.info("worker %s stopped; %d waiting job(s) handed back", ctx.worker_id, requeued)


def model_source(settings: FarmSettings) -> str:
    """What the engine loads: the model as named, or, pinned to ``KLEINFARM_MODEL_REVISION``, the
    local folder of that revision (diffusers downloads exactly the pipeline's files once)."""
    if settings.model_revision is None or Path(settings.model).is_dir():
        return settings.model
    from diffusers import DiffusionPipeline

    return str(DiffusionPipeline.download(settings.model, revision=settings.model_revision))


def model_label(settings: FarmSettings) -> str:
    """How the worker names its model to the farm and in image metadata: ``id@revision`` when pinned."""
    return f"{settings.model}@{settings.model_revision}" if settings.model_revision else settings.model
