"""``kleinfarm worker``: one Celery worker process per GPU, with heartbeat and dispatcher threads."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from kleinfarm.shared.settings import FarmSettings

if TYPE_CHECKING:
    from kleinfarm.worker.engine import CacheBudgets

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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Imported only now: torch must not initialise CUDA before the card is pinned.
    from kleinfarm.shared.broker import make_celery
    from kleinfarm.shared.routing import policy_by_name
    from kleinfarm.worker import context
    from kleinfarm.worker.context import WorkerContext, default_identity
    from kleinfarm.worker.engine import RenderEngine
    from kleinfarm.worker.farm.dispatcher import Dispatcher
    from kleinfarm.worker.farm.heartbeat import beat_until
    from kleinfarm.worker.tasks import register_tasks

    card_bytes = settings.card_memory_mb << 20 if settings.card_memory_mb else None
    device = "cuda" if settings.gpu is not None else None
    engine = RenderEngine.load(
        settings.model, device, budgets_from(settings), settings.profile, card_bytes, settings.fp8
    )
    ctx = WorkerContext.build(settings, engine, settings.worker_name or default_identity(settings.gpu))
    context.install(ctx)
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
        stop.set()
        dispatcher.stop()
        requeued = ctx.registry.retire(ctx.worker_id, reason="worker stopped")
        log.info("worker %s stopped; %d waiting job(s) handed back", ctx.worker_id, requeued)


def budgets_from(settings: FarmSettings) -> CacheBudgets | None:
    """Budgets set in MiB override the profile's, all three or none."""
    from kleinfarm.worker.engine import CacheBudgets

    sizes = (settings.kv_device_budget_mb, settings.kv_host_budget_mb, settings.prompt_cache_mb)
    if any(size is None for size in sizes):
        return None
    device, host, prompts = (int(size or 0) << 20 for size in sizes)
    return CacheBudgets(kv_device=device, kv_host=host, prompts=prompts)
