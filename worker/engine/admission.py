"""Before a job runs: what it needs of the card (``shared/capacity.py``), and room made for it.

A card holds the resident weights, the K/V the cache keeps on the device, and one job's working
set. Before a job starts, the entries it does not use are demoted to host memory, least recently
used first, until its working set fits; a job that cannot fit even with every entry demoted fails
at once with what it needs and what the card has (a job's fault, not the worker's). If CUDA still
runs out of memory, the engine frees what it can and tries the job once more (``engine.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from PIL import Image

from kleinfarm.shared.capacity import Capability, JobNeed, JobShape, ModelDims, gib, job_need
from kleinfarm.shared.errors import JobTooLargeError
from kleinfarm.worker.engine.kv_cache import ReferenceKVCache
from kleinfarm.worker.engine.streaming import StreamedModule

# Out of memory as CUDA raises it, and as the CPU allocator does (a RuntimeError with this text).
CPU_OUT_OF_MEMORY = "can't allocate memory"
FP8_STORAGE = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and CPU_OUT_OF_MEMORY in str(error)
    )


def model_dims(pipeline: Any) -> ModelDims:
    """The loaded checkpoint's shapes, at the precision it computes in."""
    transformer, vae = pipeline.transformer.config, pipeline.vae.config
    hidden = transformer.num_attention_heads * transformer.attention_head_dim
    channels = tuple(vae.block_out_channels)
    return ModelDims(
        blocks=transformer.num_layers + transformer.num_single_layers,
        hidden=hidden,
        mlp_hidden=int(hidden * transformer.mlp_ratio),
        dtype_bytes=torch.tensor([], dtype=pipeline.vae.dtype).element_size(),
        vae_channels=max(channels),
        vae_full_channels=channels[1] if len(channels) > 1 else channels[0],
        patch_px=pipeline.vae_scale_factor * 2,
    )


def resident_bytes(modules: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Bytes of the parameters and buffers these modules keep on ``device`` (streamed ones are elsewhere)."""
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == device.type:
                total += tensor.nbytes
    return total


def card_limit(device: torch.device, override: int | None) -> int | None:
    """The bytes this worker may use on its card: a set figure, else, on CUDA, the allocator's cap or
    what the card has free (the CUDA context and other processes already took their share),
    whichever is less; None on CPU (no limit known)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    free, _total = torch.cuda.mem_get_info(device)
    capped = int(total * torch.cuda.get_per_process_memory_fraction(device))
    return min(capped, free + torch.cuda.memory_reserved(device))


def held_beside_jobs(transformer: torch.nn.Module, streamer: StreamedModule | None, prompt_bytes: int) -> int:
    """Card memory that is not resident weights but is held beside any job: two layers of a streamed
    text encoder, the prompt embeddings kept on the card, and, where weights are stored as fp8 and
    upcast per layer, the largest layer in bf16."""
    upcast = max(
        (
            module.weight.numel() * 2
            for module in transformer.modules()
            if isinstance(module, torch.nn.Linear) and module.weight.dtype in FP8_STORAGE
        ),
        default=0,
    )
    streamed = 2 * streamer.unit_bytes if streamer is not None else 0
    return streamed + prompt_bytes + upcast


class Admission:
    """The card's memory, and each job's claim on it."""

    def __init__(self, dims: ModelDims, card_bytes: int | None, resident: int) -> None:
        self.dims = dims
        self.card_bytes = card_bytes
        self.resident = resident

    @property
    def job_bytes(self) -> int | None:
        """What one job may use beside the weights: the card less what stays resident."""
        return None if self.card_bytes is None else max(self.card_bytes - self.resident, 0)

    def capability(self, speed: float = 1.0) -> Capability:
        return Capability(job_bytes=self.job_bytes, dims=self.dims, speed=speed)

    def shape(self, width: int, height: int, references: list[Image.Image]) -> JobShape:
        tokens = tuple(self.dims.reference_tokens(image.width, image.height) for image in references)
        pixels = max((min(image.width * image.height, 1024 * 1024) for image in references), default=0)
        return JobShape(width=width, height=height, reference_tokens=tokens, reference_pixels=pixels)

    def make_room(self, shape: JobShape, cache: ReferenceKVCache, key: str | None) -> JobNeed:
        """Demote the entries this job does not use until it fits; refuse a job that never can."""
        held = key is not None and key in cache.held_keys()
        need = job_need(shape, self.dims, extract=not held)
        limit = self.job_bytes
        if limit is None:
            return need
        if need.total > limit:
            raise JobTooLargeError(
                f"{shape.describe()} needs {need.explain()} on the card; this card has {gib(limit)} for a job "
                f"beside {gib(self.resident)} of resident weights ({gib(self.card_bytes or 0)} in all)"
            )
        while cache.device_bytes_except(key) + need.total > limit and cache.demote_oldest(keep=key):
            pass
        return need
