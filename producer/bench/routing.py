"""``kleinfarm bench routing``: every policy on one trace, one JSON line per policy."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kleinfarm.producer.bench import traces
from kleinfarm.producer.bench.simulator import LateBindingSim, Outcome, TraceJob, simulate_push, trace_jobs
from kleinfarm.shared.costmodel import CostModel
from kleinfarm.shared.routing import POLICIES, AffinityPolicy, Policy

GIB = 1024**3


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
    """One policy's figures over the jobs that ran; ``unrun`` counts the others (it must be 0)."""
    ran = [job for job in jobs if outcome.ran(job.index)]
    edits = [job for job in ran if job.refset is not None]
    hit_rate = sum(outcome.hit[job.index] for job in edits) / max(len(edits), 1)
    waits = sorted(outcome.start[job.index] - job.arrival_s for job in ran) or [0.0]
    makespan = max((outcome.finish[job.index] for job in ran), default=0.0)
    mean_busy = sum(outcome.busy) / len(outcome.busy)
    return {
        "policy": policy,
        "kv_hit_rate": round(hit_rate, 4),
        "hit_rate_vs_oracle": round(hit_rate / oracle_hit, 4) if oracle_hit else None,
        "makespan_s": round(makespan, 1),
        "makespan_vs_lower_bound": round(makespan / bound, 4),
        "max_over_mean_busy": round(max(outcome.busy) / mean_busy, 4) if mean_busy else None,
        "wait_p50_s": round(waits[len(waits) // 2], 2),
        "wait_p95_s": round(waits[int(len(waits) * 0.95)], 2),
        "unrun": len(jobs) - len(ran),
        "gpu_s": round(sum(outcome.busy), 1),  # work plus builds, every worker
        "sim_s": round(seconds, 2),
    }


def oracle_gpu_s(jobs: list[TraceJob]) -> float:
    """All the work plus one build per reference set: what an infinite cache spends."""
    builds = {job.refset: job.build_s for job in jobs if job.refset is not None}
    return sum(job.work_s for job in jobs) + sum(builds.values())


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
        "unrun": 0,
        "gpu_s": round(oracle_gpu_s(jobs), 1),
        "sim_s": 0.0,
    }


def run_policies(rows: list[dict[str, Any]], workers: int, kv_gib: float, costs: CostModel) -> Iterator[dict[str, Any]]:
    jobs = trace_jobs(rows, costs)
    budget = int(kv_gib * GIB)
    bound = lower_bound(jobs, workers)
    oracle = oracle_row(jobs, bound)
    for name, policy in POLICIES.items():
        started = time.perf_counter()
        outcome = _simulate(policy, jobs, workers, budget)
        yield summarize(name, jobs, outcome, bound, oracle["kv_hit_rate"], time.perf_counter() - started)
    yield oracle


def _simulate(policy: type[Policy], jobs: list[TraceJob], workers: int, budget: int) -> Outcome:
    """Ours binds late, in the farm's dispatch rounds; the baselines push each job as it arrives."""
    if policy is AffinityPolicy:
        return LateBindingSim(jobs, workers, budget).run()
    return simulate_push(jobs, workers, budget, policy())


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
    mixed: bool = False,
) -> list[dict[str, Any]]:
    """Every policy on one trace (read, or generated from ``seed``): print and return a row each, then the oracle's."""
    costs = CostModel()
    if trace is not None:
        rows = traces.read_trace(trace)
    elif mixed:
        rows = traces.mixed_trace(seed)
    elif bursty:
        rows = traces.bursty_trace(jobs, workers, seed, costs)
    else:
        rows = traces.zipf_trace(zipf or 1.1, jobs, workers, seed, costs, refsets)
    if write_trace is not None:
        traces.write_trace(write_trace, rows)
    results = []
    for row in run_policies(rows, workers, kv_gib, costs):
        print(json.dumps({"workers": workers, "jobs": len(rows), **row}), flush=True)
        if row["unrun"]:
            print(f"{row['policy']}: {row['unrun']} of {len(rows)} jobs never ran", file=sys.stderr, flush=True)
        results.append(row)
    return results
