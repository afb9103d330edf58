"""``kleinfarm bench fp8``: the transformer in bf16, stored as fp8 (layerwise casting) and computed
in fp8 (``worker/engine/fp8.py``), on the same random weights: seconds per job and the latents'
relative L2 error against bf16.

fp8 compute becomes the ``rtx4090`` default only where it is faster than layerwise casting and its
error is no larger; the summary says which (``verdict``). On CPU the errors are real (the same
arithmetic) but the seconds are not a card's: only a CUDA card with fp8 tensor cores times it.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from kleinfarm.shared.klein import GIB
from kleinfarm.worker.bench.card import SIZES, Sizes, reference_set
from kleinfarm.worker.engine import CacheBudgets, RenderEngine
from kleinfarm.worker.engine.fp8 import use_fp8_compute
from kleinfarm.worker.engine.random_model import build_pipeline

WAYS = ("bf16", "fp8-storage", "fp8-compute")
Say = Callable[[dict[str, Any]], None]


def engine_for(way: str, sizes: Sizes, device: str) -> RenderEngine:
    pipeline = build_pipeline(sizes.shape, "cpu", torch.bfloat16)  # the same seed: the same weights
    if way == "fp8-storage":
        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    elif way == "fp8-compute":
        use_fp8_compute(pipeline.transformer)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return RenderEngine(pipeline, "bench-random", device, CacheBudgets(16 * GIB, 16 * GIB, GIB), way)


def jobs(sizes: Sizes) -> list[tuple[str, int, list[Any]]]:
    pair = reference_set(3, 2, sizes.ref)
    return [("generate", sizes.out, []), ("2 refs, miss", sizes.out, pair), ("2 refs, hit", sizes.out, pair)]


def timed(engine: RenderEngine, side: int, refs: list[Any]) -> tuple[float, torch.Tensor]:
    _sync(engine.device)
    started = time.perf_counter()
    result = engine.render_latents("a chair in a sunlit room", 7, side, side, 4, refs)
    _sync(engine.device)
    return time.perf_counter() - started, result.latents.float().cpu()


def run(shapes: str, device: str, say: Say | None = None) -> dict[str, Any]:
    emit = say or (lambda row: print(json.dumps(row), flush=True))
    sizes = SIZES[shapes]
    reference: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    errors: dict[str, float] = {}
    for way in WAYS:
        engine = engine_for(way, sizes, device)
        timed(engine, sizes.out, [])  # warm-up: kernels chosen, prompt cached
        total = 0.0
        for name, side, refs in jobs(sizes):
            elapsed, latents = timed(engine, side, refs)
            total += elapsed
            if way == "bf16":
                reference[name] = latents
            error = float((latents - reference[name]).norm() / reference[name].norm())
            errors[way] = max(errors.get(way, 0.0), error)
            emit({"way": way, "job": name, "s": round(elapsed, 3), "rel_l2_vs_bf16": round(error, 5)})
        seconds[way] = round(total / len(jobs(sizes)), 3)
        del engine
        _free(device)
    summary = {"shapes": shapes, "device": device, "s_per_job": seconds, "max_rel_l2_vs_bf16": errors}
    faster = seconds["fp8-compute"] < seconds["fp8-storage"]
    no_worse = errors["fp8-compute"] <= errors["fp8-storage"]
    timed_on_card = device.startswith("cuda")
    summary["verdict"] = "default" if (timed_on_card and faster and no_worse) else "opt-in"
    emit({"summary": summary})
    return summary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
