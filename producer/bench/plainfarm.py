"""The farm a user would build without kleinfarm, for ``kleinfarm bench farm`` to race against.

Celery on the same Redis, one worker process per device (solo pool), each task running
diffusers' ``Flux2KleinKVPipeline`` on its job (the pipeline extracts the references' K/V at step
0 and drops them) and uploading the PNG with boto3. Nothing of kleinfarm's runs in it but the
choice of text-encoder layers a small random model needs. Each task records when it started and
ended and its seconds inside the pipeline, in one Redis hash per run.

Started as ``celery -A kleinfarm.producer.bench.plainfarm worker``, configured by ``PLAIN_*``
environment variables (``farm.run_plain``).
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_init

QUEUE = "plain"
TASK = "plain.render"

app = Celery("plainfarm", broker=os.environ.get("PLAIN_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
_loaded: dict[str, Any] = {}


def _pipeline() -> Any:
    """The pipeline, loaded once per worker process on its device."""
    if "pipeline" not in _loaded:
        import torch
        from diffusers import DiffusionPipeline

        from kleinfarm.worker.engine.loading import text_encoder_layers

        device = os.environ["PLAIN_DEVICE"]
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        pipeline = DiffusionPipeline.from_pretrained(os.environ["PLAIN_MODEL"], dtype=dtype).to(device)
        pipeline.set_progress_bar_config(disable=True)
        _loaded["pipeline"] = pipeline
        _loaded["layers"] = text_encoder_layers(pipeline.text_encoder.config.num_hidden_layers)
    return _loaded["pipeline"]


@worker_init.connect  # type: ignore[untyped-decorator]
def _load_before_serving(**_kwargs: Any) -> None:
    """Load the model before the worker answers: its first job is not timed with the load."""
    _pipeline()


def _clients() -> tuple[Any, Any]:
    if "s3" not in _loaded:
        import boto3
        import redis

        _loaded["s3"] = boto3.client(
            "s3",
            endpoint_url=os.environ["PLAIN_S3_ENDPOINT_URL"],
            aws_access_key_id=os.environ["PLAIN_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=os.environ["PLAIN_S3_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        _loaded["redis"] = redis.Redis.from_url(os.environ["PLAIN_REDIS_URL"])
    return _loaded["s3"], _loaded["redis"]


@app.task(name=TASK, bind=True)  # type: ignore[untyped-decorator]
def render(self: Any, job: dict[str, Any]) -> None:
    """Render and upload one job; record its timings, or its failure (a job that failed is accounted for)."""
    started = time.time()
    s3, redis_client = _clients()
    try:
        record = _render(self.request.hostname, job, s3, started)
    except Exception as error:  # noqa: BLE001 - the bench reports it; the worker goes on
        record = {"worker": self.request.hostname, "error": f"{type(error).__name__}: {error}"[:300]}
    redis_client.hset(f"plainbench:{os.environ['PLAIN_RUN']}", job["id"], json.dumps(record))


def _render(hostname: str, job: dict[str, Any], s3: Any, started: float) -> dict[str, Any]:
    import torch
    from PIL import Image

    bucket = os.environ["PLAIN_S3_BUCKET"]
    references = []
    for key in job["references"]:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        references.append(Image.open(io.BytesIO(body)).convert("RGB"))
    pipeline = _pipeline()
    inside = time.perf_counter()
    image = pipeline(
        image=references or None,
        prompt=job["prompt"],
        width=job["width"],
        height=job["height"],
        num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(job["seed"]),
        text_encoder_out_layers=_loaded["layers"],
    ).images[0]
    if os.environ["PLAIN_DEVICE"].startswith("cuda"):
        torch.cuda.synchronize()
    engine_s = time.perf_counter() - inside
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    s3.put_object(Bucket=bucket, Key=f"plain/{job['id']}.png", Body=buffer.getvalue(), ContentType="image/png")
    return {"worker": hostname, "started": started, "finished": time.time(), "engine_s": engine_s}
