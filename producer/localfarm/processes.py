"""Child processes of a local farm or a benchmark (workers, Celery workers), each logging to its
own file, stopped together: a graceful stop first, killed if it does not come."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class Processes:
    """Child processes with their logs, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            child = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.children.append(child)
        return child

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [child for child in self.children if child.poll() is None]

    def check_alive(self) -> None:
        if any(child.poll() is not None for child in self.children):
            raise RuntimeError(f"a worker exited; logs in {self.log_dir}")

    def stop(self) -> None:
        for child in self.live():
            child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
        self.children = []
