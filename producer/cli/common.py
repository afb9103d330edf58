"""What every command group shares: the Typer app, the console, options, the farm client."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from kleinfarm.producer.client import FarmClient

app = typer.Typer(
    help="kleinfarm: a render farm for FLUX.2 \\[klein] 9B-KV.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console(stderr=True)  # stdout stays for what scripts read (ids, JSON)
EnvFile = Annotated[Path | None, typer.Option("--env-file", help="KLEINFARM_* settings file (e.g. .kleinfarm.env)")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]


def default_env_file() -> Path | None:
    """``kleinfarm local`` writes ``.kleinfarm.env`` here; use it when present."""
    path = Path(".kleinfarm.env")
    return path if path.is_file() else None


def farm_client(env_file: Path | None) -> FarmClient:
    from kleinfarm.producer.client import FarmClient

    return FarmClient.from_env(env_file or default_env_file())


def say(message: str) -> None:
    """A line for people, on stderr, printed as plain text: data in it is never read as markup."""
    console.print(message, markup=False, highlight=False)


def print_table(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """Rows as a table on stdout; cells are plain text (a key or an error may hold ``[/]``)."""
    table = Table(*columns)
    for row in rows:
        table.add_row(*(Text("" if row[column] is None else str(row[column])) for column in columns))
    Console().print(table)
