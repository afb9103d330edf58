"""The render engine: the FLUX.2 [klein] KV pipeline, loaded once per worker process."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from kleinfarm.shared.jobs import EditJob, GenerateJob

log = logging.getLogger(__name__)

# The layers of Qwen3-8B whose hidden states the pipeline stacks into the prompt embedding.
DEFAULT_TEXT_LAYERS = (9, 18, 27)

StepCallback = Callable[[int, int], None]


def text_encoder_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """The real model's layers where they exist, else three evenly spaced (the tiny model)."""
    if num_hidden_layers >= max(DEFAULT_TEXT_LAYERS):
        return DEFAULT_TEXT_LAYERS
    third = max(num_hidden_layers // 3, 1)
    return (third, 2 * third, num_hidden_layers)


def pick_device(requested: str | None = None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class RenderResult:
    """An image and where its time went."""

    image: Image.Image
    timings: dict[str, float] = field(default_factory=dict)


class RenderEngine:
    """Renders generate and edit jobs on one pipeline, on one device."""

    def __init__(self, pipeline: Any, model: str, device: str) -> None:
        self.pipeline = pipeline
        self.model = model
        self.device = device
        self.text_layers = text_encoder_layers(pipeline.text_encoder.config.num_hidden_layers)

    @classmethod
    def load(cls, model: str, device: str | None = None) -> RenderEngine:
        """``from_pretrained`` of a Hub id or a local folder: bf16 on CUDA, fp32 on CPU."""
        from diffusers import Flux2KleinKVPipeline

        device = pick_device(device)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        started = time.perf_counter()
        pipeline = Flux2KleinKVPipeline.from_pretrained(model, dtype=dtype)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        log.info("loaded %s on %s (%s) in %.1f s", model, device, dtype, time.perf_counter() - started)
        return cls(pipeline, model, device)

    def render(
        self,
        job: GenerateJob | EditJob,
        references: list[Image.Image],
        on_step: StepCallback | None = None,
    ) -> RenderResult:
        """Render one job; ``on_step(done, total)`` runs after each step and may raise to stop."""
        if job.seed is None:
            raise ValueError("a job reaches the engine with its seed drawn at submit time")
        # A CPU generator makes the noise, hence the image, the same on every device.
        generator = torch.Generator("cpu").manual_seed(job.seed)

        def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, job.steps)
            return tensors

        started = time.perf_counter()
        with torch.inference_mode():
            output = self.pipeline(
                image=references or None,
                prompt=job.prompt,
                width=job.width,
                height=job.height,
                num_inference_steps=job.steps,
                generator=generator,
                callback_on_step_end=step_end,
                text_encoder_out_layers=self.text_layers,
            )
        return RenderResult(output.images[0], {"render_s": round(time.perf_counter() - started, 4)})
