"""The Celery side of the contract: task names and the app every role builds on the Redis broker.

JSON only, one job at a time per GPU process; the settings answer the traps listed in
``docs/architecture.md`` ("Celery with Redis").
"""

from __future__ import annotations

import ssl

from celery import Celery

from kleinfarm.shared import keys
from kleinfarm.shared.redis_urls import celery_transport_options
from kleinfarm.shared.settings import FarmSettings

GENERATE_TASK = "kleinfarm.generate"
EDIT_TASK = "kleinfarm.edit"


def make_celery(settings: FarmSettings) -> Celery:
    """A Celery app configured against the known traps of Celery on Redis."""
    app = Celery("kleinfarm", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # a pickled message is refused, never executed
        result_accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,  # the farm's own state in Redis is the record
        task_acks_late=True,
        worker_prefetch_multiplier=1,  # prefetch defeats affinity and starves GPU tasks
        task_reject_on_worker_lost=False,  # the registry requeues a lost job, with an attempt limit
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            **celery_transport_options(settings),  # the master's name, when the URL names Sentinels
        },
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_hijack_root_logger=False,
        task_default_queue=keys.DEFAULT_QUEUE,
    )
    if tls := redis_tls(settings.redis_url):
        app.conf.broker_use_ssl = tls
    return app


def redis_tls(url: str) -> dict[str, object] | None:
    """TLS options for a ``rediss://`` URL (kombu needs them spelled out): verify the server."""
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED} if url.startswith("rediss://") else None
