"""Real services for the tests: redis-server, an S3 server (moto), the tiny model, worker processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.processes import Processes
from kleinfarm.producer.localfarm.services import RedisServer, S3Server, service_env, settings_of
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage

TEST_PIXEL_LIMIT = 1_000_000
WORKER_START_S = 120.0


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server  # type: ignore[misc]


# A database of its own: the session's worker processes serve database 0 and would take its jobs.
SCRATCH_DATABASE = 7


@pytest.fixture()
def scratch_farm(redis_server: RedisServer) -> Iterator[FarmClient]:
    """A client of an empty farm no worker process serves (tests drive its parts by hand)."""
    client = FarmClient(FarmSettings(redis_url=redis_server.url.rsplit("/", 1)[0] + f"/{SCRATCH_DATABASE}"))
    client.state.redis.flushdb()
    yield client
    client.state.redis.flushdb()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kleinfarm.worker.engine.random_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def farm_env(
    redis_server: RedisServer, s3_server: S3Server, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The KLEINFARM_* settings of the test farm."""
    env = {
        **service_env(redis_server, s3_server, "farm-test"),
        "KLEINFARM_MODEL": str(tiny_model),
        "KLEINFARM_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "KLEINFARM_HEARTBEAT_S": "0.5",
        "KLEINFARM_WORKER_LAPSE_S": "3",
        "KLEINFARM_REFERENCE_MAX_PIXELS": str(TEST_PIXEL_LIMIT),
        "KLEINFARM_METRICS_PORT": "0",
    }
    Storage.from_settings(settings_from(env)).ensure_bucket()
    return env


settings_from = settings_of  # the tests' name for it


@pytest.fixture(scope="session")
def settings(farm_env: dict[str, str]) -> FarmSettings:
    return settings_from(farm_env)


@pytest.fixture(scope="session")
def client(settings: FarmSettings) -> FarmClient:
    return FarmClient(settings)


@pytest.fixture(scope="session")
def storage(settings: FarmSettings) -> Storage:
    return Storage.from_settings(settings)


@dataclass
class WorkerPool:
    """Real ``kleinfarm worker`` processes (``Processes``: each logging to its own file), started
    and waited for until each has registered."""

    env: dict[str, str]
    log_dir: Path
    processes: Processes = field(init=False)
    started: int = 0  # every worker started, for its log's name (a restarted pool keeps its old logs)

    def __post_init__(self) -> None:
        self.processes = Processes(self.log_dir)

    def start(
        self, count: int = 1, name: str | None = None, env: dict[str, str] | None = None
    ) -> list[subprocess.Popen[bytes]]:
        """Start ``count`` workers (named ``name``, with ``env`` over the pool's) and wait until they are live."""
        extra = {**(env or {}), **({"KLEINFARM_WORKER_NAME": name} if name else {})}
        command = [sys.executable, "-m", "kleinfarm.producer", "worker"]
        started = []
        for _ in range(count):
            started.append(self.processes.start(f"worker-{self.started}", command, {**self.env, **extra}))
            self.started += 1
        self.wait_live(started)
        return started

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return self.processes.live()

    def wait_live(self, processes: list[subprocess.Popen[bytes]]) -> None:
        """Until each process has registered (by its pid) in the farm's worker registry."""
        registry = Registry(FarmClient(settings_from(self.env)).state, lapse_s=3)
        deadline = time.monotonic() + WORKER_START_S
        wanted = {process.pid for process in processes}
        while not wanted <= {view.report.pid for view in registry.live_workers()}:
            assert time.monotonic() < deadline, f"workers not live; logs in {self.log_dir}"
            assert all(process.poll() is None for process in processes), f"a worker died; logs in {self.log_dir}"
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        self.processes.stop()


@pytest.fixture(scope="session")
def workers(farm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """Two worker processes serving the test farm for the whole session."""
    pool = WorkerPool(farm_env, tmp_path_factory.mktemp("worker-logs"))
    try:
        pool.start(2)
        yield pool
    finally:
        pool.stop()
