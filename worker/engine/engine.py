"""The render engine: our own denoising loop around the FLUX.2 [klein] KV transformer.

diffusers' ``Flux2KleinKVPipeline`` extracts the reference K/V at step 0 of every call and drops
them. Here they are kept under the reference-set key (``kv_cache.py``), and prompt embeddings
under the prompt (``prompt_cache.py``); everything else reuses the pipeline's own pieces, so a
job gives the same image as the pipeline with the same inputs and seed (``docs/engine.md``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, assert_never

import numpy as np
import torch
from PIL import Image

from kleinfarm.shared.capacity import gib
from kleinfarm.shared.errors import JobTooLargeError
from kleinfarm.shared.jobs import EditJob, GenerateJob
from kleinfarm.shared.klein import REFERENCE_MAX_AREA, TEXT_TOKENS
from kleinfarm.shared.records import EngineReport
from kleinfarm.shared.refset import reference_set_key
from kleinfarm.worker.engine.admission import (
    Admission,
    card_limit,
    held_beside_jobs,
    is_out_of_memory,
    model_dims,
    resident_bytes,
)
from kleinfarm.worker.engine.kv_cache import Entry, ReferenceKVCache, from_diffusers, to_diffusers
from kleinfarm.worker.engine.loading import Fp8Mode, check_supported, place, text_encoder_layers
from kleinfarm.worker.engine.plan import (
    JobReferences,
    KVSource,
    ReferenceMode,
    ReferencePlan,
    TransformerCall,
    call_for_step,
    decide_plan,
    default_mode,
)
from kleinfarm.worker.engine.profiles import HEADROOM, MemoryProfile, ProfileName, profile_for_card
from kleinfarm.worker.engine.prompt_cache import PromptCache
from kleinfarm.worker.engine.prompt_encoder import PromptEncoder
from kleinfarm.worker.engine.results import ImageResult, LatentResult
from kleinfarm.worker.engine.streaming import StreamedModule

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
References = list[tuple[str, Image.Image]]


def pick_device(requested: str | None = None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def physical_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class CacheBudgets:
    """Bytes for the reference K/V tiers and the prompt cache."""

    kv_device: int
    kv_host: int
    prompts: int

    @classmethod
    def from_profile(cls, profile: MemoryProfile, device: torch.device) -> CacheBudgets:
        """The profile's budgets, capped by what the card really has free once the model is loaded."""
        kv_device = profile.kv_device_bytes
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            kv_device = max(min(kv_device, free - HEADROOM), 0)
        return cls(kv_device=kv_device, kv_host=profile.kv_host_bytes, prompts=profile.prompt_bytes)


@dataclass(frozen=True)
class _Step:
    """The inputs of one transformer call that do not depend on the references."""

    latents: torch.Tensor
    latent_ids: torch.Tensor
    timestep: torch.Tensor
    text: dict[str, Any]


