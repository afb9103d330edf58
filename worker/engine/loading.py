"""Loading a checkpoint: which pipelines run here, where their components go, which text layers to read."""

from __future__ import annotations

from typing import Any, Literal

import torch

from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.klein import TEXT_ENCODER_LAYERS
from kleinfarm.worker.engine.fp8 import use_fp8_compute
from kleinfarm.worker.engine.profiles import MemoryProfile
from kleinfarm.worker.engine.streaming import StreamedModule, stream_text_encoder

SUPPORTED_PIPELINES = ("Flux2KleinKVPipeline", "Flux2KleinPipeline")
# How the rtx4090 profile keeps its fp8 transformer: stored (upcast per layer) or computed in fp8.
Fp8Mode = Literal["storage", "compute"]


def text_encoder_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """The real model's layers where they exist, else three evenly spaced (the small random models)."""
    if num_hidden_layers >= max(TEXT_ENCODER_LAYERS):
        return TEXT_ENCODER_LAYERS
    third = max(num_hidden_layers // 3, 1)
    return (third, 2 * third, num_hidden_layers)


def check_supported(pipeline: Any, model: str) -> None:
    """Only the step-distilled FLUX.2 [klein] pipelines run here (no guidance pass)."""
    name = type(pipeline).__name__
    if name not in SUPPORTED_PIPELINES:
        raise ConfigError(f"model {model!r} loads as {name}: kleinfarm runs FLUX.2 [klein] checkpoints")
    if not getattr(pipeline.config, "is_distilled", True):
        raise ConfigError(f"model {model!r} is a base (non-distilled) klein: kleinfarm runs the distilled ones")


def place(
    pipeline: Any, layout: MemoryProfile, device: torch.device, fp8: Fp8Mode = "storage"
) -> StreamedModule | None:
    """Put the components where the profile says: fp8 weight storage, a streamed text encoder.

    Returns the streamed text encoder, where the profile streams it."""
    if layout.weights == "fp8" and fp8 == "compute":
        # Half the memory of the bf16 checkpoint, and products on the fp8 tensor cores (``fp8.py``).
        use_fp8_compute(pipeline.transformer)
    elif layout.weights == "fp8":
        # Weights stored as fp8 and upcast layer by layer: half the memory of the bf16 checkpoint.
        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    if layout.text_encoder == "device":
        pipeline.to(device)
        return None
    pipeline.transformer.to(device)
    pipeline.vae.to(device)
    # Streamed from pinned host memory a unit ahead; it runs once per distinct prompt, ahead of its job.
    layers = text_encoder_layers(pipeline.text_encoder.config.num_hidden_layers)
    return stream_text_encoder(pipeline.text_encoder, device, layers)
