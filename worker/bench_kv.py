"""``kleinfarm bench kv``: what keeping reference K/V across jobs saves, end to end through the engine.

Per reference count R, three ways to run the same edit job (prompt encoding, denoising, VAE decode):
``recompute`` carries the references through the transformer at every step (``Flux2KleinPipeline``),
``per_job`` extracts their K/V at step 0 and drops them (``Flux2KleinKVPipeline``), ``hit`` finds
them in the engine's cache, built by an earlier job with another prompt and seed. Random weights:
the cost depends on the shapes, not the values. One JSON object per row on stdout.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from kleinfarm.shared.jobs import EditJob
from kleinfarm.shared.refset import content_digest
from kleinfarm.worker.engine import CacheBudgets, ReferenceMode, RenderEngine
from kleinfarm.worker.tiny_model import _tokenizer

GIB = 1024**3


@dataclass(frozen=True)
class BenchShape:
    """The model and image sizes of one benchmark setting."""

    heads: int
    head_dim: int
    text_hidden: int
    text_layers: int
    text_intermediate: int
    out_px: int
    ref_px: int
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_groups: int = 32


# Every width 1/8 of the real model (transformer 512, text encoder 512, VAE channels), true depth:
# the parts keep roughly their real share of the work, at a cost a CPU can run.
CPU_SHAPE = BenchShape(
    heads=8,
    head_dim=64,
    text_hidden=512,
    text_layers=6,
    text_intermediate=1536,
    out_px=512,
    ref_px=512,
    vae_channels=(16, 32, 64, 64),
    vae_groups=16,
)
# The real FLUX.2 [klein] 9B transformer and Qwen3-8B text encoder.
FULL_SHAPE = BenchShape(
    heads=32, head_dim=128, text_hidden=4096, text_layers=36, text_intermediate=12288, out_px=1024, ref_px=1024
)


def build_pipeline(shape: BenchShape, device: str, dtype: torch.dtype) -> Any:
    """A ``Flux2KleinKVPipeline`` of the true depth (8 double + 24 single blocks) with random weights."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = Flux2Transformer2DModel(
                in_channels=128,
                num_layers=8,
                num_single_layers=24,
                attention_head_dim=shape.head_dim,
                num_attention_heads=shape.heads,
                joint_attention_dim=3 * shape.text_hidden,
                axes_dims_rope=(shape.head_dim // 4,) * 4,
                rope_theta=2000,
                mlp_ratio=3.0,
                guidance_embeds=False,
            )
            text_encoder = Qwen3ForCausalLM(
                Qwen3Config(
                    vocab_size=len(tokenizer),
                    hidden_size=shape.text_hidden,
                    intermediate_size=shape.text_intermediate,
                    num_hidden_layers=shape.text_layers,
                    num_attention_heads=max(shape.text_hidden // 128, 2),
                    num_key_value_heads=max(shape.text_hidden // 512, 1),
                    head_dim=128,
                    max_position_embeddings=1024,
                )
            )
            vae = AutoencoderKLFlux2(block_out_channels=shape.vae_channels, norm_num_groups=shape.vae_groups)
    finally:
        torch.set_default_dtype(previous)
    return Flux2KleinKVPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )


def references(count: int, side: int) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(count)
    images = [Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8")) for _ in range(count)]
    return [(content_digest(image.tobytes()), image) for image in images]


def timed_job(
    engine: RenderEngine, refs: list[tuple[str, Image.Image]], shape: BenchShape, tag: str, mode: ReferenceMode
) -> tuple[float, dict[str, float]]:
    """Seconds for one whole job (a fresh prompt, so prompt encoding is always paid)."""
    job = EditJob(
        prompt=f"bench {tag}",
        references=[f"ref-{i}.png" for i in range(len(refs))],
        width=shape.out_px,
        height=shape.out_px,
        seed=len(tag),
        steps=4,
    )
    _sync(engine.device)
    started = time.perf_counter()
    result = engine.render_latents(job.prompt, job.seed or 0, job.width, job.height, job.steps, refs, mode=mode)
    with torch.inference_mode():
        engine.pipeline.vae.decode(result.latents, return_dict=False)
    _sync(engine.device)
    return time.perf_counter() - started, result.timings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(ref_counts: list[int], full_size: bool, device: str, repeat: int) -> list[dict[str, Any]]:
    shape = FULL_SHAPE if full_size else CPU_SHAPE
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline = build_pipeline(shape, device, dtype)
    engine = RenderEngine(pipeline, "bench-random", device, CacheBudgets(16 * GIB, 16 * GIB, GIB), "bench")
    warm = references(1, shape.ref_px)
    timed_job(engine, warm, shape, "warm-up", "per_job")
    rows = []
    for count in ref_counts:
        refs = references(count, shape.ref_px)
        seconds: dict[str, float] = {}
        baselines: tuple[tuple[ReferenceMode, str], ...] = (("recompute", "recompute_s"), ("per_job", "per_job_kv_s"))
        for mode, label in baselines:
            seconds[label] = min(timed_job(engine, refs, shape, f"{mode}-{count}-{i}", mode)[0] for i in range(repeat))
        timed_job(engine, refs, shape, f"builds-the-cache-{count}", "reuse")
        hits = [timed_job(engine, refs, shape, f"hit-{count}-{i}", "reuse") for i in range(repeat)]
        hit_s, hit_timings = min(hits, key=lambda pair: pair[0])
        row = {
            "refs": count,
            "ref_px": shape.ref_px,
            "out_px": shape.out_px,
            "device": device,
            "dtype": str(dtype),
            **{key: round(value, 3) for key, value in seconds.items()},
            "hit_s": round(hit_s, 3),
            "hit_vs_recompute": round(seconds["recompute_s"] / hit_s, 2),
            "hit_vs_per_job_kv": round(seconds["per_job_kv_s"] / hit_s, 2),
            "hit_breakdown": hit_timings,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows
