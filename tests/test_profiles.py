"""Memory profiles: the arithmetic of the README, card by card."""

from __future__ import annotations

import pytest

from kleinfarm.shared.errors import ConfigError
from kleinfarm.shared.klein import GIB, kv_bytes
from kleinfarm.worker.engine.profiles import profile_for_card

HOST = 128 * GIB


def test_a_reference_token_costs_half_a_mebibyte_and_a_1024_reference_two_gibibytes() -> None:
    assert kv_bytes(1) == 512 * 1024
    assert kv_bytes((1024 // 16) ** 2) == 2 * GIB


def test_auto_picks_by_the_cards_memory() -> None:
    assert profile_for_card("auto", 24 * GIB, HOST).name == "rtx4090"
    assert profile_for_card("auto", 32 * GIB, HOST).name == "rtx5090"
    assert profile_for_card("auto", 80 * GIB, HOST).name == "large"
    assert profile_for_card("auto", None, HOST).name == "cpu"


def test_a_24_gib_card_stores_fp8_weights_and_streams_the_text_encoder() -> None:
    profile = profile_for_card("rtx4090", 24 * GIB, HOST)
    assert (profile.weights, profile.text_encoder) == ("fp8", "offload")
    assert profile.kv_device_bytes == 11 * GIB  # 24 - 9 weights - 4 headroom
    assert profile.kv_device_references_1024 == 5.5


def test_a_32_gib_card_keeps_bf16_weights_and_holds_four_1024_references() -> None:
    profile = profile_for_card("rtx5090", 32 * GIB, HOST)
    assert (profile.weights, profile.text_encoder) == ("bf16", "offload")
    assert profile.kv_device_references_1024 >= 4


def test_an_80_gib_card_keeps_everything_on_the_card() -> None:
    profile = profile_for_card("large", 80 * GIB, HOST)
    assert profile.text_encoder == "device" and profile.kv_device_bytes == 42 * GIB


def test_a_card_too_small_is_refused_with_the_limit() -> None:
    with pytest.raises(ConfigError, match="16 GiB card is too small"):
        profile_for_card("auto", 16 * GIB, HOST)
