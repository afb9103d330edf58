"""Flower on the farm: behind basic auth, it lists the workers and the tasks with their final states."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.flower import check_credentials
from kleinfarm.producer.localfarm.services import free_port
from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.jobs import Campaign

from conftest import WorkerPool

CREDENTIALS = "admin:flower-test-secret"


def get(url: str, credentials: str | None = CREDENTIALS) -> Any:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture()
def flower_url(farm_env: dict[str, str], workers: WorkerPool, tmp_path: Any) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "kleinfarm.producer", "flower", "--port", str(port)],
        env={**os.environ, **farm_env, "KLEINFARM_FLOWER_BASIC_AUTH": CREDENTIALS},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthcheck", timeout=2).read()
            break
        except (urllib.error.URLError, OSError):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=30)


def events_reach_flower(client: FarmClient, flower_url: str) -> None:
    """Flower answers /healthcheck before its event stream is live: run probe jobs until one shows."""
    deadline = time.monotonic() + 60
    while True:
        probe = client.submit(Campaign.from_raw("flower-probe", [{"prompt": "p", "width": 256, "height": 256}]))
        probe.wait(progress=False, timeout=300)
        if any(probe.id in str(task.get("kwargs")) for task in get(f"{flower_url}/api/tasks").values()):
            return
        assert time.monotonic() < deadline, "Flower never received the workers' task events"


def test_flower_refuses_to_start_without_credentials(farm_env: dict[str, str]) -> None:
    env = {key: value for key, value in {**os.environ, **farm_env}.items() if key != "KLEINFARM_FLOWER_BASIC_AUTH"}
    started = subprocess.run(
        [sys.executable, "-m", "kleinfarm.producer", "flower"], env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 2 and "KLEINFARM_FLOWER_BASIC_AUTH=user:password" in started.stderr


@pytest.mark.parametrize(
    ("credentials", "complaint"),
    [
        ("admin:long-enough,secret", "comma"),
        ("admin:s3cret-password,", "comma"),
        ("admin:short", "at least 12"),
        ("admin:change-me", "at least 12"),
        (":no-user-here-at-all", "user:password"),
        ("admin: padded-password ", "spaces"),
    ],
)
def test_credentials_flower_would_misread_are_refused_before_it_starts(credentials: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        check_credentials(credentials)


def test_flower_metrics_ask_for_the_same_credentials(flower_url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{flower_url}/metrics", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{flower_url}/metrics")
    request.add_header("Authorization", "Basic " + base64.b64encode(CREDENTIALS.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and b"flower_" in response.read()


def test_flower_lists_workers_and_named_tasks_with_their_final_states(
    flower_url: str, client: FarmClient, storage: Any
) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{flower_url}/api/workers", credentials=None)
    assert refused.value.code == 401

    events_reach_flower(client, flower_url)
    missing = f"s3://{storage.bucket}/nowhere/ref.png"
    jobs = [{"prompt": "fine", "width": 256, "height": 256}, {"prompt": "bad", "references": [missing]}]
    handle = client.submit(Campaign.from_raw("flower", jobs, defaults={"width": 256, "height": 256}))
    handle.wait(progress=False, timeout=300)
    rows = {row["job_id"]: row for row in handle.results()}

    deadline = time.monotonic() + 60
    while True:
        tasks = get(f"{flower_url}/api/tasks")
        ours = {task["kwargs"]: task for task in tasks.values() if handle.id in str(task.get("kwargs"))}
        if len(ours) == 2 and all(task["state"] in ("SUCCESS", "FAILURE") for task in ours.values()):
            break
        assert time.monotonic() < deadline, f"Flower did not show both tasks: {tasks}"
        time.sleep(0.5)
    by_name = {task["name"]: task for task in ours.values()}
    assert by_name["kleinfarm.generate"]["state"] == "SUCCESS"
    assert by_name["kleinfarm.edit"]["state"] == "FAILURE"
    assert rows["job-1"]["error"] in by_name["kleinfarm.edit"]["exception"]
    assert "secret" not in json.dumps(tasks)

    live = {
        view.worker_id
        for view in __import__("kleinfarm.shared.registry", fromlist=["Registry"])
        .Registry(client.state, 3)
        .live_workers()
    }
    names = get(f"{flower_url}/api/workers?refresh=1")
    assert live <= {name.split("@")[0] for name in names}
