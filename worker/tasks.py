"""The Celery tasks. Their arguments are what Flower shows: readable, and never a secret."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from kleinfarm.shared.broker import EDIT_TASK, GENERATE_TASK
from kleinfarm.shared.errors import JobFailedError
from kleinfarm.shared.states import JobState
from kleinfarm.worker import context
from kleinfarm.worker.jobrunner import run_job


def register_tasks(app: Celery) -> None:
    """Register ``kleinfarm.generate`` and ``kleinfarm.edit`` on ``app``; both run one farm job."""

    def render(task: Task, job: str, attempt: int, **shown: Any) -> str:
        ctx = context.current()
        final = run_job(ctx, job, attempt, task.send_event)
        if final == JobState.FAILED:
            # Recorded already; raising makes the task FAILURE in Flower, with the job's message.
            raise JobFailedError(ctx.state.job(job).error or "failed")
        return final

    for name in (GENERATE_TASK, EDIT_TASK):
        app.task(name=name, bind=True, acks_late=True, ignore_result=True)(render)
