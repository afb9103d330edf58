"""The ``kleinfarm`` command line, one module per command group:

``campaigns`` (submit, status, results, cancel, pause, resume, retry, report), ``farm`` (worker,
local, workers, flower, beat), ``schedules`` (schedule add/list/remove/run), ``tools`` (render,
make-tiny-model), ``bench`` (bench submit/kv/routing). Each command imports its role's code when
it runs, so the client install never needs torch.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import redis.exceptions
from rich.markup import escape

from kleinfarm.producer.cli import bench, campaigns, farm, schedules, tools
from kleinfarm.producer.cli.common import app, console, redis_unreachable, shown
from kleinfarm.shared.errors import KleinfarmError

__all__ = ["app", "bench", "campaigns", "farm", "main", "schedules", "tools"]


def main() -> None:
    """Every command's farm error ends the same way: its message on stderr, exit status 2.

    Redis unreachable is one line naming it too (S3 unreachable already is a farm error,
    ``StorageUnavailableError``): an operator needs the URL, not a 60-line traceback.
    """
    try:
        sys.exit(app())
    except KleinfarmError as error:
        fail(str(error))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        fail(redis_unreachable(error))


def fail(message: str) -> NoReturn:
    # soft_wrap: rich would otherwise break a long line at the terminal's (or 80) columns.
    console.print(f"[red]error:[/red] {escape(shown(message))}", highlight=False, emoji=False, soft_wrap=True)
    sys.exit(2)
