"""``kleinfarm beat``: celery beat with redbeat (the schedule lives in Redis, and redbeat's lock
keeps a second beat from firing it twice), embedded in a small worker that runs the schedule task
on the ``kf.control`` queue. No GPU and no torch needed."""

from __future__ import annotations

import logging
from pathlib import Path

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.schedules import SCHEDULE_TASK, ScheduleBook, beat_app
from kleinfarm.shared import keys

log = logging.getLogger(__name__)


def run_beat(env_file: Path | None) -> None:
    client = FarmClient.from_env(env_file)
    app = beat_app(client)

    @app.task(name=SCHEDULE_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_schedule(name: str) -> str | None:
        handle = ScheduleBook(client).run(name)
        log.info("schedule %s: %s", name, f"submitted campaign {handle.id}" if handle else "nothing new")
        return handle.id if handle else None

    app.worker_main(["worker", "--beat", "--pool=solo", "-Q", keys.CONTROL_QUEUE, "--loglevel=INFO", "-n", "beat@%h"])
