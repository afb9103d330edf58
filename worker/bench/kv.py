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
from kleinfarm.shared.klein import GIB
from kleinfarm.shared.refset import content_digest
from kleinfarm.worker.engine import CacheBudgets, RenderEngine
from kleinfarm.worker.engine.plan import ReferenceMode
from kleinfarm.worker.engine.random_model import CPU_BENCH_SHAPE, FULL_SHAPE, PipelineShape, build_pipeline


@dataclass(frozen=True)
class BenchSetting:
    """The model shape of one benchmark setting and the image sizes it renders at."""

    shape: PipelineShape
    out_px: int
    ref_px: int


CPU_SETTING = BenchSetting(CPU_BENCH_SHAPE, out_px=512, ref_px=512)
FULL_SETTING = BenchSetting(FULL_SHAPE, out_px=1024, ref_px=1024)


def references(count: int, side: int) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(count)
    images = [Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8")) for _ in range(count)]
    return [(content_digest(image.tobytes()), image) for image in images]


def timed_job(
    engine: RenderEngine, refs: list[tuple[str, Image.Image]], out_px: int, tag: str, mode: ReferenceMode
) -> tuple[float, dict[str, float]]:
    """Seconds for one whole job (a fresh prompt, so prompt encoding is always paid)."""
    job = EditJob(
        prompt=f"bench {tag}",
        references=[f"ref-{i}.png" for i in range(len(refs))],
        width=out_px,
        height=out_px,
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
    setting = FULL_SETTING if full_size else CPU_SETTING
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline = build_pipeline(setting.shape, device, dtype)
    engine = RenderEngine(pipeline, "bench-random", device, CacheBudgets(16 * GIB, 16 * GIB, GIB), "bench")
    timed_job(engine, references(1, setting.ref_px), setting.out_px, "warm-up", "per_job")
    rows = []
    for count in ref_counts:
        row = {
            "refs": count,
            "ref_px": setting.ref_px,
            "out_px": setting.out_px,
            "device": device,
            "dtype": str(dtype),
            **measure(engine, setting, count, repeat),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def measure(engine: RenderEngine, setting: BenchSetting, count: int, repeat: int) -> dict[str, Any]:
    """The best of ``repeat`` seconds per way of handling ``count`` references, and the ratios."""
    refs, out_px = references(count, setting.ref_px), setting.out_px
    seconds: dict[str, float] = {}
    baselines: tuple[tuple[ReferenceMode, str], ...] = (("recompute", "recompute_s"), ("per_job", "per_job_kv_s"))
    for mode, label in baselines:
        seconds[label] = min(timed_job(engine, refs, out_px, f"{mode}-{count}-{i}", mode)[0] for i in range(repeat))
    # An earlier job with another prompt and seed builds the cache that the timed ones hit.
    timed_job(engine, refs, out_px, f"builds-the-cache-{count}", "reuse")
    hits = [timed_job(engine, refs, out_px, f"hit-{count}-{i}", "reuse") for i in range(repeat)]
    hit_s, hit_timings = min(hits, key=lambda pair: pair[0])
    return {
        **{key: round(value, 3) for key, value in seconds.items()},
        "hit_s": round(hit_s, 3),
        "hit_vs_recompute": round(seconds["recompute_s"] / hit_s, 2),
        "hit_vs_per_job_kv": round(seconds["per_job_kv_s"] / hit_s, 2),
        "hit_breakdown": hit_timings,
    }
