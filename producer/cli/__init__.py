"""The ``kleinfarm`` command line, one module per command group:

``campaigns`` (submit, status, results, cancel, pause, resume, retry, report), ``farm`` (worker,
local, workers, flower, beat), ``schedules`` (schedule add/list/remove/run), ``tools`` (render,
make-tiny-model), ``bench`` (bench submit/kv/routing). Each command imports its role's code when
it runs, so the client install never needs torch.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from kleinfarm.producer.cli import bench, campaigns, farm, schedules, tools
from kleinfarm.producer.cli.common import app, console
from kleinfarm.shared.errors import KleinfarmError

__all__ = ["app", "bench", "campaigns", "farm", "main", "schedules", "tools"]


def main() -> None:
    """Every command's farm error ends the same way: its message on stderr, exit status 2."""
    try:
        sys.exit(app())
    except KleinfarmError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        sys.exit(2)
