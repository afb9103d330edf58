"""Routing traces: synthetic (Zipf-distributed or bursty campaigns) or read from a file.

A trace line is ``{"arrival_s", "refset", "num_refs", "ref_px", "width", "height"}``; the
simulator (``simulator.trace_jobs``) turns lines into jobs with their costs.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from kleinfarm.shared.costmodel import CostModel

SIDES = (512, 768, 1024)
REF_SIDES = (512, 768, 1024)
NO_REFS_SHARE = 0.2
OVERLOAD = 1.1  # arrivals at 1.1x the farm's capacity, so a backlog builds and makespan matters


def zipf_trace(
    exponent: float, jobs: int, workers: int, seed: int, costs: CostModel, refsets: int | None = None
) -> list[dict[str, Any]]:
    """Poisson arrivals, reference sets drawn by a Zipf law over a catalogue of ``refsets`` sets."""
    rng = random.Random(seed)
    pool = refsets or max(jobs // 100, 50)
    weights = [1 / (rank**exponent) for rank in range(1, pool + 1)]
    rows = [
        _job(rng, rng.choices(range(pool), weights)[0] if rng.random() > NO_REFS_SHARE else None, 0.0)
        for _ in range(jobs)
    ]
    mean_s = sum(_cost(row, costs) for row in rows) / jobs
    rate = OVERLOAD * workers / mean_s
    clock = 0.0
    for row in rows:
        clock += rng.expovariate(rate)
        row["arrival_s"] = round(clock, 4)
    return rows


def bursty_trace(jobs: int, workers: int, seed: int, costs: CostModel) -> list[dict[str, Any]]:
    """Campaigns submitted whole: each a few hot reference sets, product singletons, generates."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    campaign = 0
    clock = 0.0
    while len(rows) < jobs:
        size = min(rng.randint(jobs // 20 + 1, jobs // 5 + 2), jobs - len(rows))
        hot = [f"c{campaign}-hot{index}" for index in range(rng.randint(size // 1000 + 2, size // 200 + 4))]
        hot_weights = [1 / (rank + 1) for rank in range(len(hot))]
        burst = []
        for index in range(size):
            draw = rng.random()
            if draw < NO_REFS_SHARE:
                refset = None
            elif draw < 0.45:
                refset = f"c{campaign}-single{index}"
            else:
                refset = rng.choices(hot, hot_weights)[0]
            burst.append(_job(rng, refset, clock))
        rows += burst
        # The next campaign comes while this one is still rendering.
        clock += 0.6 * sum(_cost(row, costs) for row in burst) / workers
        campaign += 1
    return rows


def _job(rng: random.Random, refset: int | str | None, arrival: float) -> dict[str, Any]:
    side = rng.choice(SIDES)
    if refset is None:
        return {"arrival_s": arrival, "refset": None, "num_refs": 0, "ref_px": 0, "width": side, "height": side}
    digest = int.from_bytes(hashlib.blake2b(str(refset).encode(), digest_size=2).digest(), "big")
    name = refset if isinstance(refset, str) else f"rs{refset}"
    return {
        "arrival_s": arrival,
        "refset": name,
        "num_refs": 1 + digest % 4,
        "ref_px": REF_SIDES[digest % 3],
        "width": side,
        "height": side,
    }


def _cost(row: dict[str, Any], costs: CostModel) -> float:
    cost: float = costs.cached_render_s(int(row["width"]), int(row["height"]))
    return cost


def read_trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_trace(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
