"""The render engine: our own denoising loop around the FLUX.2 [klein] KV transformer.

diffusers' ``Flux2KleinKVPipeline`` extracts the reference K/V at step 0 of every call and drops
them. Here they are kept under the reference-set key (``kv_cache.py``), and prompt embeddings
under the prompt (``prompt_cache.py``); everything else reuses the pipeline's own pieces, so a
job gives the same image as the pipeline with the same inputs and seed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.jobs import EditJob, GenerateJob
from kleinfarm.shared.refset import reference_set_key
from kleinfarm.worker.kv_cache import ReferenceKVCache, from_diffusers, to_diffusers
from kleinfarm.worker.profiles import HEADROOM, MemoryProfile, ProfileName, profile_for_card
from kleinfarm.worker.prompt_cache import PromptCache

log = logging.getLogger(__name__)

# The layers of Qwen3-8B whose hidden states the pipeline stacks into the prompt embedding.
DEFAULT_TEXT_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512
REFERENCE_MAX_AREA = 1024 * 1024

StepCallback = Callable[[int, int], None]


def text_encoder_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """The real model's layers where they exist, else three evenly spaced (the tiny model)."""
    if num_hidden_layers >= max(DEFAULT_TEXT_LAYERS):
        return DEFAULT_TEXT_LAYERS
    third = max(num_hidden_layers // 3, 1)
    return (third, 2 * third, num_hidden_layers)


def pick_device(requested: str | None = None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def physical_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


ReferenceMode = Literal["reuse", "per_job", "recompute"]


def check_supported(pipeline: Any, model: str) -> None:
    """Only the step-distilled FLUX.2 [klein] pipelines run here (no guidance pass)."""
    name = type(pipeline).__name__
    if name not in ("Flux2KleinKVPipeline", "Flux2KleinPipeline"):
        raise ConfigError(f"model {model!r} loads as {name}: kleinfarm runs FLUX.2 [klein] checkpoints")
    if not getattr(pipeline.config, "is_distilled", True):
        raise ConfigError(f"model {model!r} is a base (non-distilled) klein: kleinfarm runs the distilled ones")


def place(pipeline: Any, layout: MemoryProfile, device: torch.device) -> None:
    """Put the components where the profile says: fp8 weight storage, a streamed text encoder."""
    if layout.weights == "fp8":
        # Weights stored as fp8 and upcast layer by layer: half the memory of the bf16 checkpoint.
        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    if layout.text_encoder == "device":
        pipeline.to(device)
        return
    from accelerate import cpu_offload

    pipeline.transformer.to(device)
    pipeline.vae.to(device)
    # Streamed from host memory layer by layer; the prompt cache makes it run once per distinct prompt.
    cpu_offload(pipeline.text_encoder, execution_device=device)


@dataclass
class _References:
    """What one job carries of its references through the loop."""

    key: str | None = None
    source: str = "none"
    kv: Any = None
    latents: torch.Tensor | None = None
    ids: torch.Tensor | None = None


@dataclass
class RenderResult:
    """An image (or latents), where its time went, and what the caches did for it."""

    image: Image.Image | None
    timings: dict[str, float] = field(default_factory=dict)
    refset: str | None = None
    kv: str = "none"
    latents: torch.Tensor | None = None


class RenderEngine:
    """Renders generate and edit jobs on one pipeline, on one device, with caches across jobs."""

    def __init__(self, pipeline: Any, model: str, device: str, budgets: CacheBudgets, profile: str = "custom") -> None:
        self.pipeline = pipeline
        self.model = model
        self.device = torch.device(device)
        self.text_layers = text_encoder_layers(pipeline.text_encoder.config.num_hidden_layers)
        self.profile = profile
        self.kv_cache = ReferenceKVCache(self.device, budgets.kv_device, budgets.kv_host)
        self.prompt_cache = PromptCache(budgets.prompts)

    @classmethod
    def load(
        cls,
        model: str,
        device: str | None = None,
        budgets: CacheBudgets | None = None,
        profile: ProfileName = "auto",
    ) -> RenderEngine:
        """``from_pretrained`` of a Hub id or a local folder, laid out by the card's memory profile.

        The pipeline class comes from the checkpoint: a KV checkpoint reuses reference K/V across
        jobs; any other klein checkpoint (e.g. the Apache-2.0 4B) recomputes references every step.
        """
        from diffusers import DiffusionPipeline

        device = pick_device(device)
        card = torch.device(device)
        card_bytes = torch.cuda.get_device_properties(card).total_memory if card.type == "cuda" else None
        layout = profile_for_card(profile, card_bytes, physical_memory())
        dtype = torch.float32 if card.type == "cpu" else torch.bfloat16
        started = time.perf_counter()
        pipeline = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        check_supported(pipeline, model)
        place(pipeline, layout, card)
        pipeline.set_progress_bar_config(disable=True)
        log.info(
            "loaded %s on %s (%s, profile %s) in %.1f s",
            model,
            device,
            dtype,
            layout.name,
            time.perf_counter() - started,
        )
        return cls(pipeline, model, device, budgets or CacheBudgets.from_profile(layout, card), layout.name)

    @property
    def kv_reuse(self) -> bool:
        """Whether this checkpoint was trained with the reference mask, so its reference K/V can be reused."""
        return type(self.pipeline).__name__ == "Flux2KleinKVPipeline"

    def render(
        self,
        job: GenerateJob | EditJob,
        references: list[tuple[str, Image.Image]],
        on_step: StepCallback | None = None,
    ) -> RenderResult:
        """Render one job; ``references`` are (content digest, image); ``on_step`` may raise to stop."""
        if job.seed is None:
            raise ValueError("a job reaches the engine with its seed drawn at submit time")
        result = self.render_latents(job.prompt, job.seed, job.width, job.height, job.steps, references, on_step)
        started = time.perf_counter()
        with torch.inference_mode():
            image = self.pipeline.vae.decode(result.latents, return_dict=False)[0]
            result.image = self.pipeline.image_processor.postprocess(image, output_type="pil")[0]
        result.timings["decode_s"] = _lap(started)
        return result

    @torch.inference_mode()
    def render_latents(
        self,
        prompt: str,
        seed: int,
        width: int,
        height: int,
        steps: int,
        references: list[tuple[str, Image.Image]],
        on_step: StepCallback | None = None,
        batch_size: int = 1,
        mode: ReferenceMode | None = None,
    ) -> RenderResult:
        """The denoising loop; returns VAE-ready latents (as the pipeline's ``output_type='latent'``).

        ``mode`` overrides how references are handled (the benchmark compares all three).
        """
        pipe, timings = self.pipeline, {}
        mode = mode or ("reuse" if self.kv_reuse else "recompute")
        started = time.perf_counter()
        # A CPU generator makes the noise, hence the image, the same on every device.
        generator = torch.Generator("cpu").manual_seed(seed)

        # 1. Prompt embeddings, from the cache when this prompt was seen.
        embeddings = self._prompt_embeddings(prompt).repeat(batch_size, 1, 1)
        text_ids = pipe._prepare_text_ids(embeddings).to(self.device)
        timings["prompt_s"] = _lap(started)

        # 2. Initial noise from the seed.
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

        # 4. References: held K/V, or reference latents to extract them from (or to carry every step).
        refs = self._references(references, batch_size, generator, mode)
        timings["setup_s"] = round(_lap(started) - timings["prompt_s"], 4)

        # 5. Denoise.
        for index, t in enumerate(timesteps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            text = {"encoder_hidden_states": embeddings, "txt_ids": text_ids, "guidance": None, "return_dict": False}
            noise = self._predict(latents, latent_ids, timestep, text, refs, mode)
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(index + 1, steps)
        timings["denoise_s"] = round(_lap(started) - timings["prompt_s"] - timings["setup_s"], 4)

        # 6. Unpack to VAE latents.
        latents = self._to_vae_latents(latents, latent_ids)
        timings["total_s"] = _lap(started)
        return RenderResult(None, timings, refs.key, refs.source, latents)

    def _references(
        self, references: list[tuple[str, Image.Image]], batch_size: int, generator: torch.Generator, mode: str
    ) -> _References:
        if not references:
            return _References()
        key = reference_set_key(self.model, [digest for digest, _ in references])
        refs = _References(key=key, source="miss" if mode == "reuse" else mode)
        if mode == "reuse":
            entry, refs.source = self.kv_cache.get(key)
            refs.kv = to_diffusers(entry, batch_size) if entry is not None else None
        if refs.kv is None:
            refs.latents, refs.ids = self._reference_latents([image for _, image in references], batch_size, generator)
        return refs

    def _predict(
        self,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        timestep: torch.Tensor,
        text: dict[str, Any],
        refs: _References,
        mode: str,
    ) -> torch.Tensor:
        """One transformer call: references carried (recompute), extracted (first step), cached, or none."""
        transformer = self.pipeline.transformer
        hidden = latents.to(transformer.dtype)
        if refs.latents is not None and refs.ids is not None and mode == "recompute":
            noise = transformer(
                hidden_states=torch.cat([hidden, refs.latents.to(transformer.dtype)], dim=1),
                img_ids=torch.cat([latent_ids, refs.ids], dim=1),
                timestep=timestep,
                **text,
            )[0]
            return noise[:, : latents.shape[1]]  # type: ignore[no-any-return]
        if refs.latents is not None and refs.ids is not None and refs.kv is None:
            noise, refs.kv = transformer(
                hidden_states=torch.cat([refs.latents.to(transformer.dtype), hidden], dim=1),
                img_ids=torch.cat([refs.ids, latent_ids], dim=1),
                timestep=timestep,
                kv_cache_mode="extract",
                num_ref_tokens=refs.latents.shape[1],
                **text,
            )
            if mode == "reuse" and refs.key is not None:
                self.kv_cache.put(refs.key, from_diffusers(refs.kv))
            return noise  # type: ignore[no-any-return]
        if refs.kv is not None:
            cached = {"kv_cache": refs.kv, "kv_cache_mode": "cached"}
            return transformer(hidden_states=hidden, img_ids=latent_ids, timestep=timestep, **cached, **text)[0]  # type: ignore[no-any-return]
        return transformer(hidden_states=hidden, img_ids=latent_ids, timestep=timestep, **text)[0]  # type: ignore[no-any-return]

    def _prompt_embeddings(self, prompt: str) -> torch.Tensor:
        key = (self.model, prompt, str(MAX_SEQUENCE_LENGTH), ",".join(map(str, self.text_layers)))
        cached = self.prompt_cache.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        embeddings: torch.Tensor
        embeddings, _ = self.pipeline.encode_prompt(
            prompt=prompt,
            device=self.device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            text_encoder_out_layers=self.text_layers,
        )
        self.prompt_cache.put(key, embeddings)
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

    def report(self) -> dict[str, Any]:
        """What the engine holds, for the worker registry and metrics."""
        return {
            "profile": self.profile,
            "memory": self.memory(),
            "kv": self.kv_cache.report(),
            "prompts": {
                "hits": self.prompt_cache.hits,
                "misses": self.prompt_cache.misses,
                "bytes": self.prompt_cache.used,
                "budget": self.prompt_cache.budget,
            },
        }


def _lap(started: float) -> float:
    return round(time.perf_counter() - started, 4)
