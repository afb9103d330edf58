"""Random-weight FLUX.2 [klein] pipelines built from the real classes, at any size.

Their images are noise. The tiny one exists so that the farm, its tests and the demo load a model
through the same ``from_pretrained`` path as ``black-forest-labs/FLUX.2-klein-9b-kv``, offline, on
a CPU; the larger ones let the benchmark time the real shapes (the cost depends on the shapes, not
the values). One builder for all, from a ``PipelineShape`` that names every dimension.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Qwen3's chat template reduced to what the pipeline's prompt encoding uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Room for the pipeline's 512 prompt tokens plus the chat template around them.
TEXT_POSITIONS = 1024
# The pipeline stacks the hidden states of three text-encoder layers into the prompt embedding.
STACKED_TEXT_LAYERS = 3


@dataclass(frozen=True)
class PipelineShape:
    """Every dimension of a random pipeline: transformer, Qwen3 text encoder, VAE."""

    # Transformer (Flux2Transformer2DModel).
    in_channels: int
    double_layers: int
    single_layers: int
    heads: int
    head_dim: int
    rope_axes: tuple[int, ...]
    rope_theta: int
    mlp_ratio: float
    # Text encoder (Qwen3ForCausalLM).
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    # VAE (AutoencoderKLFlux2); its scale factor is 2 ** (len(vae_channels) - 1).
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    latent_channels: int
    vae_groups: int
    sample_size: int

    def __post_init__(self) -> None:
        # The pipeline patchifies VAE latents 2x2 into transformer channels, and RoPE spans each head.
        if self.in_channels != 4 * self.latent_channels:
            raise ValueError(f"in_channels {self.in_channels} must be 4 x latent_channels {self.latent_channels}")
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope axes {self.rope_axes} must add up to head_dim {self.head_dim}")


# A model small enough to build, save and run in seconds on a CPU; 256x256 capable, VAE scale factor 8.
TINY_SHAPE = PipelineShape(
    in_channels=16,
    double_layers=1,
    single_layers=1,
    heads=2,
    head_dim=16,
    rope_axes=(4, 4, 4, 4),
    rope_theta=2000,
    mlp_ratio=3.0,
    text_hidden=16,
    text_intermediate=16,
    text_layers=3,
    text_heads=2,
    text_kv_heads=1,
    text_head_dim=8,
    vae_channels=(8, 8, 8, 8),
    vae_layers_per_block=1,
    latent_channels=4,
    vae_groups=4,
    sample_size=64,
)
# The real FLUX.2 [klein] 9B transformer (8 double + 24 single blocks, 32 x 128 heads), Qwen3-8B's
# layers (a tiny vocabulary) and the FLUX.2 VAE (AutoencoderKLFlux2's defaults).
FULL_SHAPE = PipelineShape(
    in_channels=128,
    double_layers=8,
    single_layers=24,
    heads=32,
    head_dim=128,
    rope_axes=(32, 32, 32, 32),
    rope_theta=2000,
    mlp_ratio=3.0,
    text_hidden=4096,
    text_intermediate=12288,
    text_layers=36,
    text_heads=32,
    text_kv_heads=8,
    text_head_dim=128,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    latent_channels=32,
    vae_groups=32,
    sample_size=1024,
)
# Every width 1/8 of the real model (transformer 512, text encoder 512, VAE channels), true depth:
# the parts keep roughly their real share of the work, at a cost a CPU can run.
CPU_BENCH_SHAPE = PipelineShape(
    in_channels=128,
    double_layers=8,
    single_layers=24,
    heads=8,
    head_dim=64,
    rope_axes=(16, 16, 16, 16),
    rope_theta=2000,
    mlp_ratio=3.0,
    text_hidden=512,
    text_intermediate=1536,
    text_layers=6,
    text_heads=4,
    text_kv_heads=1,
    text_head_dim=128,
    vae_channels=(16, 32, 64, 64),
    vae_layers_per_block=2,
    latent_channels=32,
    vae_groups=16,
    sample_size=1024,
)


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template, trained on one line."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["a product photo on a white background, studio light"], trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
    )


def build_pipeline(
    shape: PipelineShape, device: str = "cpu", dtype: torch.dtype = torch.float32, kv: bool = True, seed: int = 0
) -> Any:
    """A ``Flux2KleinKVPipeline`` (or, with ``kv=False``, ``Flux2KleinPipeline``: a klein checkpoint
    without reference K/V reuse, like the 4B) of ``shape``, with weights drawn from ``seed``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    with _default_dtype(dtype), torch.device(device):
        transformer = _transformer(shape)
        text_encoder = _text_encoder(shape, len(tokenizer))
        vae = _vae(shape)
    pipeline_class = Flux2KleinKVPipeline if kv else Flux2KleinPipeline
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=True,
    )


def make_tiny_model(folder: Path, seed: int = 0, kv: bool = True) -> Path:
    """Write the tiny pipeline to ``folder`` with ``save_pretrained``; return the folder."""
    return make_random_model(folder, TINY_SHAPE, seed=seed, kv=kv)


def make_random_model(folder: Path, shape: PipelineShape, device: str = "cpu", seed: int = 0, kv: bool = True) -> Path:
    """Write a random pipeline of ``shape`` to ``folder``: fp32 on a CPU, bf16 on a card (the full
    shape is ~34 GB in bf16, built on the card and written from there). Loaded back with
    ``from_pretrained`` it stands in for the real checkpoint (same classes, same shapes)."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    build_pipeline(shape, device=device, dtype=dtype, kv=kv, seed=seed).save_pretrained(str(folder))
    return folder


SHAPES = {"tiny": TINY_SHAPE, "cpu": CPU_BENCH_SHAPE, "full": FULL_SHAPE}


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build the modules directly in ``dtype`` (the full shape would not fit twice in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _transformer(shape: PipelineShape) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        in_channels=shape.in_channels,
        num_layers=shape.double_layers,
        num_single_layers=shape.single_layers,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=STACKED_TEXT_LAYERS * shape.text_hidden,
        axes_dims_rope=shape.rope_axes,
        rope_theta=shape.rope_theta,
        mlp_ratio=shape.mlp_ratio,
        guidance_embeds=False,
    )


def _text_encoder(shape: PipelineShape, vocab_size: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
        head_dim=shape.text_head_dim,
        max_position_embeddings=TEXT_POSITIONS,
    )
    return Qwen3ForCausalLM(config)


def _vae(shape: PipelineShape) -> Any:
    from diffusers import AutoencoderKLFlux2

    blocks = len(shape.vae_channels)
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=shape.vae_channels,
        layers_per_block=shape.vae_layers_per_block,
        latent_channels=shape.latent_channels,
        norm_num_groups=shape.vae_groups,
        sample_size=shape.sample_size,
    )