class RenderEngine:
    """Renders generate and edit jobs on one pipeline, on one device, with caches across jobs."""

    def __init__(
        self,
        pipeline: Any,
        model: str,
        device: str,
        budgets: CacheBudgets,
        profile: str = "custom",
        card_bytes: int | None = None,
        streamer: StreamedModule | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model = model
        self.device = torch.device(device)
        self.text_layers = text_encoder_layers(pipeline.text_encoder.config.num_hidden_layers)
        self.profile = profile
        self.kv_cache = ReferenceKVCache(self.device, budgets.kv_device, budgets.kv_host)
        self.prompt_cache = PromptCache(budgets.prompts)
        self.prompts = PromptEncoder(self._encode_prompt, self.prompt_cache, self.device)
        self.streamer = streamer
        self.weights = resident_bytes((pipeline.transformer, pipeline.vae, pipeline.text_encoder), self.device)
        resident = self.weights + held_beside_jobs(pipeline.transformer, streamer, budgets.prompts)
        self.admission = Admission(model_dims(pipeline), card_limit(self.device, card_bytes), resident)

    def set_budgets(self, budgets: CacheBudgets) -> None:
        """New cache budgets (before anything is cached); the prompt budget is held on the card."""
        self.kv_cache.device_tier.budget, self.kv_cache.host_tier.budget = budgets.kv_device, budgets.kv_host
        self.prompt_cache.budget = budgets.prompts
        held = held_beside_jobs(self.pipeline.transformer, self.streamer, budgets.prompts)
        self.admission.resident = self.weights + held

    @classmethod
    def load(
        cls,
        model: str,
        device: str | None = None,
        budgets: CacheBudgets | None = None,
        profile: ProfileName = "auto",
        card_bytes: int | None = None,
        fp8: Fp8Mode = "storage",
    ) -> RenderEngine:
        """``from_pretrained`` of a Hub id or a local folder, laid out by the card's memory profile.

        The pipeline class comes from the checkpoint: a KV checkpoint reuses reference K/V across
        jobs; any other klein checkpoint (e.g. the Apache-2.0 4B) recomputes references every step.
        ``card_bytes`` is what the worker may use of its card (default: the allocator's cap on CUDA,
        no limit on CPU); the profile, the cache budgets and each job's admission follow from it.
        """
        from diffusers import DiffusionPipeline

        device = pick_device(device)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        started = time.perf_counter()
        pipeline = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        check_supported(pipeline, model)
        engine = cls.from_pipeline(pipeline, model, device, budgets, profile, card_bytes, fp8)
        log.info("loaded %s on %s (%s, profile %s) in %.1f s", model, device, dtype, engine.profile, _lap(started))
        return engine

    @classmethod
    def from_pipeline(
        cls,
        pipeline: Any,
        model: str,
        device: str,
        budgets: CacheBudgets | None = None,
        profile: ProfileName = "auto",
        card_bytes: int | None = None,
        fp8: Fp8Mode = "storage",
    ) -> RenderEngine:
        """An engine around a pipeline in host memory, laid out on ``device`` by the card's profile."""
        card = torch.device(device)
        card_bytes = card_limit(card, card_bytes)
        layout = profile_for_card(profile, card_bytes if card.type == "cuda" else None, physical_memory())
        streamer = place(pipeline, layout, card, fp8)
        pipeline.set_progress_bar_config(disable=True)
        budgets = budgets or CacheBudgets.from_profile(layout, card)
        return cls(pipeline, model, device, budgets, layout.name, card_bytes, streamer)

    @property
    def kv_reuse(self) -> bool:
        """Whether this checkpoint was trained with the reference mask, so its reference K/V can be reused."""
        return type(self.pipeline).__name__ == "Flux2KleinKVPipeline"

    def render(
        self, job: GenerateJob | EditJob, references: References, on_step: StepCallback | None = None
    ) -> ImageResult:
        """Render one job; ``references`` are (content digest, image); ``on_step`` may raise to stop.

        Out of memory once, the engine frees what it holds on the card and runs the job again; twice,
        the job fails with what it needed (``JobTooLargeError``: the job's fault, the worker goes on).
        """
        if job.seed is None:
            raise ValueError("a job reaches the engine with its seed drawn at submit time")
        for attempt in (1, 2):
            try:
                return self._render_once(job, references, on_step)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                failure = str(error).splitlines()[0]  # the text only: the traceback holds the attempt's tensors
            # Outside the handler: the failed attempt's frames (and their tensors) are gone.
            log.warning("out of memory rendering %r (attempt %d): caches emptied", job.prompt[:40], attempt)
            self.free_memory()
        shape = self.admission.shape(job.width, job.height, [image for _, image in references])
        limit = self.admission.job_bytes
        raise JobTooLargeError(
            f"{shape.describe()} ran out of memory twice, the second time with every cache moved off the card"
            + (f" ({gib(limit)} for a job beside the weights)" if limit is not None else "")
            + f": {failure}"
        )

    def _render_once(
        self, job: GenerateJob | EditJob, references: References, on_step: StepCallback | None
    ) -> ImageResult:
        assert job.seed is not None
        result = self.render_latents(job.prompt, job.seed, job.width, job.height, job.steps, references, on_step)
        started = time.perf_counter()
        with torch.inference_mode():
            decoded = self.pipeline.vae.decode(result.latents, return_dict=False)[0]
            image = self.pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
        timings = {**result.timings, "decode_s": _lap(started)}
        return ImageResult(image, timings, result.refset, result.kv, result.prompt)

    def free_memory(self) -> None:
        """Move every cached K/V off the card and drop the prompt embeddings (after running out)."""
        self.kv_cache.free_device()
        self.prompts.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def render_latents(
        self,
        prompt: str,
        seed: int,
        width: int,
        height: int,
        steps: int,
        references: References,
        on_step: StepCallback | None = None,
        batch_size: int = 1,
        mode: ReferenceMode | None = None,
    ) -> LatentResult:
        """The denoising loop; returns VAE-ready latents (as the pipeline's ``output_type='latent'``).

        ``mode`` overrides how references are handled (the benchmark compares all three).
        """
        pipe, timings = self.pipeline, {}
        mode = mode or default_mode(self.kv_reuse)
        started = time.perf_counter()

        # 0. Room on the card: entries this job does not use move to host memory until it fits.
        key = reference_set_key(self.model, [digest for digest, _ in references]) if references else None
        shape = self.admission.shape(width, height, [image for _, image in references])
        self.admission.make_room(shape, self.kv_cache, key if mode == "reuse" else None)
        # A CPU generator makes the noise, hence the image, the same on every device.
        generator = torch.Generator("cpu").manual_seed(seed)

        # 1. Prompt embeddings, from the cache when this prompt was seen.
        embeddings, prompt_source = self.prompts.get(prompt)
        embeddings = embeddings.repeat(batch_size, 1, 1)
        text_ids = pipe._prepare_text_ids(embeddings).to(self.device)
        timings["prompt_s"] = _lap(started)

        # 2. Initial noise from the seed (drawn before anything else uses the generator, as in the pipeline).
        latents, latent_ids = pipe.prepare_latents(
            batch_size=batch_size,
            num_latents_channels=pipe.transformer.config.in_channels // 4,
            height=height,
            width=width,
            dtype=embeddings.dtype,
            device=self.device,
            generator=generator,
        )

        # 3. The schedule, as the pipeline computes it.
        timesteps = self._timesteps(latents.shape[1], steps)

        # 4. References: the plan for every step, with what it needs (held K/V or reference latents).
        refs = self._references(references, batch_size, generator, mode)
        timings["setup_s"] = round(_lap(started) - timings["prompt_s"], 4)

        # 5. Denoise.
        text = {"encoder_hidden_states": embeddings, "txt_ids": text_ids, "guidance": None, "return_dict": False}
        for index, t in enumerate(timesteps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            noise = self._predict(index, _Step(latents, latent_ids, timestep, text), refs)
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(index + 1, steps)
        timings["denoise_s"] = round(_lap(started) - timings["prompt_s"] - timings["setup_s"], 4)

        # 6. Unpack to VAE latents.
        latents = self._to_vae_latents(latents, latent_ids)
        timings["total_s"] = _lap(started)
        return LatentResult(latents, timings, refs.key, refs.source, prompt_source)

    def _references(
        self, references: References, batch_size: int, generator: torch.Generator, mode: ReferenceMode
    ) -> JobReferences:
        """Decide the job's plan (looking the set up in ``reuse`` mode) and prepare what it needs."""
        if not references:
            return JobReferences()
        key = reference_set_key(self.model, [digest for digest, _ in references])
        entry, source = self._lookup(key, mode)
        plan = decide_plan(True, mode, cache_hit=entry is not None)
        # Only a reuse-mode miss keeps what it extracts: per_job drops it, as the KV pipeline does.
        keep = mode == "reuse" and plan is ReferencePlan.EXTRACT_THEN_CACHED
        refs = JobReferences(plan, key, source, keep_as=key if keep else None)
        if entry is not None:
            refs.kv = to_diffusers(entry, batch_size)
        else:
            refs.latents, refs.ids = self._reference_latents([image for _, image in references], batch_size, generator)
        return refs

    def _lookup(self, key: str, mode: ReferenceMode) -> tuple[Entry | None, KVSource]:
        """The held K/V in ``reuse`` mode (a lookup counts as a hit or a miss); other modes never look."""
        if mode == "reuse":
            return self.kv_cache.get(key)
        return None, mode

    def _predict(self, index: int, step: _Step, refs: JobReferences) -> torch.Tensor:
        """One transformer call, of the kind the job's plan gives this step."""
        call = call_for_step(refs.plan, index)
        if call is TransformerCall.PLAIN:
            return self._forward(step)
        if call is TransformerCall.CARRY:
            return self._forward_carrying(step, refs)
        if call is TransformerCall.EXTRACT:
            return self._forward_extracting(step, refs)
        if call is TransformerCall.CACHED:
            return self._forward(step, kv_cache=refs.cache(), kv_cache_mode="cached")
        assert_never(call)

    def _forward(self, step: _Step, **kv: Any) -> torch.Tensor:
        """The image tokens alone, with the reference K/V (cached mode) or without references."""
        transformer = self.pipeline.transformer
        hidden = step.latents.to(transformer.dtype)
        noise = transformer(hidden_states=hidden, img_ids=step.latent_ids, timestep=step.timestep, **kv, **step.text)[0]
        return noise  # type: ignore[no-any-return]

    def _forward_carrying(self, step: _Step, refs: JobReferences) -> torch.Tensor:
        """Reference tokens appended after the image tokens, as ``Flux2KleinPipeline`` does every step."""
        transformer = self.pipeline.transformer
        ref_latents, ref_ids = refs.tokens()
        noise = transformer(
            hidden_states=torch.cat([step.latents.to(transformer.dtype), ref_latents.to(transformer.dtype)], dim=1),
            img_ids=torch.cat([step.latent_ids, ref_ids], dim=1),
            timestep=step.timestep,
            **step.text,
        )[0]
        return noise[:, : step.latents.shape[1]]  # type: ignore[no-any-return]

    def _forward_extracting(self, step: _Step, refs: JobReferences) -> torch.Tensor:
        """Reference tokens first, K/V extracted for the later steps (and kept, in ``reuse`` mode)."""
        transformer = self.pipeline.transformer
        ref_latents, ref_ids = refs.tokens()
        noise, refs.kv = transformer(
            hidden_states=torch.cat([ref_latents.to(transformer.dtype), step.latents.to(transformer.dtype)], dim=1),
            img_ids=torch.cat([ref_ids, step.latent_ids], dim=1),
            timestep=step.timestep,
            kv_cache_mode="extract",
            num_ref_tokens=ref_latents.shape[1],
            **step.text,
        )
        if refs.keep_as is not None:
            self.kv_cache.put(refs.keep_as, from_diffusers(refs.kv))
        return noise  # type: ignore[no-any-return]

    def holds(self, digests: list[str]) -> bool:
        """Whether the K/V of the reference set with these content digests are held (either tier)."""
        return reference_set_key(self.model, digests) in self.kv_cache.held_keys()

    def encode_ahead(self, prompts: list[str]) -> int:
        """Encode the prompts of jobs this worker holds while the current one renders."""
        return self.prompts.ahead(prompts)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        embeddings: torch.Tensor
        try:
            with torch.inference_mode():
                embeddings, _ = self.pipeline.encode_prompt(
                    prompt=prompt,
                    device=self.device,
                    max_sequence_length=TEXT_TOKENS,
                    text_encoder_out_layers=self.text_layers,
                )
        finally:
            if self.streamer is not None:
                self.streamer.release()  # a pass that raised half-way leaves no layer on the card
        return embeddings

    def _timesteps(self, image_seq_len: int, steps: int) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import compute_empirical_mu, retrieve_timesteps

        scheduler = self.pipeline.scheduler
        sigmas = None if getattr(scheduler.config, "use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps  # type: ignore[no-any-return]

    def _reference_latents(
        self, images: list[Image.Image], batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocess as the pipeline does (area cap, floor to the patch multiple, crop), then encode."""
        pipe = self.pipeline
        multiple = pipe.vae_scale_factor * 2
        prepared = []
        for image in images:
            image = image.convert("RGB")  # reads the pixels of a reference opened lazily (a held set's)
            if image.width * image.height > REFERENCE_MAX_AREA:
                image = pipe.image_processor._resize_to_target_area(image, REFERENCE_MAX_AREA)
            width, height = (image.width // multiple) * multiple, (image.height // multiple) * multiple
            prepared.append(pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop"))
        return pipe.prepare_image_latents(  # type: ignore[no-any-return]
            images=prepared, batch_size=batch_size, generator=generator, device=self.device, dtype=pipe.vae.dtype
        )

    def _to_vae_latents(self, latents: torch.Tensor, latent_ids: torch.Tensor) -> torch.Tensor:
        pipe = self.pipeline
        latents = pipe._unpack_latents_with_ids(latents, latent_ids)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        return pipe._unpatchify_latents(latents * std.to(latents.device, latents.dtype) + mean)  # type: ignore[no-any-return]

    def memory(self) -> dict[str, int]:
        """Bytes in use: the card's (allocated and reserved by torch) or, on CPU, the process's peak."""
        if self.device.type == "cuda":
            return {
                "device_allocated": int(torch.cuda.memory_allocated(self.device)),
                "device_reserved": int(torch.cuda.memory_reserved(self.device)),
            }
        import resource

        return {"process_peak_rss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}

    def report(self) -> EngineReport:
        """What the engine holds, for the worker registry and metrics."""
        return EngineReport(
            profile=self.profile,
            memory=self.memory(),
            kv=self.kv_cache.report(),
            prompts=self.prompt_cache.report(),
            capability=self.admission.capability(),
        )


def _lap(started: float) -> float:
    return round(time.perf_counter() - started, 4)
