"""Seconds of GPU work per job, from its shape: what the router balances, and the simulator runs.

Load is counted in seconds, not jobs (FACTS.md, "Routing"): with few GPUs and one job each, a
1024x1024 edit with four references is many times a 512x512 generate. The model is linear in
tokens per step, which is what ``kleinfarm bench kv`` shows at these sizes; the coefficients are
settable, and the defaults are a guess for an RTX 5090 running 9B-KV in bf16 (about 2 s for a
1024x1024 image in 4 steps, the figure published for the 9B distilled model).
"""

from __future__ import annotations

from dataclasses import dataclass

PATCH_PX = 16  # one transformer token per 16x16 pixels (VAE /8, then 2x2 patches)
TEXT_TOKENS = 512  # the pipeline pads every prompt to 512 tokens
MAX_REF_SIDE = 1024  # references above 1 MP are resized to about 1024x1024
KV_BYTES_PER_REF_TOKEN = 32 * 2 * 4096 * 2  # bf16, 9B: 0.5 MiB


def image_tokens(width: int, height: int) -> int:
    return (width // PATCH_PX) * (height // PATCH_PX)


def reference_tokens(num_refs: int, ref_px: int) -> int:
    side = min(ref_px, MAX_REF_SIDE) // PATCH_PX
    return num_refs * side * side


@dataclass(frozen=True)
class CostModel:
    """Seconds per token per step, for the query tokens and for the reference tokens."""

    token_step_s: float = 1.0e-4
    ref_token_s: float = 1.1e-4  # one pass of a reference token through the transformer (extract)
    steps: int = 4
    overhead_s: float = 0.15  # prompt lookup, VAE decode, upload

    def cached_render_s(self, width: int, height: int) -> float:
        """A job whose reference K/V are held (or that has none)."""
        return self.overhead_s + self.steps * self.token_step_s * (TEXT_TOKENS + image_tokens(width, height))

    def build_s(self, num_refs: int, ref_px: int) -> float:
        """What a miss adds: the references' extraction pass (and their VAE encode, folded in)."""
        return self.ref_token_s * reference_tokens(num_refs, ref_px) if num_refs else 0.0

    def recompute_s(self, width: int, height: int, num_refs: int, ref_px: int) -> float:
        """Carrying the references through every step (a checkpoint without KV)."""
        extra = self.steps * self.token_step_s * reference_tokens(num_refs, ref_px)
        return self.cached_render_s(width, height) + extra

    def kv_bytes(self, num_refs: int, ref_px: int) -> int:
        return KV_BYTES_PER_REF_TOKEN * reference_tokens(num_refs, ref_px)
