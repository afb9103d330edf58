"""Simulated fleets: what each worker of ``kleinfarm bench routing`` is (``--fleet``).

A farm grows by buying whatever cards are on offer, so a real fleet mixes cards: each runs the
cost model's seconds at its own speed, keeps its own K/V budget, and fits its own jobs
(``shared/capacity.Capability``). The figures, per card:

- the memory a process gets on the card (*cap*) and the resident weights are measured figures
  for the RTX 4090 and 5090 (issue 14): 23.4 GiB with 8.65 GiB of fp8 weights, and 31.3 GiB
  with 17.07 GiB of bf16 weights (their ``rtx4090`` and ``rtx5090`` profiles). The
  80 GB card is not measured: its cap is 80 GiB less what the 24 and 32 GB cards lose to the
  driver and context (about 0.55 GiB), and its ``large`` profile keeps the bf16 text encoder
  (16 GiB, ``shared/klein.py``) on the card beside the bf16 transformer;
- what a job may use (``Capability.job_bytes``) is the cap less the resident weights. So the
  4090 holds slightly more per job than the 5090 (14.75 against 14.23 GiB: fp8 weights), and
  neither fits a 2048x2048 output with four 1024 px references (15.20 GiB, ``job_need``): only
  the 80 GB card does;
- the K/V budget is the profile's two tiers (``worker/engine/profiles.py``): on the card, the cap
  less the weights and 4 GiB of headroom for activations and the VAE; in host memory, a quarter
  of the host's RAM, here 128 GiB for every card (host memory is not what differs between them).
  The device tiers come out about equal (10.75 and 10.23 GiB: the 5090's extra 8 GB go to bf16
  weights), so a 4090 and a 5090 keep about the same sets;
- speed is cost-model seconds rendered per second. The issue's figures: a 4090 is 1.0 and a 5090
  1.7; the 80 GB card (A100/H100 class) is taken as 2.0, a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from kleinfarm.shared.capacity import Capability
from kleinfarm.shared.klein import GIB, TEXT_ENCODER_BF16_BYTES

HEADROOM = 4 * GIB  # kept free beside weights and K/V on the card (``worker/engine/profiles.py``)
HOST_TIER = 128 * GIB // 4  # a quarter of the host's RAM (the profiles' rule), 128 GiB hosts


@dataclass(frozen=True)
class Card:
    """One worker of a simulated fleet: its speed, its K/V budget (bytes) and what it can run."""

    name: str
    speed: float = 1.0
    kv_budget: int = 48 * GIB
    capability: Capability | None = None  # None: runs any job


def card(name: str, cap_gib: float, weights_gib: float, speed: float) -> Card:
    """A card from its cap and resident weights (GiB): its job room, K/V tiers and speed."""
    job_bytes = int((cap_gib - weights_gib) * GIB)
    return Card(name, speed, job_bytes - HEADROOM + HOST_TIER, Capability(job_bytes=job_bytes, speed=speed))


RTX_4090 = card("rtx4090", 23.4, 8.65, 1.0)
RTX_5090 = card("rtx5090", 31.3, 17.07, 1.7)
CARD_80GB = card("80gb", 80 - 0.55, 17.07 + TEXT_ENCODER_BF16_BYTES / GIB, 2.0)

FLEETS = ("uniform", "mixed")


def uniform_fleet(workers: int, kv_budget: int) -> list[Card]:
    """Every worker alike, of the cost model's speed, running any job: the farm before mixed fleets."""
    return [Card("uniform", 1.0, kv_budget, None)] * workers


def mixed_fleet(workers: int) -> list[Card]:
    """Half 4090s and half 5090s, and now and then a bigger card: every eighth worker an 80 GB one
    (in place of a 5090), so the jobs too big for both have somewhere to run."""
    return [CARD_80GB if index % 8 == 7 else RTX_4090 if index % 2 == 0 else RTX_5090 for index in range(workers)]


def fleet_by_name(name: str, workers: int, kv_budget: int) -> list[Card]:
    if name == "uniform":
        return uniform_fleet(workers, kv_budget)
    if name == "mixed":
        return mixed_fleet(workers)
    raise ValueError(f"unknown fleet {name!r}; known: {', '.join(FLEETS)}")


def describe(fleet: list[Card]) -> str:
    """``4 x rtx4090, 3 x rtx5090, 1 x 80gb``: the fleet's cards, in order of first appearance."""
    counts: dict[str, int] = {}
    for member in fleet:
        counts[member.name] = counts.get(member.name, 0) + 1
    return ", ".join(f"{count} x {name}" for name, count in counts.items())
