"""The cards the farm is for (issue 9), on CPU: a job's memory arithmetic, room made for it before
it runs, out of memory as the job's fault, the streamed text encoder and prompts encoded ahead.

The figures (peaks and seconds on 24 and 32 GB caps) need a CUDA card: ``kleinfarm bench card``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kleinfarm.shared.capacity import FULL_SIZE, Capability, JobShape, job_need
from kleinfarm.shared.errors import JobTooLargeError
from kleinfarm.shared.klein import GIB
from kleinfarm.shared.refset import content_digest
from kleinfarm.worker.engine import CacheBudgets, RenderEngine
from kleinfarm.worker.engine.admission import model_dims
from kleinfarm.worker.engine.kv_cache import from_diffusers
from kleinfarm.worker.engine.streaming import stream_text_encoder

# The measured caps of issue 9 (a 24,564 / 32,607 MiB card less 600 MiB for the CUDA context), less
# the weights measured after loading through each profile, less what the engine holds beside every
# job there (``admission.held_beside_jobs``): two streamed Qwen3-8B decoder layers (193 M parameters
# each, bf16), the 0.5 GiB prompt cache, and on the fp8-storage profile the largest layer upcast to
# bf16 (the single blocks' fused projection, 4096 x 36864).
QWEN3_LAYER_BYTES = 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288)
HELD = 2 * QWEN3_LAYER_BYTES + GIB // 2
UPCAST = 2 * 4096 * 36864
RTX4090_JOB_BYTES = int((24_564 - 600) / 1024 * GIB - 8.65 * GIB) - HELD - UPCAST
RTX5090_JOB_BYTES = int((32_607 - 600) / 1024 * GIB - 17.07 * GIB) - HELD
Ref = tuple[str, Image.Image]


def reference(seed: int, size: int = 256) -> Ref:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels)
    return content_digest(image.tobytes()), image


A, B = reference(1), reference(2)


@pytest.fixture()
def roomy(tiny_model: Path) -> RenderEngine:
    """No limit on the card: the reference renders."""
    return RenderEngine.load(str(tiny_model), "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20))


def engine_with_card(tiny_model: Path, job_bytes: int) -> RenderEngine:
    probe = RenderEngine.load(str(tiny_model), "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20))
    card = probe.admission.resident + job_bytes
    return RenderEngine.load(str(tiny_model), "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20), card_bytes=card)


def latents(engine: RenderEngine, refs: list[Ref], prompt: str, seed: int) -> Any:
    return engine.render_latents(prompt, seed, 256, 256, 4, refs)


# --- the arithmetic -----------------------------------------------------------------------------


def test_four_1024px_references_fit_both_cards_once_the_kv_is_not_copied_twice() -> None:
    four = JobShape.worst_case(1024, 1024, 4)
    need = job_need(four, FULL_SIZE, extract=True)
    assert need.kv == 8 * GIB  # 0.5 MiB per reference token, 4 x 4096 tokens
    assert need.total <= RTX4090_JOB_BYTES and need.total <= RTX5090_JOB_BYTES
    # What the engine needed before: a second copy of the set's K/V at the end of the extraction.
    assert need.total + need.kv > RTX4090_JOB_BYTES and need.total + need.kv > RTX5090_JOB_BYTES


def test_a_held_set_needs_less_than_building_it_and_bigger_jobs_need_more() -> None:
    shape = JobShape.worst_case(1024, 1024, 2)
    assert job_need(shape, FULL_SIZE, extract=False).total < job_need(shape, FULL_SIZE, extract=True).total
    sizes = [job_need(JobShape.worst_case(side, side, 2)).total for side in (512, 1024, 1440, 2048)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    refs = [job_need(JobShape.worst_case(1024, 1024, count)).total for count in (0, 1, 2, 4)]
    assert refs == sorted(refs) and len(set(refs)) == 4


def test_a_capability_names_the_largest_square_it_runs_per_reference_count() -> None:
    small, large = Capability(job_bytes=RTX5090_JOB_BYTES), Capability(job_bytes=40 * GIB)
    for count in (0, 1, 2, 4):
        side = small.largest_square(count)
        assert side is not None
        assert small.fits(JobShape.worst_case(side, side, count))
        if side < 2048:
            assert not small.fits(JobShape.worst_case(side + 16, side + 16, count))
    assert large.limits() == {"refs0": 2048, "refs1": 2048, "refs2": 2048, "refs4": 2048}
    assert Capability(job_bytes=None).fits(JobShape.worst_case(2048, 2048, 4))


# --- the engine on the tiny model ---------------------------------------------------------------


def test_at_batch_1_the_extracted_kv_are_kept_without_a_second_copy(roomy: RenderEngine) -> None:
    from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

    cache = Flux2KVCache(1, 1)
    k, v = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)
    for layer in (*cache.double_block_caches, *cache.single_block_caches):
        layer.store(k, v)
    cache.num_ref_tokens = 8
    entry = from_diffusers(cache)
    assert entry.double[0][0].data_ptr() == k.data_ptr()
    for layer in (*cache.double_block_caches, *cache.single_block_caches):
        layer.store(torch.cat([k, k]), torch.cat([v, v]))
    batched = from_diffusers(cache)
    assert batched.double[0][0].shape[0] == 1 and batched.double[0][0].data_ptr() != k.data_ptr()


def test_room_is_made_by_demoting_a_set_the_job_does_not_use_and_the_image_is_unchanged(
    tiny_model: Path, roomy: RenderEngine
) -> None:
    dims = model_dims(roomy.pipeline)
    miss = job_need(JobShape(width=256, height=256, reference_tokens=(256,), reference_pixels=256 * 256), dims)
    engine = engine_with_card(tiny_model, miss.total + miss.kv // 2)  # room for one set and a job, not two
    first = latents(engine, [A], "first set", 1)
    assert set(engine.kv_cache.device_tier.entries) == {first.refset} and engine.kv_cache.stats.demotions == 0
    second = latents(engine, [B], "second set", 2)
    assert engine.kv_cache.stats.demotions == 1
    assert set(engine.kv_cache.host_tier.entries) == {first.refset}
    assert set(engine.kv_cache.device_tier.entries) == {second.refset}
    assert torch.equal(second.latents, latents(roomy, [B], "second set", 2).latents)
    again = latents(engine, [A], "the first set again", 3)
    assert again.kv == "host"
    assert torch.equal(again.latents, latents(roomy, [A], "the first set again", 3).latents)


def test_a_job_that_cannot_fit_the_card_fails_at_once_naming_what_it_needs(
    tiny_model: Path, roomy: RenderEngine
) -> None:
    generate = job_need(JobShape(width=256, height=256), model_dims(roomy.pipeline))
    engine = engine_with_card(tiny_model, generate.total)
    with pytest.raises(JobTooLargeError, match=r"256x256 with 2 references needs .* this card has [0-9.]+ MiB"):
        latents(engine, [A, B], "too big", 1)
    assert latents(engine, [], "a generate fits", 1).kv == "none"  # the engine goes on


class OutOfMemoryOnce:
    """A transformer pre-hook that makes a real allocation the CPU allocator refuses, ``times`` times."""

    def __init__(self, times: int) -> None:
        self.left = times

    def __call__(self, _module: Any, _args: Any) -> None:
        if self.left > 0:
            self.left -= 1
            torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the allocator raises, as CUDA would


@pytest.fixture()
def oom_hook(roomy: RenderEngine) -> Iterator[OutOfMemoryOnce]:
    hook = OutOfMemoryOnce(0)
    handle = roomy.pipeline.transformer.register_forward_pre_hook(hook)
    yield hook
    handle.remove()


def job(prompt: str, seed: int, refs: int = 1) -> Any:
    from kleinfarm.shared.jobs import EditJob, GenerateJob

    if refs:
        return EditJob(prompt=prompt, seed=seed, width=256, height=256, references=["s3://b/a.png"] * refs)
    return GenerateJob(prompt=prompt, seed=seed, width=256, height=256)


def test_out_of_memory_once_empties_the_caches_and_the_job_renders_the_same_image(
    roomy: RenderEngine, oom_hook: OutOfMemoryOnce, tiny_model: Path
) -> None:
    roomy.render(job("builds a set", 1), [A])
    oom_hook.left = 1
    result = roomy.render(job("runs out once", 2), [B])
    assert not roomy.kv_cache.device_tier.entries or set(roomy.kv_cache.device_tier.entries) == {result.refset}
    clean = RenderEngine.load(str(tiny_model), "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20))
    assert np.array_equal(np.asarray(result.image), np.asarray(clean.render(job("runs out once", 2), [B]).image))


def test_out_of_memory_twice_fails_the_job_and_the_engine_renders_the_next(
    roomy: RenderEngine, oom_hook: OutOfMemoryOnce
) -> None:
    oom_hook.left = 2
    with pytest.raises(JobTooLargeError, match="ran out of memory twice"):
        roomy.render(job("never fits", 1), [A])
    assert roomy.render(job("the next job", 2), [A]).kv == "miss"


# --- prompts ------------------------------------------------------------------------------------


def test_the_streamed_text_encoder_moves_each_layer_in_and_out_and_gives_the_same_embeddings(
    tiny_model: Path, roomy: RenderEngine
) -> None:
    streamed = RenderEngine.load(str(tiny_model), "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20))
    encoder = streamed.pipeline.text_encoder
    module = stream_text_encoder(encoder, torch.device("cpu"), streamed.text_layers)
    layer = encoder.model.layers[0]
    host = dict(module.host[0])[layer.self_attn.q_proj.weight]
    seen: list[int] = []
    layer.register_forward_pre_hook(lambda *_: seen.append(layer.self_attn.q_proj.weight.data_ptr()))
    embeddings, _ = streamed.prompts.get("a red bicycle")
    expected, _ = roomy.prompts.get("a red bicycle")
    assert torch.equal(embeddings, expected)
    assert seen and seen[0] != host.data_ptr()  # it ran on a copy brought in for it...
    assert layer.self_attn.q_proj.weight.data_ptr() == host.data_ptr()  # ...and went back out
    assert module.loads == len(encoder.model.layers) and not module.copied


def test_layers_after_the_last_hidden_state_read_are_not_streamed_and_change_nothing(
    tiny_model: Path, roomy: RenderEngine
) -> None:
    streamed = RenderEngine.load(str(tiny_model), "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20))
    encoder = streamed.pipeline.text_encoder
    stream_text_encoder(encoder, torch.device("cpu"), read_layers=(1,))
    assert len(encoder.model.layers) == 2  # of 3: hidden_states[1] is read, and must not be the normed last
    kwargs = {"device": torch.device("cpu"), "max_sequence_length": 512, "text_encoder_out_layers": (1,)}
    ours, _ = streamed.pipeline.encode_prompt(prompt="a lamp", **kwargs)
    theirs, _ = roomy.pipeline.encode_prompt(prompt="a lamp", **kwargs)
    assert torch.equal(ours, theirs)


def test_prompts_of_held_jobs_are_encoded_ahead_once_and_give_the_same_image(
    roomy: RenderEngine, tiny_model: Path
) -> None:
    assert roomy.encode_ahead(["the next job's prompt", "the one after"]) == 2
    assert roomy.encode_ahead(["the next job's prompt"]) == 0  # under way or done: not twice
    ahead = latents(roomy, [A], "the next job's prompt", 4)
    assert ahead.prompt == "ahead"
    assert latents(roomy, [A], "the next job's prompt", 5).prompt == "cached"
    assert latents(roomy, [A], "a prompt nobody announced", 6).prompt == "encoded"
    clean = RenderEngine.load(str(tiny_model), "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20))
    assert torch.equal(ahead.latents, latents(clean, [A], "the next job's prompt", 4).latents)


def test_bench_card_runs_its_whole_stream_and_encodes_each_next_prompt_ahead() -> None:
    from kleinfarm.worker.bench.card import STEADY_JOBS, run

    rows: list[dict[str, Any]] = []
    summary = run("4", "tiny", "cpu", baselines=True, say=rows.append)
    assert summary["kleinfarm"]["failed_jobs"] == 0 and summary["diffusers"]["failed_jobs"] == 0
    jobs = [row for row in rows if row.get("run") == "kleinfarm-cpu"]
    assert len(jobs) == 10 + 2 * STEADY_JOBS
    assert [row["kv"] for row in jobs[2:4]] == ["miss", "device"]
    distinct = [row["prompt"] for row in jobs if row["job"] == "steady-distinct"]
    assert distinct[0] == "encoded" and set(distinct[1:]) == {"ahead"}
    repeated = [row["prompt"] for row in jobs if row["job"] == "steady-repeated"]
    assert repeated[0] == "ahead" and set(repeated[1:]) == {"cached"}  # announced by the job before it
    assert summary["diffusers_over_kleinfarm"] > 0


# --- fp8 ----------------------------------------------------------------------------------------


def test_an_fp8_linear_multiplies_in_fp8_within_its_rounding_of_bf16() -> None:
    from kleinfarm.worker.engine.fp8 import Fp8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(3, 37, 64, dtype=torch.bfloat16)  # 111 rows: padded to a multiple of 16 inside
    with torch.no_grad():
        expected, got = linear(x).float(), Fp8Linear(linear)(x).float()
    assert got.shape == expected.shape
    assert 0 < float((got - expected).norm() / expected.norm()) < 0.06  # e4m3 keeps 3 mantissa bits


def test_the_rtx4090_layout_with_fp8_compute_replaces_every_block_linear_and_renders(tiny_model: Path) -> None:
    from diffusers import DiffusionPipeline

    from kleinfarm.worker.engine.fp8 import Fp8Linear
    from kleinfarm.worker.engine.loading import place
    from kleinfarm.worker.engine.profiles import MemoryProfile

    pipeline = DiffusionPipeline.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    place(
        pipeline, MemoryProfile("rtx4090", "fp8", "device", 1 << 30, 1 << 30, 1 << 20), torch.device("cpu"), "compute"
    )
    blocks = [*pipeline.transformer.transformer_blocks, *pipeline.transformer.single_transformer_blocks]
    linears = [module for block in blocks for module in block.modules() if isinstance(module, torch.nn.Linear)]
    assert not linears and any(isinstance(module, Fp8Linear) for module in blocks[0].modules())
    engine = RenderEngine(pipeline, "tiny", "cpu", CacheBudgets(1 << 30, 1 << 30, 1 << 20))
    assert torch.isfinite(latents(engine, [A], "fp8 compute", 1).latents).all()


def test_a_card_speed_follows_its_own_renders_from_the_nominal_figure() -> None:
    from kleinfarm.worker.farm.speed import MAX_STEP, SpeedMeter

    meter = SpeedMeter(1.7)
    for _ in range(40):
        meter.observe(estimated_s=2.0, measured_s=2.0)  # this card renders at the cost model's pace
    assert abs(meter.speed - 1.0) < 0.01 and meter.renders == 40
    meter.observe(estimated_s=2.0, measured_s=1e-6)  # one absurd render moves it at most MAX_STEP-fold
    assert meter.speed < 1.01 * (1.0 + 0.2 * (MAX_STEP - 1.0))
    meter.observe(estimated_s=0.0, measured_s=1.0)  # nothing to learn from a job without an estimate
    assert meter.renders == 41
