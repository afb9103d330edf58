"""``kleinfarm local``: a whole farm on one machine, every part a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import TracebackType

from rich.console import Console

from kleinfarm.producer.campaign_files import load_campaign
from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.contact_sheet import write_contact_sheet
from kleinfarm.producer.localfarm.services import ChildService, RedisServer, S3Server
from kleinfarm.producer.report import write_report
from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage

console = Console(stderr=True)
WORKER_START_TIMEOUT_S = 120.0
# A worker that dies is restarted, unless workers died this many times within the window: then
# something is wrong beyond one crash, and the farm stops with a pointer to the logs.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class RestartBudget:
    """At most ``limit`` restarts within any ``window_s`` seconds."""

    def __init__(self, limit: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def take(self, now: float | None = None) -> bool:
        """Spend one restart; False if the window's restarts are all spent."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


def tiny_model_folder(settings: FarmSettings) -> Path:
    """The tiny model under the cache folder, built on first use."""
    folder = settings.cache_dir / "tiny-model"
    if not (folder / "model_index.json").is_file():
        from kleinfarm.worker.engine.random_model import make_tiny_model

        make_tiny_model(folder)
    return folder


def worker_command(env_file: Path) -> list[str]:
    return [sys.executable, "-m", "kleinfarm.producer", "worker", "--env-file", str(env_file)]


class LocalFarm:
    """Starts Redis and S3 unless the environment names them, then N workers; stops all on exit."""

    def __init__(self, workers: int, model: str | None, env_file: Path) -> None:
        self.settings = FarmSettings()
        self.worker_count = workers
        self.model = model
        self.env_file = env_file.resolve()
        self.services: list[ChildService] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.log_dir = Path(".kleinfarm-local").resolve()
        self.restarts = RestartBudget()

    def __enter__(self) -> LocalFarm:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _start(self) -> None:
        overrides: dict[str, str] = {}
        if "KLEINFARM_REDIS_URL" not in os.environ:
            redis_server = RedisServer()
            self.services.append(redis_server.start())
            overrides["REDIS_URL"] = redis_server.url
        if "KLEINFARM_S3_ENDPOINT_URL" not in os.environ:
            s3 = S3Server()
            self.services.append(s3.start())
            overrides.update(S3_ENDPOINT_URL=s3.url, S3_ACCESS_KEY_ID=s3.access_key, S3_SECRET_ACCESS_KEY=s3.secret_key)
        if self.model:
            overrides["MODEL"] = self.model
        elif "KLEINFARM_MODEL" not in os.environ:
            overrides["MODEL"] = str(tiny_model_folder(self.settings))
        self.settings = FarmSettings.model_validate({key.lower(): value for key, value in overrides.items()})
        Storage.from_settings(self.settings).ensure_bucket()
        self._write_env_file(overrides)
        self._start_workers()
        console.print(f"farm ready: {self.worker_count} worker(s); settings in {self.env_file}")
        console.print(f"  submit from another shell:  kleinfarm submit FILE --env-file {self.env_file}")

    def _write_env_file(self, overrides: dict[str, str]) -> None:
        lines = [f"KLEINFARM_{key}={value}" for key, value in overrides.items()]
        self.env_file.write_text("\n".join(lines) + "\n")

    def _start_worker(self, index: int) -> subprocess.Popen[bytes]:
        """Start worker ``index``, appending to its log (a restarted worker's log follows its crash)."""
        with (self.log_dir / f"worker-{index}.log").open("ab") as log:
            return subprocess.Popen(
                worker_command(self.env_file), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _start_workers(self) -> None:
        self.log_dir.mkdir(exist_ok=True)
        self.workers = [self._start_worker(index) for index in range(self.worker_count)]
        registry = Registry(FarmClient(self.settings).state, self.settings.worker_lapse_s)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        with console.status(f"starting {self.worker_count} worker(s) (logs in {self.log_dir})"):
            while len(registry.live_workers()) < self.worker_count:
                if any(worker.poll() is not None for worker in self.workers):
                    raise ConfigError(f"a worker exited while starting: see {self.log_dir}")
                if time.monotonic() > deadline:
                    raise ConfigError(f"workers not up after {WORKER_START_TIMEOUT_S} s: see {self.log_dir}")
                time.sleep(0.2)

    def serve_until_interrupted(self) -> None:
        """Run until Ctrl-C or SIGTERM, restarting a worker that dies (its jobs go back to the queue
        when its heartbeat lapses); workers dying too often stop the farm with a pointer to the logs."""
        console.print("Ctrl-C stops the farm.")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while True:
                for index in range(len(self.workers)):
                    self.supervise(index, wait_s=1.0 / max(len(self.workers), 1))
        except KeyboardInterrupt:
            console.print("stopping the farm")

    def supervise(self, index: int, wait_s: float) -> None:
        """Wait up to ``wait_s`` on worker ``index``; restart it if it has died."""
        worker = self.workers[index]
        try:
            worker.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return
        log = self.log_dir / f"worker-{index}.log"
        if not self.restarts.take():
            raise ConfigError(
                f"worker {index} exited ({worker.returncode}); workers died {self.restarts.limit} times within "
                f"{self.restarts.window_s:.0f} s, so the farm stops: see {log}"
            )
        self.workers[index] = self._start_worker(index)
        console.print(
            f"worker {index} exited ({worker.returncode}): restarted it as pid {self.workers[index].pid} (log: {log})"
        )

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        for service in reversed(self.services):
            service.stop()
        self.workers, self.services = [], []


def run_demo(farm: LocalFarm, campaign_file: Path, out: Path) -> None:
    """Submit the demo campaign, show its progress, copy its images out of the (in-memory) S3."""
    client = FarmClient(farm.settings)
    handle = client.submit(load_campaign(campaign_file))
    console.print(f"submitted {campaign_file} as campaign {handle.id}")
    status = handle.wait(progress=True)
    folder = out / handle.id
    images = handle.download(folder)
    sheet = write_contact_sheet(images, folder / "contact-sheet.png")
    (folder / "report.html").write_text(write_report(handle)[1])
    console.print(
        f"{status.succeeded}/{status.total} succeeded, {status.failed} failed. "
        f"Images are in {folder.resolve()}"
        + (f"; contact sheet: {sheet.resolve()}" if sheet else "")
        + f"; report: {(folder / 'report.html').resolve()}"
    )
