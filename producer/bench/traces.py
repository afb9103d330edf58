"""Routing traces: synthetic (Zipf-distributed, bursty campaigns, or a mixed day) or read from a file.

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
    exponent: float, jobs: int, workers: float, seed: int, costs: CostModel, refsets: int | None = None
) -> list[dict[str, Any]]:
    """Poisson arrivals, reference sets drawn by a Zipf law over a catalogue of ``refsets`` sets.

    ``workers`` is the farm's capacity in cost-model seconds per second: its workers, or on a
    mixed fleet the sum of their speeds.
    """
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


def bursty_trace(jobs: int, workers: float, seed: int, costs: CostModel) -> list[dict[str, Any]]:
    """Campaigns submitted whole: each a few hot reference sets, product singletons, generates.

    ``workers``: the farm's capacity, as for ``zipf_trace``.
    """
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


LARGE_SIDE = 2048


def with_large_outputs(rows: list[dict[str, Any]], share: float, seed: int, costs: CostModel) -> list[dict[str, Any]]:
    """The same trace with ``share`` of its jobs rendering 2048x2048 (print-size heroes), its
    arrivals stretched by the work added, so it loads the farm as much as before.

    Those with four 1024 px references need more memory than a 4090 or a 5090 has beside its
    weights (``producer/bench/fleets.py``): on a mixed fleet only the bigger cards run them. The
    jobs are drawn with their own generator, so the others are the trace's own.
    """
    rng = random.Random(f"large-{seed}")
    before = sum(_cost(row, costs) for row in rows)
    large = [{**row, "width": LARGE_SIDE, "height": LARGE_SIDE} if rng.random() < share else row for row in rows]
    stretch = sum(_cost(row, costs) for row in large) / before if before else 1.0
    return [{**row, "arrival_s": round(row["arrival_s"] * stretch, 4)} for row in large]


# The mixed day (``mixed_trace``): two hours of a shared farm, what ``examples/traces/mixed-2h.jsonl`` is.
MIXED_HOURS_S = 7200.0
MIXED_SHARED_SETS = 36  # brand kits, style guides: the sets campaigns and users share
MIXED_CAMPAIGNS = 14
MIXED_BULK_JOBS = 5000
MIXED_BULK_AT_S = 4500.0  # the nightly bulk edit, submitted whole
MIXED_IDLE_GAPS = ((1500.0, 2200.0), (3400.0, 3900.0), (6500.0, 7000.0))  # nobody submits anything
MIXED_SESSION_RATE = 0.12  # people starting to edit an image, per second, while anyone is working
MIXED_THINK_S = (10.0, 60.0)  # between one try and the next
MIXED_GENERATE_RATE = 0.2


def mixed_trace(seed: int) -> list[dict[str, Any]]:
    """Two hours of a shared farm, with idle gaps: whole campaigns arriving in bursts over a few
    dozen shared reference sets, a nightly bulk edit of single-reference products, people editing
    one image at a time, and generates. The same trace whatever the farm's size (it is a day's
    demand, not a load test): about 16,700 jobs, from ``seed``.
    """
    rng = random.Random(seed)
    shared = [f"brand{index}" for index in range(MIXED_SHARED_SETS)]
    rows = _campaigns(rng, shared) + _bulk_edit(rng) + _interactive(rng, shared) + _generates(rng)
    rows.sort(key=lambda row: row["arrival_s"])
    return rows


def _busy_times(rng: random.Random, rate: float) -> list[float]:
    """Poisson arrival times over the two hours, none inside an idle gap."""
    times, clock = [], 0.0
    while (clock := clock + rng.expovariate(rate)) < MIXED_HOURS_S:
        if not _idle(clock):
            times.append(round(clock, 3))
    return times


def _idle(clock: float) -> bool:
    return any(start <= clock < end for start, end in MIXED_IDLE_GAPS)


def _campaigns(rng: random.Random, shared: list[str]) -> list[dict[str, Any]]:
    """Campaigns submitted whole: each draws on a few shared sets (the first ones most), plus
    products of its own and some generates."""
    rows: list[dict[str, Any]] = []
    starts = sorted(rng.choice(_busy_times(rng, 0.01)) for _ in range(MIXED_CAMPAIGNS))
    for campaign, start in enumerate(starts):
        kits = rng.sample(shared, rng.randint(2, 6))
        weights = [1 / (rank + 1) for rank in range(len(kits))]
        for index in range(rng.randint(200, 900)):
            draw = rng.random()
            refset = None if draw < 0.15 else f"c{campaign}-p{index}" if draw < 0.3 else rng.choices(kits, weights)[0]
            rows.append(_job(rng, refset, start))
    return rows


def _bulk_edit(rng: random.Random) -> list[dict[str, Any]]:
    """The nightly catalogue refresh: every product edited once, from its own single photo."""
    return [
        {
            "arrival_s": MIXED_BULK_AT_S,
            "refset": f"p{index}",
            "num_refs": 1,
            "ref_px": rng.choice(REF_SIDES),
            "width": 1024,
            "height": 1024,
        }
        for index in range(MIXED_BULK_JOBS)
    ]


def _interactive(rng: random.Random, shared: list[str]) -> list[dict[str, Any]]:
    """People editing one image at a time: a few tries on their own upload or a shared kit, each
    try after looking at the last one."""
    rows: list[dict[str, Any]] = []
    for session, start in enumerate(_busy_times(rng, MIXED_SESSION_RATE)):
        refset = rng.choice(shared) if rng.random() < 0.3 else f"u{session}"
        clock = start
        for _ in range(rng.randint(1, 6)):
            if clock < MIXED_HOURS_S and not _idle(clock):
                rows.append(_job(rng, refset, round(clock, 3)))
            clock += rng.uniform(*MIXED_THINK_S)
    return rows


def _generates(rng: random.Random) -> list[dict[str, Any]]:
    return [_job(rng, None, clock) for clock in _busy_times(rng, MIXED_GENERATE_RATE)]


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
    # Compact separators: the shipped traces are tens of thousands of lines.
    path.write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))
