"""Memory profiles per card: weight storage, where the text encoder lives, and the cache budgets.

The arithmetic, FLUX.2 [klein] 9B-KV in bf16 (the figures are ``kleinfarm.shared.klein``, derived in
``docs/engine.md``):
- reference K/V: 32 blocks x 2 (K, V) x 4096 hidden x 2 bytes = 0.5 MiB per reference token; a
  1024x1024 reference is (1024/16)^2 = 4096 tokens = 2 GiB; four of them 8 GiB;
- transformer weights: 9.1 B parameters = 18 GB in bf16, 9 GB stored as fp8 (upcast per layer);
- Qwen3-8B text encoder: 16 GB in bf16. With the prompt cache it runs once per distinct prompt,
  so on cards where it does not fit beside the transformer it is streamed from host memory;
- headroom for activations and the VAE: 4 GiB at 1024x1024 with four references.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.klein import (
    GIB,
    TEXT_ENCODER_BF16_BYTES,
    TRANSFORMER_BF16_BYTES,
    TRANSFORMER_FP8_BYTES,
    kv_bytes,
    reference_tokens,
)

# Activations and the VAE at 1024x1024 with four references: what a card keeps free beside weights and K/V.
HEADROOM = 4 * GIB
# The K/V of one 1024x1024 reference (2 GiB): the unit profiles are compared in.
KV_BYTES_PER_REFERENCE_1024 = kv_bytes(reference_tokens(1, 1024))

ProfileName = Literal["auto", "large", "rtx5090", "rtx4090", "cpu"]


@dataclass(frozen=True)
class MemoryProfile:
    """How one worker lays the model and its caches out on its card."""

    name: str
    weights: Literal["bf16", "fp8", "fp32"]
    text_encoder: Literal["device", "offload"]
    kv_device_bytes: int
    kv_host_bytes: int
    prompt_bytes: int

    @property
    def kv_device_references_1024(self) -> float:
        """How many 1024x1024 references (2 GiB each in bf16) the device tier holds."""
        return self.kv_device_bytes / KV_BYTES_PER_REFERENCE_1024


def profile_for_card(name: ProfileName, card_bytes: int | None, host_bytes: int) -> MemoryProfile:
    """The profile ``name`` (``auto`` picks from ``card_bytes``, the card's total memory)."""
    if name == "auto":
        name = _auto_name(card_bytes)
    host_tier = host_bytes // 4
    if name == "cpu":
        return MemoryProfile("cpu", "fp32", "device", min(host_bytes // 8, 4 * GIB), host_bytes // 8, GIB // 4)
    if card_bytes is None:
        raise ConfigError(f"profile {name!r} needs a CUDA card")
    if name == "large":
        left = card_bytes - TRANSFORMER_BF16_BYTES - TEXT_ENCODER_BF16_BYTES - HEADROOM
        return MemoryProfile("large", "bf16", "device", max(left, 0), host_tier, GIB)
    if name == "rtx5090":
        kv_device = _left(card_bytes, TRANSFORMER_BF16_BYTES)
        return MemoryProfile("rtx5090", "bf16", "offload", kv_device, host_tier, GIB // 2)
    kv_device = _left(card_bytes, TRANSFORMER_FP8_BYTES)
    return MemoryProfile("rtx4090", "fp8", "offload", kv_device, host_tier, GIB // 2)


def _left(card_bytes: int, weights: int) -> int:
    left = card_bytes - weights - HEADROOM
    if left <= 0:
        raise ConfigError(f"a {card_bytes / GIB:.0f} GiB card cannot hold {weights / GIB:.0f} GiB of weights")
    return left


def _auto_name(card_bytes: int | None) -> ProfileName:
    if card_bytes is None:
        return "cpu"
    if card_bytes >= TRANSFORMER_BF16_BYTES + TEXT_ENCODER_BF16_BYTES + HEADROOM + 8 * GIB:
        return "large"
    if card_bytes >= 30 * GIB:
        return "rtx5090"
    if card_bytes >= 20 * GIB:
        return "rtx4090"
    raise ConfigError(f"a {card_bytes / GIB:.0f} GiB card is too small for FLUX.2 [klein] 9B-KV (24 GiB or more)")
