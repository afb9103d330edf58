"""What a job needs of a card's memory, and what a worker can run: the arithmetic that the engine's
admission (``worker/engine/admission.py``) and the router (``shared/routing``) share.

A job's peak on the card is the resident weights, plus the K/V the cache keeps on the device, plus
the job's own working set: its reference set's K/V (held through every step) and the largest of
its transient phases: one transformer pass over its tokens (on a miss the extraction pass carries
the reference tokens too), encoding one reference with the VAE, decoding the output.

The per-token and per-pixel figures follow from the model's shapes (``ModelDims``; the full-size
FLUX.2 [klein] 9B-KV, or the loaded checkpoint's own config). They are estimates with a margin:
``kleinfarm bench card`` prints each job's predicted and measured peak on a CUDA card, which is
where they are checked (``docs/engine.md``, "Memory of a job").
"""

from __future__ import annotations

import math
from functools import lru_cache

from pydantic import BaseModel, ConfigDict

from kleinfarm.shared.klein import (
    BF16_BYTES,
    GIB,
    HIDDEN,
    PATCH_PX,
    REFERENCE_MAX_AREA,
    TEXT_TOKENS,
    TRANSFORMER_BLOCKS,
)

# Estimates are padded by this much: the allocator's rounding and fragmentation, small temporaries.
MARGIN = 1.2
MIB = 1024**2


class ModelDims(BaseModel):
    """The shapes memory scales with, for one loaded checkpoint at its compute precision."""

    model_config = ConfigDict(frozen=True)

    blocks: int = TRANSFORMER_BLOCKS  # transformer blocks that hold reference K/V
    hidden: int = HIDDEN
    mlp_hidden: int = 3 * HIDDEN
    text_tokens: int = TEXT_TOKENS
    dtype_bytes: int = BF16_BYTES
    vae_channels: int = 512  # the VAE decoder's widest feature map (at 1/8 of the image's sides)
    vae_full_channels: int = 256  # its widest at the image's full resolution
    patch_px: int = PATCH_PX  # image pixels per transformer token, per side

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one reference token in every block."""
        return self.blocks * 2 * self.hidden * self.dtype_bytes

    @property
    def activation_bytes_per_token(self) -> int:
        """The live tensors of one token inside a single-stream block, its largest.

        Input and residual (2h), the fused QKV + gated-MLP projection (3h + 2m), the MLP activation
        (m), the attention output (h), the concatenation fed to the output projection (h + m), and
        the keys and values joined for attention (2h).
        """
        h, m = self.hidden, self.mlp_hidden
        return self.dtype_bytes * (2 * h + 3 * h + 2 * m + m + h + h + m + 2 * h)

    @property
    def joined_kv_bytes_per_token(self) -> int:
        """A held reference token inside one block's attention: its K and V joined to the job's."""
        return 2 * self.hidden * self.dtype_bytes

    @property
    def vae_bytes_per_pixel(self) -> int:
        """Decoding (or encoding) at full resolution: about three feature maps of the widest there."""
        return self.dtype_bytes * 3 * self.vae_full_channels

    def image_tokens(self, width: int, height: int) -> int:
        return (width // self.patch_px) * (height // self.patch_px)

    def reference_tokens(self, width: int, height: int) -> int:
        """Tokens of one reference after the pipeline's resize to at most 1 MP."""
        area = width * height
        if area > REFERENCE_MAX_AREA:
            scale = math.sqrt(REFERENCE_MAX_AREA / area)
            width, height = int(width * scale), int(height * scale)
        return self.image_tokens(width, height)


# FLUX.2 [klein] 9B-KV in bf16: the shapes of ``shared/klein.py``.
FULL_SIZE = ModelDims()


class JobShape(BaseModel):
    """What a job's memory depends on: its output size and its references' tokens."""

    model_config = ConfigDict(frozen=True)

    width: int
    height: int
    reference_tokens: tuple[int, ...] = ()
    # Reference pixels, largest first (for the VAE encode of one reference at a time).
    reference_pixels: int = 0

    @classmethod
    def worst_case(cls, width: int, height: int, references: int, dims: ModelDims = FULL_SIZE) -> JobShape:
        """The shape before its references are fetched: each at the 1 MP the pipeline resizes to."""
        return _worst_case(width, height, references, dims)

    @property
    def references(self) -> int:
        return len(self.reference_tokens)

    def describe(self) -> str:
        refs = self.references
        return f"{self.width}x{self.height}" + (f" with {refs} reference{'s' * (refs != 1)}" if refs else "")


