"""How one job's references go through the denoising loop, decided once before the first step.

diffusers' ``Flux2KleinKVPipeline`` writes its loop as three explicit branches (step 0 with
references: extract; later steps with a K/V cache: cached; otherwise: no references). The engine
adds a fourth way, carrying the references through every step (checkpoints without KV), and a
cache hit that skips extraction. The plan names which of these a job takes, so the step function
switches on (plan, step index) instead of inferring it from what an earlier step left behind.
See ``docs/engine.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import torch

# How the caller wants references handled: ``reuse`` is the farm's way on a KV checkpoint; the
# benchmark also runs ``per_job`` (what Flux2KleinKVPipeline does) and ``recompute`` (Flux2KleinPipeline).
ReferenceMode = Literal["reuse", "per_job", "recompute"]
# Where a job's reference K/V came from, as recorded with the job: a cache tier, a miss, or the mode.
KVSource = Literal["none", "miss", "device", "host", "per_job", "recompute"]


class ReferencePlan(StrEnum):
    """The reference handling of one job, for all of its steps."""

    NONE = "none"  # no references: a plain transformer call every step
    CARRY = "carry"  # reference tokens carried through every step (no K/V reuse)
    EXTRACT_THEN_CACHED = "extract_then_cached"  # step 0 extracts the K/V, later steps use them
    CACHED = "cached"  # K/V already held: every step uses them


class TransformerCall(StrEnum):
    """The kind of transformer call one step makes."""

    PLAIN = "plain"
    CARRY = "carry"
    EXTRACT = "extract"
    CACHED = "cached"


def default_mode(kv_reuse: bool) -> ReferenceMode:
    """The farm's mode: reuse K/V where the checkpoint was trained for it, else recompute."""
    return "reuse" if kv_reuse else "recompute"


def decide_plan(has_references: bool, mode: ReferenceMode, cache_hit: bool) -> ReferencePlan:
    """The plan of a job; ``cache_hit`` only counts in ``reuse`` mode (the others never look)."""
    if not has_references:
        return ReferencePlan.NONE
    if mode == "recompute":
        return ReferencePlan.CARRY
    if mode == "reuse" and cache_hit:
        return ReferencePlan.CACHED
    return ReferencePlan.EXTRACT_THEN_CACHED


def call_for_step(plan: ReferencePlan, step: int) -> TransformerCall:
    """The transformer call that step ``step`` (0-based) of a job with ``plan`` makes."""
    if plan is ReferencePlan.NONE:
        return TransformerCall.PLAIN
    if plan is ReferencePlan.CARRY:
        return TransformerCall.CARRY
    if plan is ReferencePlan.EXTRACT_THEN_CACHED and step == 0:
        return TransformerCall.EXTRACT
    return TransformerCall.CACHED


@dataclass
class JobReferences:
    """What one job carries of its references through the loop.

    ``latents``/``ids`` are set for the plans that feed reference tokens to the transformer (CARRY,
    EXTRACT_THEN_CACHED); ``kv`` (a diffusers ``Flux2KVCache``) is set for CACHED up front and for
    EXTRACT_THEN_CACHED by its step 0. ``keep_as`` is the cache key the extracted K/V are kept
    under (``reuse`` mode only: ``per_job`` drops them, as the pipeline does).
    """

    plan: ReferencePlan = ReferencePlan.NONE
    key: str | None = None
    source: KVSource = "none"
    keep_as: str | None = None
    kv: Any = None
    latents: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference latents and their position ids, for the plans that carry them."""
        if self.latents is None or self.ids is None:
            raise RuntimeError(f"plan {self.plan} needs reference latents, and none were prepared")
        return self.latents, self.ids

    def cache(self) -> Any:
        """The reference K/V, for the steps that run in cached mode."""
        if self.kv is None:
            raise RuntimeError(f"plan {self.plan} reached a cached step without reference K/V")
        return self.kv
