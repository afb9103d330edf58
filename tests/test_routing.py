"""The routing policy as pure logic, and the simulator that runs it."""

from __future__ import annotations

from kleinfarm.producer.bench_routing import bursty_trace, lower_bound, zipf_trace
from kleinfarm.producer.simulator import LateBindingSim, round_robin, simulate_push, trace_jobs
from kleinfarm.shared.costmodel import CostModel
from kleinfarm.shared.routing import (
    Owners,
    PendingIndex,
    PendingJob,
    Take,
    WorkerState,
    assign_round,
    choose_route,
    desired_holders,
)

GIB = 1024**3


def job(member: str, route: str | None, work: float = 1.0, build: float = 1.0, priority: int = 0) -> PendingJob:
    return PendingJob(member, route, work, build, priority)


def worker(name: str, holds: set[str] | None = None, queued: float = 0.0, slots: int = 2) -> WorkerState:
    return WorkerState(name, name, queued, slots, holds or set())


def test_a_worker_takes_the_reference_set_it_holds_before_older_jobs() -> None:
    pending = PendingIndex([job("1", "a"), job("2", None), job("3", "b")])
    assert choose_route(worker("w", {"b"}), pending, {"b": 1, "a": 1}, 2, 10.0) == Take("b")


def test_jobs_without_references_fill_the_gaps_when_every_set_is_covered() -> None:
    pending = PendingIndex([job("1", "a"), job("2", None)])
    assert choose_route(worker("w"), pending, {"a": 1}, 2, 10.0) == Take(None)


def test_a_worker_waits_rather_than_rebuild_a_set_its_holder_clears_soon() -> None:
    pending = PendingIndex([job("1", "a", work=1.0, build=5.0)])
    assert choose_route(worker("w"), pending, {"a": 1}, 2, 10.0) is None


def test_a_hot_set_spreads_once_its_backlog_passes_two_fair_shares() -> None:
    assert desired_holders(backlog_s=60, fair_s=30, workers=8) == 1
    assert desired_holders(backlog_s=100, fair_s=30, workers=8) == 2
    assert desired_holders(backlog_s=300, fair_s=30, workers=8) == 5
    assert desired_holders(backlog_s=300, fair_s=30, workers=2) == 2
    assert desired_holders(backlog_s=1, fair_s=30, workers=8) == 1


def test_a_reference_set_is_built_by_its_rendezvous_owner_first() -> None:
    owners = Owners(["w0", "w1", "w2", "w3"])
    pending = PendingIndex([job("1", "x"), job("2", "y")])
    first = {route: min(["w0", "w1", "w2", "w3"], key=lambda name: owners.rank(route, name)) for route in "xy"}
    for name in ("w0", "w1", "w2", "w3"):
        take = choose_route(worker(name), pending, {}, 4, 100.0, owners)
        owned = [route for route, owner in first.items() if owner == name]
        assert take == (Take(owned[0]) if owned else Take("x"))


def test_a_burst_before_any_cache_exists_already_groups_by_reference_set() -> None:
    routes = ["hot"] * 6000 + [f"set{i % 20}" for i in range(4000)]
    pending = PendingIndex(job(str(i), route) for i, route in enumerate(routes))
    workers = [worker(f"w{i}") for i in range(8)]
    holders: dict[str, int] = {}
    handed: dict[str, set[str]] = {}
    while pending:
        for decision in assign_round(pending, workers, holders):
            handed.setdefault(str(decision.job.route), set()).add(decision.worker.worker_id)
        for state in workers:  # every worker finishes what it held; its cache keeps the sets
            state.free_slots, state.queued_s = 2, 0.0
    assert all(len(names) == 1 for route, names in handed.items() if route != "hot")
    assert 2 <= len(handed["hot"]) <= 8
    builds = sum(len(names) for names in handed.values())
    assert builds <= 20 + 8


def test_a_worker_over_the_load_cap_takes_nothing_until_the_others_catch_up() -> None:
    pending = PendingIndex([job("1", None), job("2", None)])
    busy, idle = worker("busy", queued=10.0, slots=1), worker("idle", queued=0.0, slots=2)
    decisions = assign_round(pending, [busy, idle], {})
    assert [decision.worker.worker_id for decision in decisions] == ["idle", "idle"]


def test_higher_priority_jobs_go_first_whatever_a_worker_holds() -> None:
    pending = PendingIndex([job("urgent", None, priority=5), job("later", "a", priority=0)])
    assert choose_route(worker("w", {"a"}), pending, {"a": 1}, 1, 1.0) == Take(None)


def test_every_simulated_job_runs_once_after_it_arrives() -> None:
    costs = CostModel()
    for rows in (zipf_trace(1.1, 2000, 8, 1, costs), bursty_trace(2000, 8, 1, costs)):
        jobs = trace_jobs(rows, costs)
        for outcome in (LateBindingSim(jobs, 8, 32 * GIB).run(), simulate_push(jobs, 8, 32 * GIB, round_robin())):
            assert all(outcome.start[j.index] >= j.arrival_s for j in jobs)
            assert all(outcome.finish[j.index] > outcome.start[j.index] for j in jobs)
            assert max(outcome.finish) >= lower_bound(jobs, 8)
            work = sum(j.work_s + (0 if outcome.hit[j.index] else j.build_s) for j in jobs)
            assert abs(sum(outcome.busy) - work) < 1e-6 * work
