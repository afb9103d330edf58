"""A tiny random-weight FLUX.2 [klein] KV pipeline built from the real classes.

Its images are noise. It exists so that the farm, its tests and the demo load a model through the
same ``from_pretrained`` path as ``black-forest-labs/FLUX.2-klein-9b-kv``, offline, on a CPU.
"""

from __future__ import annotations

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
TEXT_HIDDEN = 16
TEXT_LAYERS = 3


def _tokenizer() -> Any:
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


def build_tiny_pipeline(seed: int = 0, kv: bool = True) -> Any:
    """A tiny ``Flux2KleinKVPipeline`` (or, with ``kv=False``, ``Flux2KleinPipeline``: a klein
    checkpoint without reference K/V reuse, like the 4B) of random components, VAE scale factor 8."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    transformer = Flux2Transformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN * 3,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=TEXT_HIDDEN,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
        )
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
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
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed, kv).save_pretrained(str(folder))
    return folder
