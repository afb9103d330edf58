"""``kleinfarm bench routing``: every policy on one trace, one JSON line per policy."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kleinfarm.producer.bench import traces
from kleinfarm.producer.bench.fleets import Card, describe, fleet_by_name
from kleinfarm.producer.bench.simulator import LateBindingSim, Outcome, TraceJob, simulate_push, trace_jobs
from kleinfarm.shared.capacity import JobShape
from kleinfarm.shared.costmodel import CostModel
from kleinfarm.shared.routing import POLICIES, AffinityPolicy, Policy

GIB = 1024**3
LARGE_SHARE_MIXED = 0.02  # of a generated trace's jobs render 2048x2048 on a mixed fleet


def lower_bound(jobs: list[TraceJob], workers: int, fleet: Sequence[Card] | None = None) -> float:
    """No policy beats this: all work once plus one build per set, spread perfectly, after arrival.

    On a fleet of unequal cards (``fleet``): the work over the sum of the speeds; each job no
    sooner than its arrival plus its time on the fastest card that can run it; and the jobs that
    only some cards can run, with one build of each of their sets (those cards need the set's K/V
    themselves), over those cards' speeds. A job no card can run is left out (it is ``unrun``).
    """
    if fleet is None or all(card.speed == 1.0 and card.capability is None for card in fleet):
        return _uniform_bound(jobs, workers)
    every = frozenset(range(len(fleet)))
    speeds = [card.speed for card in fleet]
    runners: Runners = {}
    fastest: dict[frozenset[int], float] = {}
    built: set[str] = set()
    total = latest = 0.0
    # The work, and the sets with their builds, of the jobs only ``cards`` can run, per set of cards.
    only_work: dict[frozenset[int], float] = {}
    only_sets: dict[frozenset[int], dict[str, float]] = {}
    for job in jobs:
        cards = every if job.shape is None else _runners(job.shape, fleet, runners)
        if not cards:
            continue
        first = job.refset is not None and job.refset not in built
        if job.refset is not None:
            built.add(job.refset)
        cost = job.work_s + (job.build_s if first else 0.0)
        total += cost
        if cards not in fastest:
            fastest[cards] = max(speeds[index] for index in cards)
        latest = max(latest, job.arrival_s + cost / fastest[cards])
        if cards != every:
            only_work[cards] = only_work.get(cards, 0.0) + job.work_s
            sets = only_sets.setdefault(cards, {})
            if job.refset is not None:
                sets[job.refset] = min(job.build_s, sets.get(job.refset, job.build_s))
    bound = max(total / sum(speeds), latest)
    for cards in only_work:
        # Every job whose cards are among these runs on these: theirs and the more restricted ones'.
        inside = [other for other in only_work if other <= cards]
        builds: dict[str, float] = {}
        for other in inside:
            for refset, build in only_sets[other].items():
                builds[refset] = min(build, builds.get(refset, build))
        work = sum(only_work[other] for other in inside) + sum(builds.values())
        bound = max(bound, work / sum(speeds[index] for index in cards))
    return bound


Runners = dict[int, tuple[JobShape, frozenset[int]]]  # by shape object: the workers whose card runs it


def _runners(shape: JobShape, fleet: Sequence[Card], memo: Runners) -> frozenset[int]:
    """The workers whose card can run ``shape``."""
    known = memo.get(id(shape))
    if known is None or known[0] is not shape:
        cards = frozenset(
            index for index, card in enumerate(fleet) if card.capability is None or card.capability.fits(shape)
        )
        known = memo[id(shape)] = (shape, cards)
    return known[1]


def _uniform_bound(jobs: list[TraceJob], workers: int) -> float:
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
        # Work plus builds, every worker: on a mixed fleet in cost-model seconds (``Outcome.work``).
        "gpu_s": round(sum(outcome.work or outcome.busy), 1),
        "sim_s": round(seconds, 2),
    }


def oracle_gpu_s(jobs: list[TraceJob]) -> float:
    """All the work plus one build per reference set: what an infinite cache spends (cost-model seconds)."""
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


def run_policies(
    rows: list[dict[str, Any]],
    workers: int,
    kv_gib: float,
    costs: CostModel,
    fleet: Sequence[Card] | None = None,
) -> Iterator[dict[str, Any]]:
    """Every policy on the trace ``rows``, then the oracle: a row each. ``fleet``: the workers'
    cards (``fleets.py``; ``workers`` of them), the same for every policy; by default all alike."""
    jobs = trace_jobs(rows, costs)
    budget = int(kv_gib * GIB)
    bound = lower_bound(jobs, workers, fleet)
    oracle = oracle_row(jobs, bound)
    for name, policy in POLICIES.items():
        started = time.perf_counter()
        outcome = _simulate(policy, jobs, workers, budget, fleet)
        yield summarize(name, jobs, outcome, bound, oracle["kv_hit_rate"], time.perf_counter() - started)
    yield oracle


def _simulate(
    policy: type[Policy], jobs: list[TraceJob], workers: int, budget: int, fleet: Sequence[Card] | None
) -> Outcome:
    """Ours binds late, in the farm's dispatch rounds; the baselines push each job as it arrives."""
    if policy is AffinityPolicy:
        return LateBindingSim(jobs, workers, budget, fleet=fleet).run()
    return simulate_push(jobs, workers, budget, policy(), fleet)


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
    fleet_name: str = "uniform",
    large_share: float | None = None,
) -> list[dict[str, Any]]:
    """Every policy on one trace (read, or generated from ``seed``): print and return a row each, then the oracle's.

    ``fleet_name``: ``uniform`` (every worker alike, ``kv_gib`` each) or ``mixed`` (``fleets.py``).
    A generated Zipf or bursty trace arrives at 1.1x the fleet's capacity (the sum of its speeds),
    and on a mixed fleet ``large_share`` of its jobs (default 0.02) render 2048x2048.
    """
    costs = CostModel()
    fleet = fleet_by_name(fleet_name, workers, int(kv_gib * GIB))
    uniform = fleet_name == "uniform"
    capacity: float = workers if uniform else sum(card.speed for card in fleet)
    share = large_share if large_share is not None else 0.0 if uniform else LARGE_SHARE_MIXED
    if trace is not None:
        rows = traces.read_trace(trace)
    elif mixed:
        rows = traces.mixed_trace(seed)
    elif bursty:
        rows = traces.bursty_trace(jobs, capacity, seed, costs)
    else:
        rows = traces.zipf_trace(zipf or 1.1, jobs, capacity, seed, costs, refsets)
    if share and trace is None and not mixed:
        rows = traces.with_large_outputs(rows, share, seed, costs)
    if write_trace is not None:
        traces.write_trace(write_trace, rows)
    results = []
    about = {} if uniform else {"fleet": describe(fleet)}
    for row in run_policies(rows, workers, kv_gib, costs, None if uniform else fleet):
        print(json.dumps({"workers": workers, **about, "jobs": len(rows), **row}), flush=True)
        if row["unrun"]:
            print(f"{row['policy']}: {row['unrun']} of {len(rows)} jobs never ran", file=sys.stderr, flush=True)
        results.append(row)
    return results
