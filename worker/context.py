"""Everything one worker process holds: settings, connections, the engine, its identity."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kleinfarm.shared.registry import Registry, worker_queue
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.state import FarmState
from kleinfarm.shared.storage import Storage

if TYPE_CHECKING:
    from kleinfarm.worker.engine import RenderEngine
    from kleinfarm.worker.references import ReferenceFetcher


def new_worker_id(gpu: int | None) -> str:
    """Host, card and an epoch that changes on every start, so a restart is a new worker."""
    host = socket.gethostname().split(".")[0]
    card = f"gpu{gpu}" if gpu is not None else "cpu"
    return f"{host}-{card}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class WorkerContext:
    settings: FarmSettings
    state: FarmState
    registry: Registry
    storage: Storage
    fetcher: ReferenceFetcher
    engine: RenderEngine
    worker_id: str
    counters: dict[str, int] = field(default_factory=lambda: {"succeeded": 0, "failed": 0, "cancelled": 0})

    @property
    def queue(self) -> str:
        return worker_queue(self.worker_id)

    @classmethod
    def build(cls, settings: FarmSettings, engine: RenderEngine, worker_id: str) -> WorkerContext:
        from kleinfarm.worker.references import ReferenceFetcher

        state = FarmState.from_url(settings.redis_url)
        storage = Storage.from_settings(settings)
        return cls(
            settings=settings,
            state=state,
            registry=Registry(state, settings.worker_lapse_s),
            storage=storage,
            fetcher=ReferenceFetcher(storage, settings),
            engine=engine,
            worker_id=worker_id,
        )


_current: WorkerContext | None = None


def install(context: WorkerContext) -> None:
    global _current
    _current = context


def current() -> WorkerContext:
    if _current is None:
        raise RuntimeError("no worker context: start workers with `kleinfarm worker`")
    return _current
