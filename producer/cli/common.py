"""What every command group shares: the Typer app, the console, options, the farm client."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from kleinfarm.producer.client import FarmClient
    from kleinfarm.shared.settings import FarmSettings

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


@dataclass
class LoadedSettings:
    """The settings the running command loaded: an error can then name the service it could not
    reach as this command saw it (the env file included)."""

    settings: FarmSettings | None = None


LOADED = LoadedSettings()


def farm_settings(env_file: Path | None) -> FarmSettings:
    from kleinfarm.shared.settings import FarmSettings

    LOADED.settings = FarmSettings.from_env(env_file or default_env_file())
    return LOADED.settings


def farm_client(env_file: Path | None) -> FarmClient:
    from kleinfarm.producer.client import FarmClient

    return FarmClient(farm_settings(env_file))


def redis_unreachable(error: Exception) -> str:
    """One line naming the Redis this command could not reach (without its password) and why."""
    return f"cannot reach Redis at {shown_url(_redis_url())} (KLEINFARM_REDIS_URL): {_reason(error)}"


def _redis_url() -> str:
    if LOADED.settings is not None:
        return LOADED.settings.redis_url
    from kleinfarm.shared.settings import FarmSettings

    try:  # a command that read its settings itself (beat, flower): read them the same way
        return FarmSettings.from_env(default_env_file()).redis_url
    except (ValueError, OSError):
        return "(the configured URL)"


def shown_url(url: str) -> str:
    """``url`` without user, password or query (a Redis URL may carry ``?password=``)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _reason(error: Exception) -> str:
    """The operating system's reason (``Connection refused``) when there is one, else the error."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return " ".join(str(error).split()) or type(error).__name__


def shown(text: str) -> str:
    """``text`` safe for a terminal: control and bidi characters (escape sequences, hyperlinks,
    reordering) shown as their code points."""
    return "".join(char if _printable(char) else f"\\u{ord(char):04x}" for char in text)


def _printable(char: str) -> bool:
    return char.isprintable() and unicodedata.category(char) != "Cf"


def say(message: str) -> None:
    """A line for people, on stderr, printed as plain text: data in it is never read as markup."""
    console.print(shown(message), markup=False, highlight=False, emoji=False)


def print_table(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """Rows as a table on stdout; cells are plain text (a key or an error may hold ``[/]``)."""
    table = Table(*columns)
    for row in rows:
        table.add_row(*(Text(shown("" if row[column] is None else str(row[column]))) for column in columns))
    Console().print(table)
