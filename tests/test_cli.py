"""The ``kleinfarm`` command line, run as a user runs it, against the test farm."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import WorkerPool

ROOT = Path(__file__).parent.parent
KLEINFARM = [sys.executable, "-m", "kleinfarm.producer"]


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KLEINFARM, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_submit_wait_status_and_results_work_from_the_command_line(
    farm_env: dict[str, str], workers: WorkerPool, tmp_path: Path
) -> None:
    submitted = run(["submit", "examples/bulk-edit.jsonl", "--wait", "--json"], farm_env)
    assert submitted.returncode == 0, submitted.stderr
    first, final = (json.loads(line) for line in submitted.stdout.splitlines())
    campaign_id = first["campaign_id"]
    assert first["jobs"] == 4 and final["succeeded"] == 4

    status = json.loads(run(["status", campaign_id, "--json"], farm_env).stdout)
    assert {key: status[key] for key in ("total", "pending", "running", "succeeded", "failed", "cancelled")} == {
        "total": 4,
        "pending": 0,
        "running": 0,
        "succeeded": 4,
        "failed": 0,
        "cancelled": 0,
    }

    listed = run(["results", campaign_id, "--json", "--download", str(tmp_path)], farm_env)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [row["job_id"] for row in rows] == ["mug-1", "mug-2", "lamp-1", "plain-1"]
    assert set(rows[0]) == {"job_id", "state", "key", "error", "seed", "width", "height"}
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [
        "contact-sheet.png",
        "lamp-1.png",
        "mug-1.png",
        "mug-2.png",
        "plain-1.png",
    ]


def test_submit_wait_exits_non_zero_when_a_job_fails(
    farm_env: dict[str, str], workers: WorkerPool, tmp_path: Path
) -> None:
    campaign = tmp_path / "one-bad.yaml"
    bucket = farm_env["KLEINFARM_S3_BUCKET"]
    campaign.write_text(
        "name: one-bad\ndefaults: {width: 256, height: 256}\njobs:\n  - prompt: fine\n"
        f"  - prompt: gone\n    references: [s3://{bucket}/missing/ref.png]\n"
    )
    submitted = run(["submit", str(campaign), "--wait", "--json"], farm_env)
    assert submitted.returncode == 1
    assert json.loads(submitted.stdout.splitlines()[-1])["failed"] == 1


def test_a_bad_campaign_file_exits_2_with_the_field_named(farm_env: dict[str, str], tmp_path: Path) -> None:
    campaign = tmp_path / "bad.yaml"
    campaign.write_text("name: bad\njobs:\n  - prompt: a\n    width: 100\n  - prompt: b\n    refs: [x]\n")
    submitted = run(["submit", str(campaign)], farm_env)
    assert submitted.returncode == 2
    assert "jobs[0].width: width=100 is out of range: it must be between 256 and 2048" in submitted.stderr
    assert "jobs[1].refs: unknown field" in submitted.stderr


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused while the test runs."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


def assert_one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {expected}"), line


@pytest.mark.parametrize(
    "args",
    [["status", "x"], ["results", "x"], ["cancel", "x"], ["retry", "x", "--failed"], ["workers"], ["schedule", "list"]],
)
def test_every_command_with_redis_unreachable_prints_one_line_naming_it(closed_port: int, args: list[str]) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0"
    result = run(args, {"KLEINFARM_REDIS_URL": f"redis://:hunter2@127.0.0.1:{closed_port}/0"}, timeout=60)
    assert_one_error_line(result, f"cannot reach Redis at {url} (KLEINFARM_REDIS_URL): Connection refused")
    assert "hunter2" not in result.stderr


def test_submit_with_redis_unreachable_prints_one_line_naming_it(closed_port: int, tmp_path: Path) -> None:
    campaign = tmp_path / "c.yaml"
    campaign.write_text("name: c\njobs:\n  - prompt: a mug\n")
    result = run(["submit", str(campaign)], {"KLEINFARM_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0"}, timeout=60)
    assert_one_error_line(result, f"cannot reach Redis at redis://127.0.0.1:{closed_port}/0")


def test_submit_with_s3_unreachable_prints_one_line_naming_it(closed_port: int) -> None:
    env = {
        "KLEINFARM_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}",
        "KLEINFARM_S3_ACCESS_KEY_ID": "key",
        "KLEINFARM_S3_SECRET_ACCESS_KEY": "secret",
        "KLEINFARM_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0",
    }
    result = run(["submit", "examples/bulk-edit.jsonl"], env, timeout=120)  # its local files upload first
    assert_one_error_line(result, f"cannot reach S3 at http://127.0.0.1:{closed_port} (KLEINFARM_S3_ENDPOINT_URL)")


def test_render_writes_one_image_without_a_queue(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.png"
    args = [
        "render",
        "--model",
        str(tiny_model),
        "--prompt",
        "a mug",
        "--ref",
        "examples/refs/product-mug.png",
        "--width",
        "256",
        "--height",
        "320",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    rendered = run(args, {"KLEINFARM_CACHE_DIR": str(tmp_path / "cache")})
    assert rendered.returncode == 0, rendered.stderr
    from PIL import Image

    assert Image.open(out).size == (256, 320)


def test_make_random_model_writes_a_pipeline_that_loads_and_refuses_an_unknown_shape(tmp_path: Path) -> None:
    folder = tmp_path / "cpu-shape"
    made = run(["make-random-model", str(folder), "--shape", "cpu"], {})
    assert made.returncode == 0, made.stderr
    from diffusers import Flux2KleinKVPipeline

    from kleinfarm.worker.engine.random_model import CPU_BENCH_SHAPE

    pipeline = Flux2KleinKVPipeline.from_pretrained(str(folder))
    blocks = len(pipeline.transformer.transformer_blocks), len(pipeline.transformer.single_transformer_blocks)
    assert blocks == (CPU_BENCH_SHAPE.double_layers, CPU_BENCH_SHAPE.single_layers)
    refused = run(["make-random-model", str(tmp_path / "x"), "--shape", "huge"], {})
    assert refused.returncode == 2 and "--shape must be one of tiny, cpu, full" in refused.stderr


def test_local_demo_renders_the_demo_campaign_and_leaves_images_on_disk(tmp_path: Path, tiny_model: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KLEINFARM_")}
    env["KLEINFARM_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "out"
    demo = subprocess.run(
        [
            *KLEINFARM,
            "local",
            "--demo",
            "--workers",
            "1",
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--env-file",
            str(tmp_path / "farm.env"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert demo.returncode == 0, demo.stderr
    (folder,) = out.iterdir()
    assert len(list(folder.glob("*.png"))) == 7  # six jobs and the contact sheet
    report = (folder / "report.html").read_text()
    references = report.count("<img class='ref'")  # the demo's edits show their references beside them
    assert references > 0 and report.count("data:image/png;base64,") - references == 6
    assert "6/6 succeeded" in demo.stderr and "Images are in" in demo.stderr


def test_local_writes_the_env_file_and_ctrl_c_stops_every_child(tmp_path: Path, tiny_model: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KLEINFARM_")}
    env_file = tmp_path / "farm.env"
    farm = subprocess.Popen(
        [*KLEINFARM, "local", "--workers", "1", "--model", str(tiny_model), "--env-file", str(env_file)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert farm.stderr is not None
    for line in farm.stderr:
        if "Ctrl-C stops the farm" in line:
            break
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    children = subprocess.run(["pgrep", "-P", str(farm.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 3  # redis-server, the S3 server, one worker
    # The farm answers a submission made from another shell through the env file.
    submitted = run(["submit", str(ROOT / "examples/bulk-edit.jsonl"), "--env-file", str(env_file), "--wait"], {})
    assert submitted.returncode == 0, submitted.stderr
    assert settings["KLEINFARM_REDIS_URL"].startswith("redis://127.0.0.1:")

    farm.send_signal(signal.SIGINT)
    assert farm.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, "a child of `kleinfarm local` outlived it"
        time.sleep(0.1)
