"""Everything one worker process holds: settings, connections, the engine, its identity."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kleinfarm.shared import keys
from kleinfarm.shared.redis_urls import connect
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.state import FarmState
from kleinfarm.shared.storage import Storage
from kleinfarm.worker.farm.speed import SpeedMeter
from kleinfarm.worker.finisher import Finisher

if TYPE_CHECKING:
    from kleinfarm.worker.engine import RenderEngine
    from kleinfarm.worker.metrics import WorkerMetrics
    from kleinfarm.worker.references import ReferenceFetcher


def default_identity(gpu: int | None) -> str:
    """Host and card; CPU workers on one host are told apart by process."""
    host = socket.gethostname().split(".")[0]
    return f"{host}-gpu{gpu}" if gpu is not None else f"{host}-cpu-{os.getpid()}"


def new_worker_id(identity: str) -> str:
    """The identity plus an epoch that changes on every start, so a restart is a new worker."""
    return f"{identity}-{secrets.token_hex(3)}"


@dataclass
class WorkerContext:
    settings: FarmSettings
    state: FarmState
    registry: Registry
    storage: Storage
    fetcher: ReferenceFetcher
    engine: RenderEngine
    worker_id: str
    identity: str
    counters: dict[str, int] = field(default_factory=lambda: {"succeeded": 0, "failed": 0, "cancelled": 0})
    # The task thread and the finisher both end jobs.
    counters_lock: threading.Lock = field(default_factory=threading.Lock)
    metrics: WorkerMetrics | None = None
    metrics_port: int | None = None
    # Routing key -> the content key its references were cached under.
    routes: dict[str, str] = field(default_factory=dict)
    speed: SpeedMeter = field(default_factory=lambda: SpeedMeter(1.0))
    finisher: Finisher = field(default_factory=Finisher)
    registered: bool = False  # a heartbeat has registered this worker's identity
    # Campaign id -> the model revision it is pinned to: a pin never changes (HSETNX), so it is read once.
    pinned_models: dict[str, str] = field(default_factory=dict)

    def held_routes(self) -> list[str]:
        """Routing keys whose reference K/V this worker holds now, in either tier."""
        held = self.engine.kv_cache.held_keys()
        return sorted(route for route, refset in self.routes.items() if refset in held)

    @property
    def queue(self) -> str:
        return keys.worker_queue(self.worker_id)

    @classmethod
    def build(cls, settings: FarmSettings, engine: RenderEngine, identity: str) -> WorkerContext:
        from kleinfarm.worker.references import ReferenceFetcher

        state = FarmState(connect(settings))
        storage = Storage.from_settings(settings)
        return cls(
            settings=settings,
            state=state,
            registry=Registry(state, settings.worker_lapse_s),
            storage=storage,
            fetcher=ReferenceFetcher(storage, settings),
            engine=engine,
            worker_id=new_worker_id(identity),
            identity=identity,
            speed=SpeedMeter(settings.speed),
        )


_current: WorkerContext | None = None


def install(context: WorkerContext) -> None:
    global _current
    _current = context


def current() -> WorkerContext:
    if _current is None:
        raise RuntimeError("no worker context: start workers with `kleinfarm worker`")
    return _current
