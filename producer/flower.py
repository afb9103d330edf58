"""``kleinfarm flower``: Flower on the farm's broker, never without authentication."""

from __future__ import annotations

import os
from pathlib import Path

from kleinfarm.shared.broker import make_celery
from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.settings import FarmSettings

MIN_PASSWORD_CHARS = 12
# Passwords that shipped in examples: a farm started with one is not protected.
SAMPLE_PASSWORDS = frozenset({"change-me", "changeme", "password", "admin"})


def check_credentials(credentials: str) -> str:
    """``user:password`` that Flower will compare exactly as given.

    Flower reads its basic-auth option as a comma-separated list, so a comma would split one
    credential into two (a bare fragment would then be accepted, the real one refused); spaces at
    the ends are lost by many env-file readers.
    """
    user, colon, password = credentials.partition(":")
    setting = "KLEINFARM_FLOWER_BASIC_AUTH"
    if not colon or not user or not password:
        raise ConfigError(f"set {setting}=user:password: Flower can stop workers, so it needs auth")
    if "," in credentials:
        raise ConfigError(f"{setting} must not contain a comma: Flower would split it into two credentials")
    if credentials != credentials.strip() or any(char.isspace() for char in user):
        raise ConfigError(f"{setting}: no spaces in the user name or around the credential")
    if len(password) < MIN_PASSWORD_CHARS or password.lower() in SAMPLE_PASSWORDS:
        raise ConfigError(f"{setting}: the password must be at least {MIN_PASSWORD_CHARS} characters, not a sample one")
    return credentials


def require_auth_on_metrics() -> None:
    """Flower serves ``/metrics`` without asking for credentials; make it ask like every other page."""
    from flower.views.monitor import Metrics
    from tornado import web

    Metrics.get = web.authenticated(Metrics.get)  # type: ignore[method-assign]


def run_flower(port: int, address: str, env_file: Path | None) -> None:
    """Serve Flower until stopped. The credentials travel by environment, not argv (``ps`` shows argv)."""
    settings = FarmSettings.from_env(env_file)
    secret = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else ""
    os.environ["FLOWER_BASIC_AUTH"] = check_credentials(secret)
    require_auth_on_metrics()
    app = make_celery(settings)
    # No flowerconfig.py from the working directory may reset the credentials checked above.
    app.start(["flower", "--conf=/dev/null", f"--port={port}", f"--address={address}"])
