"""Facts of the model the farm runs, FLUX.2 [klein] 9B-KV, each defined once.

Sources and derivations are in ``docs/engine.md``: the transformer config is diffusers'
``Flux2Transformer2DModel`` for ``black-forest-labs/FLUX.2-klein-9b-kv``; the text and reference
handling is ``Flux2KleinKVPipeline`` (diffusers 0.42.1).
"""

from __future__ import annotations

GIB = 1024**3

# The transformer: 8 double-stream + 24 single-stream blocks, 32 heads x 128 = hidden 4096.
TRANSFORMER_BLOCKS = 8 + 24
HIDDEN = 4096
BF16_BYTES = 2
# K and V of one reference token in every block, bf16: 32 x 2 x 4096 x 2 bytes = 0.5 MiB.
KV_BYTES_PER_REF_TOKEN = TRANSFORMER_BLOCKS * 2 * HIDDEN * BF16_BYTES

# One transformer token per 16x16 pixels (VAE /8, then 2x2 patches).
PATCH_PX = 16
# The pipeline pads every prompt to 512 tokens and sends the transformer no text mask.
TEXT_TOKENS = 512
# Layers of Qwen3-8B whose hidden states the pipeline stacks into the prompt embedding.
TEXT_ENCODER_LAYERS = (9, 18, 27)
# References above 1 MP are resized to about 1024x1024 area, sides floored to the patch multiple.
REFERENCE_MAX_AREA = 1024 * 1024
REFERENCE_MAX_SIDE = 1024

# Weights: 9.1 B transformer parameters (18 GB bf16, 9 GB stored as fp8); Qwen3-8B 16 GB in bf16.
TRANSFORMER_BF16_BYTES = 18 * GIB
TRANSFORMER_FP8_BYTES = 9 * GIB
TEXT_ENCODER_BF16_BYTES = 16 * GIB


def image_tokens(width: int, height: int) -> int:
    """Transformer tokens of an image of this size."""
    return (width // PATCH_PX) * (height // PATCH_PX)


def reference_tokens(num_refs: int, ref_px: int) -> int:
    """Tokens of ``num_refs`` square references of ``ref_px`` after the pipeline's resize."""
    side = min(ref_px, REFERENCE_MAX_SIDE) // PATCH_PX
    return num_refs * side * side


def kv_bytes(ref_tokens: int) -> int:
    """Bytes of the bf16 K/V of ``ref_tokens`` reference tokens."""
    return KV_BYTES_PER_REF_TOKEN * ref_tokens
