"""``kleinfarm flower``: Flower on the farm's broker, never without authentication."""

from __future__ import annotations

import os
from pathlib import Path

from kleinfarm.shared.broker import make_celery
from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.settings import FarmSettings


def run_flower(port: int, address: str, env_file: Path | None) -> None:
    """Serve Flower until stopped. The credentials travel by environment, not argv (``ps`` shows argv)."""
    settings = FarmSettings.from_env(env_file)
    credentials = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else ""
    user, _, password = credentials.partition(":")
    if not user or not password:
        raise ConfigError("set KLEINFARM_FLOWER_BASIC_AUTH=user:password: Flower can stop workers, so it needs auth")
    os.environ["FLOWER_BASIC_AUTH"] = credentials
    app = make_celery(settings)
    app.start(["flower", f"--port={port}", f"--address={address}"])
