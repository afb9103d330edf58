"""Local stand-ins for the farm's services: a redis-server and an S3 server (moto), as children.

``kleinfarm local`` and the test fixtures start the same ones.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.settings import FarmSettings

START_TIMEOUT_S = 30.0
# A free port can be taken by another process between the probe and the server's bind: the
# server then exits (or another answers on the port), and the start is tried again on a new port.
START_ATTEMPTS = 5
TCP_LISTEN = "0A"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (Linux ``/proc``; elsewhere
    True, so the readiness check alone decides)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return not os.path.isdir("/proc")
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{descriptor}") in inodes:
                return True
    return False


def wait_until(
    ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S
) -> None:
    """Poll ``ready()`` until true; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"{what} exited with code {process.returncode} while starting")
        if ready():
            return
        time.sleep(0.05)
    raise ConfigError(f"{what} did not become ready within {timeout} s")


class ChildService:
    """A child process with a readiness check, stopped on exit."""

    name = "service"

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kleinfarm-{self.name}-"))

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> Self:
        """Start the server; if it dies while starting (its port taken meanwhile), on a new port."""
        for attempt in range(1, START_ATTEMPTS + 1):
            with (self.workdir / f"{self.name}.log").open("ab") as log:
                self.process = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
                )
            try:
                wait_until(self._serving, self.name, self.process)
                return self
            except ConfigError:
                self._kill()
                if attempt == START_ATTEMPTS:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _serving(self) -> bool:
        """Ready, on a port this very process listens on (not another server that took it)."""
        assert self.process is not None
        return listens_on(self.process.pid, self.port) and self.ready()

    def _kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class RedisServer(ChildService):
    """``redis-server`` on a free loopback port, keeping nothing on disk."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(
                "redis-server is not installed (apt-get install redis-server), or set KLEINFARM_REDIS_URL"
            )
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class S3Server(ChildService):
    """moto's S3-compatible server on a free loopback port (objects live in its memory)."""

    name = "s3"
    access_key = "kleinfarm-local"
    secret_key = "kleinfarm-local-secret"  # noqa: S105 - moto accepts any credentials

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # Run as a module of this interpreter: it is found wherever moto was installed (a virtual
        # environment, or a --target folder on PYTHONPATH), not only beside the interpreter.
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            raise ConfigError("moto's server is not installed: pip install 'kleinfarm[local]'")
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/", timeout=0.5):  # noqa: S310 - loopback
                return True
        except (urllib.error.URLError, OSError):
            return False


def service_env(redis: RedisServer, s3: S3Server, bucket: str, prefix: str = "KLEINFARM_") -> dict[str, str]:
    """The variables that point a farm's processes at these servers (``prefix``: whose variables)."""
    return {
        f"{prefix}REDIS_URL": redis.url,
        f"{prefix}S3_ENDPOINT_URL": s3.url,
        f"{prefix}S3_ACCESS_KEY_ID": s3.access_key,
        f"{prefix}S3_SECRET_ACCESS_KEY": s3.secret_key,
        f"{prefix}S3_BUCKET": bucket,
    }


def settings_of(env: dict[str, str]) -> FarmSettings:
    """The settings a process given ``env`` reads from its KLEINFARM_* variables, and nothing from
    this process's own environment."""
    prefix = "KLEINFARM_"
    return FarmSettings.model_validate(
        {key.removeprefix(prefix).lower(): value for key, value in env.items() if key.startswith(prefix)}
    )


def tiny_model(work: Path) -> str:
    """The tiny random model, written under ``work`` (a benchmark's default model)."""
    from kleinfarm.worker.engine.random_model import make_tiny_model

    return str(make_tiny_model(work / "tiny-model"))
