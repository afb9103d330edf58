"""What the engine returns: VAE-ready latents (the benchmark, the tests) or a decoded image (a job).

Two types rather than one with optional fields, so a caller never checks which half was filled.
``timings`` stays a mutable dict: the job runner adds its own fetch and upload seconds to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from kleinfarm.worker.engine.plan import KVSource
from kleinfarm.worker.engine.prompt_encoder import PromptSource


@dataclass(frozen=True)
class LatentResult:
    """Latents as the pipeline's ``output_type='latent'``, where the time went, what the caches did."""

    latents: torch.Tensor
    timings: dict[str, float]
    refset: str | None
    kv: KVSource
    prompt: PromptSource = "encoded"


@dataclass(frozen=True)
class ImageResult:
    """A rendered image, where the time went, what the caches did."""

    image: Image.Image
    timings: dict[str, float]
    refset: str | None
    kv: KVSource
    prompt: PromptSource = "encoded"
