"""An operator's commands on a running farm: drain and undrain a worker, the queue exporter."""

from __future__ import annotations

import logging
import threading
import time

from kleinfarm.producer.cli.common import say
from kleinfarm.producer.client import FarmClient
from kleinfarm.shared.errors import FarmTimeoutError
from kleinfarm.shared.registry import Registry, WorkerView

log = logging.getLogger(__name__)
DRAIN_POLL_S = 1.0


def _registry(client: FarmClient) -> Registry:
    return Registry(client.state, client.settings.worker_lapse_s)


def _named(registry: Registry, name: str) -> WorkerView | None:
    """The live worker whose identity (or worker id) is ``name``."""
    return next((view for view in registry.live_workers() if name in (view.identity, view.worker_id)), None)


def drain_worker(client: FarmClient, name: str, wait: bool, timeout_s: float) -> None:
    """Mark ``name`` drained; with ``wait``, return once it holds no job (or raise at the timeout)."""
    registry = _registry(client)
    view = _named(registry, name)
    identity = view.identity if view else name
    registry.drain(identity)
    say(f"{identity} drained{'' if view else ' (no live worker has that name now; it stays drained)'}")
    if not wait or view is None:
        return
    deadline = time.monotonic() + timeout_s
    while (current := _named(registry, identity)) is not None and (current.assigned or _running(registry, current)):
        if time.monotonic() > deadline:
            raise FarmTimeoutError(f"{identity} still holds {sorted(current.assigned)} after {timeout_s:.0f} s")
        time.sleep(DRAIN_POLL_S)
    say(f"{identity} holds no job")


def _running(registry: Registry, view: WorkerView) -> bool:
    return bool(registry.holding([view.worker_id]).get(view.worker_id))


def undrain_worker(client: FarmClient, name: str) -> None:
    registry = _registry(client)
    view = _named(registry, name)
    identity = view.identity if view else name
    registry.drain(identity, draining=False)
    say(f"{identity} takes jobs again")


def run_exporter(client: FarmClient, port: int, address: str) -> None:
    """Serve the queue metrics until interrupted."""
    from kleinfarm.producer.queue_metrics import serve_queue_metrics

    bound = serve_queue_metrics(client.state, client.settings.worker_lapse_s, port, address)
    say(f"farm queue metrics on http://{address}:{bound}/metrics")
    threading.Event().wait()
