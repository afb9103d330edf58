"""Log lines as JSON objects (``KLEINFARM_LOG_FORMAT=json``) carrying the worker, campaign and job
ids, so a log pipeline can follow one job across workers without parsing messages."""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ids of the whole process (the worker), seen by every thread; and of what the current task works
# on (a job), per context, so a thread beside it does not inherit them.
_PROCESS: dict[str, str] = {}
_CONTEXT: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("kleinfarm_log_context", default={})  # noqa: B039


def set_log_context(**ids: str) -> None:
    """Ids every later log line of this process carries (the worker's id, once it is known)."""
    _PROCESS.update(ids)


@contextmanager
def log_context(**ids: str) -> Iterator[None]:
    """Ids carried by the log lines written inside the block (a job's campaign and id)."""
    token = _CONTEXT.set({**_CONTEXT.get(), **ids})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the context's ids, any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_PROCESS,
            **_CONTEXT.get(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """The root logger writes ``log_format`` lines; Celery's own setup is pointed at it too."""
    logging.basicConfig(level=level, format=TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(log_format))
    if log_format == "json":
        from celery.signals import after_setup_logger, after_setup_task_logger

        def use_json(logger: logging.Logger, **_: object) -> None:
            for handler in logger.handlers:
                handler.setFormatter(JsonFormatter())

        after_setup_logger.connect(use_json, weak=False)
        after_setup_task_logger.connect(use_json, weak=False)
