"""``kleinfarm bench card``: one fixed stream of jobs on a card capped to a 24 or 32 GB card's memory.

The allocator is capped at the card's memory less a CUDA context (``set_per_process_memory_fraction``),
the random-weight model is laid out by the card's profile, and every job prints its seconds, where
its K/V came from, how its prompt was had, its measured peak and the peak the engine's arithmetic
predicted (``shared/capacity.py``). The steady stream then runs again through what a user of that
card would otherwise run (``Flux2KleinKVPipeline`` with diffusers' ``enable_model_cpu_offload``)
and, when the card is larger than the cap, on the whole card with the ``large`` profile.

On CPU (``--shapes cpu`` or ``tiny``) the same stream runs at small sizes with the cap given to the
engine only: a check of the script and of admission, not a figure (no peak is measured there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from kleinfarm.shared.capacity import gib
from kleinfarm.shared.jobs import EditJob, GenerateJob
from kleinfarm.shared.klein import GIB
from kleinfarm.shared.refset import content_digest
from kleinfarm.worker.engine import RenderEngine
from kleinfarm.worker.engine.random_model import CPU_BENCH_SHAPE, FULL_SHAPE, TINY_SHAPE, PipelineShape

MIB = 1024**2
CONTEXT_MIB = 600  # what the CUDA context takes of a card before the allocator gets any
CARDS_MIB = {"rtx4090": 24_564, "rtx5090": 32_607}
STEADY_JOBS = 20
BASELINE_JOBS = 3  # diffusers' offloaded pipeline takes ~20 s a job on a 32 GB cap
Say = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Sizes:
    """The model and the image sides the stream uses: full size on CUDA, small ones on CPU."""

    shape: PipelineShape
    out: int
    large_out: int
    huge_out: int
    ref: int


SIZES = {
    "full": Sizes(FULL_SHAPE, out=1024, large_out=1440, huge_out=2048, ref=1024),
    "cpu": Sizes(CPU_BENCH_SHAPE, out=256, large_out=384, huge_out=512, ref=256),
    "tiny": Sizes(TINY_SHAPE, out=256, large_out=320, huge_out=384, ref=256),
}


def card_mib(card: str) -> int:
    """A card's memory in MiB: a named card, or a number of GiB."""
    return CARDS_MIB[card] if card in CARDS_MIB else int(float(card) * 1024)


def reference_set(seed: int, count: int, side: int) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8")) for _ in range(count)]
    return [(content_digest(image.tobytes()), image) for image in images]


class Stream:
    """Runs jobs through one engine, printing a row per job."""

    def __init__(self, engine: RenderEngine, label: str, say: Say) -> None:
        self.engine, self.label, self.say = engine, label, say
        self.rows: list[dict[str, Any]] = []
        self.seed = 0

    def job(self, name: str, prompt: str, side: int, refs: list[tuple[str, Image.Image]], ahead: str = "") -> None:
        self.seed += 1
        urls = [f"s3://bench/ref-{index}.png" for index in range(len(refs))]
        spec: GenerateJob | EditJob = (
            EditJob(prompt=prompt, references=urls, width=side, height=side, seed=self.seed)
            if refs
            else GenerateJob(prompt=prompt, width=side, height=side, seed=self.seed)
        )
        device = self.engine.device
        shape = self.engine.admission.shape(side, side, [image for _, image in refs])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if ahead:  # the worker knows the next job's prompt while this one renders
            self.engine.encode_ahead([ahead])
        started = time.perf_counter()
        row: dict[str, Any] = {"run": self.label, "job": name, "shape": shape.describe()}
        try:
            result = self.engine.render(spec, refs)
            row.update(kv=result.kv, prompt=result.prompt, timings=result.timings)
        except Exception as error:  # noqa: BLE001 - a failed job is reported, never counted as a render
            row.update(error=f"{type(error).__name__}: {error}"[:300])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
        row["s"] = round(time.perf_counter() - started, 3)
        row["predicted"] = gib(self.engine.admission.resident + _need(self.engine, shape))
        self.rows.append(row)
        self.say(row)

    def steady(self, refs: list[tuple[str, Image.Image]], side: int, distinct: bool) -> list[dict[str, Any]]:
        """Hits on one held set: every prompt new, or one prompt repeated."""
        kind = "distinct" if distinct else "repeated"
        prompts = [f"steady {kind} {i}" if distinct else "steady repeated" for i in range(STEADY_JOBS + 1)]
        start = len(self.rows)
        for index in range(STEADY_JOBS):
            self.job(f"steady-{kind}", prompts[index], side, refs, ahead=prompts[index + 1])
        return self.rows[start:]


def _need(engine: RenderEngine, shape: Any) -> int:
    from kleinfarm.shared.capacity import job_need

    return job_need(shape, engine.admission.dims).total


def per_job(rows: list[dict[str, Any]]) -> float | None:
    """Mean seconds per job of rows that rendered; None if any failed (a failed job is never counted)."""
    if not rows or any("error" in row for row in rows):
        return None
    return round(float(sum(row["s"] for row in rows)) / len(rows), 3)


