"""One Redis URL for every part of the farm: a server, or a master that Redis Sentinel watches.

``KLEINFARM_REDIS_URL`` is either a server (``redis://``, ``rediss://``) or, for a farm without a
single point of failure, its Sentinels in kombu's form::

    sentinel://[:PASSWORD@]HOST:PORT[/DB];sentinel://HOST:PORT;...

with the master's name in ``KLEINFARM_REDIS_SENTINEL_MASTER``. The password is the data nodes'
(master and replicas); Sentinels with their own ``requirepass`` take
``KLEINFARM_REDIS_SENTINEL_PASSWORD``. The farm's state, Celery's broker, Flower and the beat
schedule all find the current master through the Sentinels, so after a failover each reconnects
to the promoted replica by itself; the reconciler recovers what the last unreplicated writes lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import redis
from redis.sentinel import Sentinel

from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.settings import FarmSettings

SENTINEL_SCHEME = "sentinel"
# A Sentinel or master that does not answer within this long is skipped for the next one.
SOCKET_TIMEOUT_S = 5.0


def is_sentinel(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


@dataclass(frozen=True)
class SentinelURL:
    """The Sentinels of a ``sentinel://`` URL, the data nodes' password and the database."""

    sentinels: tuple[tuple[str, int], ...]
    password: str | None
    db: int
    username: str | None = None  # a Redis ACL user, as kombu sends it

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        """As kombu reads it: every part names a Sentinel; the first names the credentials and database."""
        parts = [urlparse(part.strip()) for part in url.split(";")]
        for part in parts:
            if part.scheme != SENTINEL_SCHEME or not part.hostname:
                raise ConfigError(f"KLEINFARM_REDIS_URL: {part.geturl()!r} is not sentinel://HOST:PORT")
        first = parts[0]
        password = unquote(first.password) if first.password else None
        username = unquote(first.username) if first.username else None
        db = int(first.path.strip("/") or 0)
        return cls(tuple((part.hostname or "", part.port or 26379) for part in parts), password, db, username)


def connect(settings: FarmSettings) -> redis.Redis:
    """A client of the farm's Redis (the current master, when Sentinels are named)."""
    if not is_sentinel(settings.redis_url):
        return redis.Redis.from_url(settings.redis_url, decode_responses=True)
    parsed = SentinelURL.parse(settings.redis_url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels),
        socket_timeout=SOCKET_TIMEOUT_S,
        sentinel_kwargs=_sentinel_auth(settings) or None,
        password=parsed.password,
        username=parsed.username,
    )
    # No socket timeout on the master: the dispatcher blocks on it for a tick at a time.
    return sentinel.master_for(settings.redis_sentinel_master, decode_responses=True, db=parsed.db)  # type: ignore[no-any-return, no-untyped-call]


def celery_transport_options(settings: FarmSettings) -> dict[str, Any]:
    """What kombu's Redis transport needs beyond the URL to find the master."""
    if not is_sentinel(settings.redis_url):
        return {}
    options: dict[str, Any] = {"master_name": settings.redis_sentinel_master}
    if auth := _sentinel_auth(settings):
        options["sentinel_kwargs"] = auth
    return options


def redbeat_settings(settings: FarmSettings) -> dict[str, Any]:
    """The beat schedule's Redis (redbeat's own ``redis-sentinel://`` form for Sentinels)."""
    if not is_sentinel(settings.redis_url):
        return {"redbeat_redis_url": settings.redis_url, "redbeat_redis_options": {}}
    parsed = SentinelURL.parse(settings.redis_url)
    options: dict[str, Any] = {
        "sentinels": list(parsed.sentinels),
        "service_name": settings.redis_sentinel_master,
        "db": parsed.db,
        "socket_timeout": SOCKET_TIMEOUT_S,
    }
    if parsed.password:
        options["password"] = parsed.password
    if parsed.username:
        options["username"] = parsed.username
    if auth := _sentinel_auth(settings):
        options["sentinel_kwargs"] = auth
    return {"redbeat_redis_url": "redis-sentinel://", "redbeat_redis_options": options}


def _sentinel_auth(settings: FarmSettings) -> dict[str, str]:
    secret = settings.redis_sentinel_password
    return {"password": secret.get_secret_value()} if secret else {}
