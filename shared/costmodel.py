"""Seconds of GPU work per job, from its shape: what the router balances, and the simulator runs.

The model speaks seconds (floats); the router counts load in whole milliseconds (``to_ms``), so
sums over a long run stay exact.

Load is counted in seconds, not jobs (``docs/routing.md``): with few GPUs and one job each, a
1024x1024 edit with four references is many times a 512x512 generate. The model is linear in
tokens per step, which is what ``kleinfarm bench kv`` shows at these sizes; the coefficients are
settable, and the defaults are a guess for an RTX 5090 running 9B-KV in bf16 (about 2 s for a
1024x1024 image in 4 steps, the figure published for the 9B distilled model).
"""

from __future__ import annotations

from dataclasses import dataclass

from kleinfarm.shared.klein import TEXT_TOKENS, image_tokens, kv_bytes, reference_tokens

MS_PER_S = 1000


def to_ms(seconds: float) -> int:
    """Seconds as whole milliseconds: the unit of load accounting.

    Load is summed over thousands of jobs handed out and finished; float sums drift (a farm idle
    at -9.4e-13 s once left every worker "over the cap"), integer sums cannot. A positive cost is
    never rounded down to nothing, so a worker with work queued always counts as loaded.
    """
    ms = round(seconds * MS_PER_S)
    return 1 if ms == 0 and seconds > 0 else ms


def to_s(ms: int) -> float:
    """Whole milliseconds as seconds, for display and for the float API."""
    return ms / MS_PER_S


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
        return kv_bytes(reference_tokens(num_refs, ref_px))