@lru_cache(maxsize=1024)
def _worst_case(width: int, height: int, references: int, dims: ModelDims) -> JobShape:
    side = math.isqrt(REFERENCE_MAX_AREA)
    tokens = dims.reference_tokens(side, side)
    pixels = side * side if references else 0
    return JobShape(width=width, height=height, reference_tokens=(tokens,) * references, reference_pixels=pixels)


class JobNeed(BaseModel):
    """A job's working set beside the weights and the cache's other entries, in bytes."""

    model_config = ConfigDict(frozen=True)

    kv: int  # its reference set's K/V, on the device through every step
    transformer: int  # its largest transformer pass
    encode: int  # VAE-encoding its largest reference (one at a time)
    decode: int  # VAE-decoding the output

    @property
    def total(self) -> int:
        """Its peak: the phases run one after another. The references are encoded before any K/V
        exist; the K/V stay on the card through the transformer passes and the decode after them."""
        return max(self.encode, self.kv + self.transformer, self.kv + self.decode)

    def explain(self) -> str:
        return (
            f"{gib(self.total)} (K/V {gib(self.kv)}, transformer pass {gib(self.transformer)}, "
            f"VAE {gib(max(self.encode, self.decode))})"
        )


def job_need(shape: JobShape, dims: ModelDims = FULL_SIZE, extract: bool = True) -> JobNeed:
    """What ``shape`` needs; ``extract`` when its K/V are not held (a miss carries its reference
    tokens through the first pass)."""
    ref_tokens = sum(shape.reference_tokens)
    sequence = dims.text_tokens + dims.image_tokens(shape.width, shape.height)
    if extract:  # the references' own tokens go through the first pass
        transformer = (sequence + ref_tokens) * dims.activation_bytes_per_token
    else:  # held K/V are joined to the job's keys and values in each block's attention
        transformer = sequence * dims.activation_bytes_per_token + ref_tokens * dims.joined_kv_bytes_per_token
    return JobNeed(
        kv=ref_tokens * dims.kv_bytes_per_token,
        transformer=_padded(transformer),
        encode=_padded(shape.reference_pixels * dims.vae_bytes_per_pixel),
        decode=_padded(shape.width * shape.height * dims.vae_bytes_per_pixel),
    )


class Capability(BaseModel):
    """What one worker can run, published in its heartbeat: the memory a job may use on its card
    beside the resident weights, the model's shapes, and its speed (cost-model seconds it renders
    per second; 1.0 is the cost model's nominal card)."""

    model_config = ConfigDict(frozen=True)

    job_bytes: int | None = None  # None: no limit known (a CPU worker without a set card size)
    dims: ModelDims = FULL_SIZE
    # Not validated here: one worker's odd figure must not make every heartbeat unreadable; the
    # router counts a speed that is not positive and finite as 1.0 (``routing/policy.py``).
    speed: float = 1.0

    def need(self, shape: JobShape) -> JobNeed:
        return job_need(shape, self.dims)

    def fits(self, shape: JobShape) -> bool:
        """Whether ``shape`` runs here with every cache entry moved off the card (its worst case: a miss).

        Asked for every pending job and worker of a dispatch round: memoized, shapes are few."""
        return self.job_bytes is None or _fits(self, shape)

    def largest_square(self, references: int) -> int | None:
        """The largest square output (a multiple of 16 up to 2048) with ``references`` 1 MP references."""
        best = None
        for side in range(256, 2048 + 1, 16):
            if self.fits(JobShape.worst_case(side, side, references, self.dims)):
                best = side
        return best

    def limits(self) -> dict[str, int | None]:
        """Readable limits for ``kleinfarm workers``: the largest square output per reference count."""
        return {f"refs{count}": self.largest_square(count) for count in (0, 1, 2, 4)}


@lru_cache(maxsize=4096)
def _fits(capability: Capability, shape: JobShape) -> bool:
    return capability.need(shape).total <= (capability.job_bytes or 0)


def _padded(nbytes: int) -> int:
    return int(nbytes * MARGIN)


def gib(nbytes: int | float) -> str:
    """Bytes as GiB with two decimals, or MiB below one GiB (the tiny model's figures)."""
    if abs(nbytes) < GIB:
        return f"{nbytes / MIB:.1f} MiB"
    return f"{nbytes / GIB:.2f} GiB"
