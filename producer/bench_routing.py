"""``kleinfarm bench routing``: every policy on one trace, one JSON line per policy."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kleinfarm.producer.simulator import (
    LateBindingSim,
    Outcome,
    TraceJob,
    bounded_consistent_hashing,
    least_loaded,
    round_robin,
    sglang_cache_aware,
    simulate_push,
    trace_jobs,
)
from kleinfarm.shared.costmodel import CostModel

GIB = 1024**3
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


def lower_bound(jobs: list[TraceJob], workers: int) -> float:
    """No policy beats this: all work once plus one build per set, spread perfectly, after arrival."""
    built: set[str] = set()
    total = 0.0
    latest = 0.0
    for job in jobs:
        first = job.refset is not None and job.refset not in built
        if job.refset is not None:
            built.add(job.refset)
        cost = job.work_s + (job.build_s if first else 0.0)
        total += cost
        latest = max(latest, job.arrival_s + cost)
    return max(total / workers, latest)


def summarize(
    policy: str, jobs: list[TraceJob], outcome: Outcome, bound: float, oracle_hit: float, seconds: float
) -> dict[str, Any]:
    edits = [job for job in jobs if job.refset is not None]
    hit_rate = sum(outcome.hit[job.index] for job in edits) / max(len(edits), 1)
    waits = sorted(outcome.start[job.index] - job.arrival_s for job in jobs)
    mean_busy = sum(outcome.busy) / len(outcome.busy)
    return {
        "policy": policy,
        "kv_hit_rate": round(hit_rate, 4),
        "hit_rate_vs_oracle": round(hit_rate / oracle_hit, 4) if oracle_hit else None,
        "makespan_s": round(max(outcome.finish), 1),
        "makespan_vs_lower_bound": round(max(outcome.finish) / bound, 4),
        "max_over_mean_busy": round(max(outcome.busy) / mean_busy, 4) if mean_busy else None,
        "wait_p50_s": round(waits[len(waits) // 2], 2),
        "wait_p95_s": round(waits[int(len(waits) * 0.95)], 2),
        "sim_s": round(seconds, 2),
    }


def oracle_row(jobs: list[TraceJob], bound: float) -> dict[str, Any]:
    edits = [job for job in jobs if job.refset is not None]
    hit = 1 - len({job.refset for job in edits}) / max(len(edits), 1)
    return {
        "policy": "oracle",
        "kv_hit_rate": round(hit, 4),
        "hit_rate_vs_oracle": 1.0,
        "makespan_s": round(bound, 1),
        "makespan_vs_lower_bound": 1.0,
        "max_over_mean_busy": 1.0,
        "wait_p50_s": None,
        "wait_p95_s": None,
        "sim_s": 0.0,
    }


def run_policies(rows: list[dict[str, Any]], workers: int, kv_gib: float, costs: CostModel) -> Iterator[dict[str, Any]]:
    jobs = trace_jobs(rows, costs)
    budget = int(kv_gib * GIB)
    bound = lower_bound(jobs, workers)
    oracle = oracle_row(jobs, bound)
    policies: dict[str, Callable[[], Outcome]] = {
        "round_robin": lambda: simulate_push(jobs, workers, budget, round_robin()),
        "least_loaded": lambda: simulate_push(jobs, workers, budget, least_loaded()),
        "sglang_cache_aware": lambda: simulate_push(jobs, workers, budget, sglang_cache_aware()),
        "bounded_consistent_hash": lambda: simulate_push(jobs, workers, budget, bounded_consistent_hashing(workers)),
        "kleinfarm": lambda: LateBindingSim(jobs, workers, budget).run(),
    }
    for name, simulate in policies.items():
        started = time.perf_counter()
        outcome = simulate()
        yield summarize(name, jobs, outcome, bound, oracle["kv_hit_rate"], time.perf_counter() - started)
    yield oracle


def bench_routing(
    workers: int,
    trace: Path | None,
    zipf: float | None,
    bursty: bool,
    jobs: int,
    kv_gib: float,
    seed: int,
    write_trace: Path | None = None,
    refsets: int | None = None,
) -> list[dict[str, Any]]:
    costs = CostModel()
    if trace is not None:
        rows = read_trace(trace)
    elif bursty:
        rows = bursty_trace(jobs, workers, seed, costs)
    else:
        rows = zipf_trace(zipf or 1.1, jobs, workers, seed, costs, refsets)
    if write_trace is not None:
        write_trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = []
    for row in run_policies(rows, workers, kv_gib, costs):
        print(json.dumps({"workers": workers, "jobs": len(rows), **row}), flush=True)
        results.append(row)
    return results
