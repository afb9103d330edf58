"""A Redis without a single point of failure, locally: a master, a replica and three Sentinels.

What ``deploy/`` runs in compose and Kubernetes, as child processes, for the failover test and for
trying a farm against Sentinel URLs (``shared/redis_urls.py``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis

from kleinfarm.producer.localfarm.services import RedisServer, wait_until
from kleinfarm.shared.errors import ConfigError

MASTER_NAME = "kleinfarm"
SENTINELS = 3
QUORUM = 2
# A master silent this long is down; a failover may take this long before another is tried.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class _FollowsMaster(RedisServer):
    """A ``redis-server`` that follows ``master``: a replica or a Sentinel."""

    def __init__(self, master: RedisServer) -> None:
        super().__init__()
        self.master = master


class RedisReplica(_FollowsMaster):
    """``redis-server`` replicating ``master``."""

    name = "redis-replica"

    def command(self) -> list[str]:
        return [*super().command(), "--replicaof", "127.0.0.1", str(self.master.port)]


class RedisSentinel(_FollowsMaster):
    """``redis-server --sentinel`` watching ``master`` under ``MASTER_NAME`` (it answers PING as a server does)."""

    name = "redis-sentinel"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server is not installed (apt-get install redis-server)")
        config = self.workdir / "sentinel.conf"  # a Sentinel rewrites its own config: a file of its own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
        )
        return [binary, str(config), "--sentinel"]

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

    def master_port(self) -> int:
        address: Any = self.client().sentinel_get_master_addr_by_name(MASTER_NAME)  # type: ignore[no-untyped-call]
        return int(address[1])


@dataclass
class SentinelRedis:
    """The running group; ``url`` is what ``KLEINFARM_REDIS_URL`` names."""

    master: RedisServer
    replica: RedisReplica
    sentinels: list[RedisSentinel]

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{sentinel.port}/0" for sentinel in self.sentinels)

    def current_master_port(self) -> int:
        return self.sentinels[0].master_port()


@contextmanager
def sentinel_redis() -> Iterator[SentinelRedis]:
    """Start a master, a replica in sync with it, and three Sentinels that know both and each other."""
    with ExitStack() as stack:
        master = RedisServer()
        stack.enter_context(master)
        replica = RedisReplica(master)
        stack.enter_context(replica)
        assert replica.process is not None
        wait_until(lambda: _in_sync(replica), "the replica's first sync", replica.process)
        sentinels = [RedisSentinel(master) for _ in range(SENTINELS)]
        for sentinel in sentinels:
            stack.enter_context(sentinel)
        for sentinel in sentinels:
            assert sentinel.process is not None
            wait_until(partial(_knows_everyone, sentinel), "the Sentinels to find each other", sentinel.process)
        yield SentinelRedis(master, replica, sentinels)


def _in_sync(replica: RedisServer) -> bool:
    info = redis.Redis(port=replica.port, decode_responses=True).info("replication")
    return bool(info.get("master_link_status") == "up")


def _knows_everyone(sentinel: RedisSentinel) -> bool:
    state: Any = sentinel.client().sentinel_master(MASTER_NAME)  # type: ignore[no-untyped-call]
    return int(state.get("num-other-sentinels", 0)) == SENTINELS - 1 and int(state.get("num-slaves", 0)) >= 1