def run_stream(engine: RenderEngine, sizes: Sizes, label: str, say: Say) -> dict[str, Any]:
    """The fixed stream of issue 9, then the steady streams; returns the summary figures."""
    stream = Stream(engine, label, say)
    first, second = reference_set(1, 4, sizes.ref), reference_set(2, 4, sizes.ref)
    pair = reference_set(3, 2, sizes.ref)
    stream.job("generate, new prompt", "a red bicycle", sizes.out, [])
    stream.job("generate, same prompt", "a red bicycle", sizes.out, [])
    stream.job("4 refs, miss", "four refs", sizes.out, first)
    stream.job("4 refs, larger output", "four refs, larger", sizes.large_out, first)
    stream.job("4 refs, hit, new prompt", "four refs, another", sizes.out, first)
    stream.job("4 refs, hit, new prompt", "four refs, one more", sizes.out, first)
    stream.job("second 4-ref set (demotes)", "the second set", sizes.out, second)
    stream.job("first set, host tier", "the first set again", sizes.out, first)
    stream.job("2 refs, miss, 4-ref set held", "two refs", sizes.out, pair)
    stream.job("generate, largest", "a wide landscape", sizes.huge_out, [])
    distinct = per_job(stream.steady(pair, sizes.out, distinct=True))
    repeated = per_job(stream.steady(pair, sizes.out, distinct=False))
    peaks = [row["peak_gib"] for row in stream.rows if "peak_gib" in row]
    return {
        "run": label,
        "failed_jobs": sum("error" in row for row in stream.rows),
        "max_peak_gib": max(peaks) if peaks else None,  # measured on CUDA only
        "steady_distinct_s": distinct,
        "steady_repeated_s": repeated,
        "distinct_over_repeated": round(distinct / repeated, 3) if distinct and repeated else None,
    }


def offloaded_pipeline_stream(engine: RenderEngine, sizes: Sizes, say: Say) -> dict[str, Any]:
    """What a user of the card runs without kleinfarm: the KV pipeline with diffusers' offloading."""
    pipeline = engine.pipeline
    pair = reference_set(3, 2, sizes.ref)
    rows = []
    for index in range(BASELINE_JOBS):
        started = time.perf_counter()
        row: dict[str, Any] = {"run": "diffusers-offload", "job": "steady-distinct"}
        try:
            pipeline(
                image=[image for _, image in pair],
                prompt=f"baseline {index}",
                width=sizes.out,
                height=sizes.out,
                generator=torch.Generator("cpu").manual_seed(index),
                text_encoder_out_layers=engine.text_layers,
            )
        except Exception as error:  # noqa: BLE001 - reported, never counted
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        _sync(engine.device)
        row["s"] = round(time.perf_counter() - started, 3)
        rows.append(row)
        say(row)
    return {
        "run": "diffusers-offload",
        "steady_distinct_s": per_job(rows),
        "failed_jobs": sum("error" in r for r in rows),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cap_allocator(device: torch.device, cap_bytes: int) -> None:
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_bytes > total:
        raise SystemExit(f"this card has {gib(total)}: it cannot stand in for a {gib(cap_bytes)} cap")
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, device)


def build(sizes: Sizes, device: str, profile: str, cap_bytes: int | None) -> RenderEngine:
    from kleinfarm.worker.engine.random_model import build_pipeline

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline = build_pipeline(sizes.shape, "cpu", dtype)  # laid out on the card by the profile
    return RenderEngine.from_pipeline(pipeline, "bench-random", device, None, profile, cap_bytes)  # type: ignore[arg-type]


def run(card: str, shapes: str, device: str, baselines: bool, say: Say | None = None) -> dict[str, Any]:
    """The stream on the capped card, then the baselines; prints one JSON line per job and a summary."""
    emit = say or (lambda row: print(json.dumps(row), flush=True))
    sizes = SIZES[shapes]
    cap = (card_mib(card) - CONTEXT_MIB) * MIB
    card_device = torch.device(device)
    if card_device.type == "cuda":
        cap_allocator(card_device, cap)
    engine = build(sizes, device, "auto", cap)
    emit(
        {
            "run": "setup",
            "card": card,
            "cap": gib(cap),
            "profile": engine.profile,
            "resident": gib(engine.admission.resident),
        }
    )
    summary: dict[str, Any] = {"card": card, "cap_gib": round(cap / GIB, 2), "profile": engine.profile}
    ours = run_stream(engine, sizes, f"kleinfarm-{engine.profile}", emit)
    summary["kleinfarm"] = ours
    del engine
    _free(card_device)
    if baselines:
        summary["diffusers"] = offloaded_baseline(sizes, device, emit)
        if card_device.type == "cuda" and torch.cuda.get_device_properties(card_device).total_memory > cap:
            torch.cuda.set_per_process_memory_fraction(1.0, card_device)
            large = build(sizes, device, "large", None)
            summary["large"] = run_stream(large, sizes, "kleinfarm-large", emit)
            del large
            _free(card_device)
    summary.update(_ratios(summary))
    emit({"summary": summary})
    return summary


def offloaded_baseline(sizes: Sizes, device: str, say: Say) -> dict[str, Any]:
    from kleinfarm.worker.engine import CacheBudgets
    from kleinfarm.worker.engine.random_model import build_pipeline

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipeline = build_pipeline(sizes.shape, "cpu", dtype)
    pipeline.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        pipeline.enable_model_cpu_offload(device=device)
    holder = RenderEngine(
        pipeline, "bench-random", "cpu" if not device.startswith("cuda") else device, CacheBudgets(0, 0, 0)
    )
    result = offloaded_pipeline_stream(holder, sizes, say)
    del holder, pipeline
    _free(torch.device(device))
    return result


def _ratios(summary: dict[str, Any]) -> dict[str, Any]:
    ours = summary["kleinfarm"]["steady_distinct_s"]
    ratios: dict[str, Any] = {}
    large = summary.get("large", {}).get("steady_distinct_s")
    if ours and large:
        ratios["card_over_whole_card"] = round(ours / large, 3)
    theirs = summary.get("diffusers", {}).get("steady_distinct_s")
    if ours and theirs:
        ratios["diffusers_over_kleinfarm"] = round(theirs / ours, 2)
    return ratios


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
