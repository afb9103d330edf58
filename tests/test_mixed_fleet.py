"""Routing on a mixed fleet (issue 14): a job goes only to a card that can run it, load is counted
in each worker's own seconds, and the simulator models cards of unequal speed, K/V budget and size."""

from __future__ import annotations

import pytest

from kleinfarm.producer.bench.fleets import CARD_80GB, RTX_4090, RTX_5090, Card, mixed_fleet
from kleinfarm.producer.bench.routing import lower_bound, run_policies
from kleinfarm.producer.bench.simulator import LateBindingSim, TraceJob, simulate_push, trace_jobs
from kleinfarm.producer.bench.traces import with_large_outputs, zipf_trace
from kleinfarm.shared.capacity import Capability, JobShape
from kleinfarm.shared.costmodel import CostModel
from kleinfarm.shared.routing import POLICIES, AffinityPolicy, PendingIndex, PendingJob, Round, WorkerState
from kleinfarm.shared.routing.policy import commit, own_ms

GIB = 1024**3
BIG = JobShape.worst_case(2048, 2048, 4)  # 15.2 GiB beside the weights: neither a 4090 nor a 5090
SMALL = JobShape.worst_case(1024, 1024, 1)
SMALL_CARD = Capability(job_bytes=int(14.75 * GIB))
BIG_CARD = Capability(job_bytes=int(46 * GIB), speed=2.0)


def job(job_id: str, route: str | None, shape: JobShape | None, work: float = 1.0, build: float = 1.0) -> PendingJob:
    return PendingJob(job_id, route, work, build, shape=shape)


def card(name: str, capability: Capability | None, holds: set[str] | None = None, queued: float = 0.0) -> WorkerState:
    return WorkerState(name, name, queued, 2, holds or set(), capability=capability)


def assign(name: str, pending: PendingIndex, workers: list[WorkerState]) -> list[tuple[str, str]]:
    holders: dict[str, int] = {}
    for state in workers:
        for route in state.holds:
            holders[route] = holders.get(route, 0) + 1
    decisions = POLICIES[name]().assign(Round(pending, workers, holders))
    return [(decision.job.job_id, decision.worker.worker_id) for decision in decisions]


def test_the_big_job_only_fits_the_big_card() -> None:
    assert not SMALL_CARD.fits(BIG) and BIG_CARD.fits(BIG) and SMALL_CARD.fits(SMALL)
    assert not RTX_4090.capability.fits(BIG) and not RTX_5090.capability.fits(BIG)  # type: ignore[union-attr]
    assert CARD_80GB.capability.fits(BIG)  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_job_too_big_for_one_worker_goes_to_the_one_that_can_run_it(name: str) -> None:
    # The small card comes first, is idle, and holds the job's set: every policy would pick it.
    small, big = card("small", SMALL_CARD, {"a"}), card("big", BIG_CARD, queued=5.0)
    pending = PendingIndex([job("big-job", "a", BIG)])
    assert assign(name, pending, [small, big]) == [("big-job", "big")]
    assert not pending


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_job_no_worker_can_run_stays_pending_and_runs_when_such_a_worker_joins(name: str) -> None:
    policy = POLICIES[name]()
    pending = PendingIndex([job("big-job", "a", BIG), job("small-job", "b", SMALL)])
    small = [card("s0", SMALL_CARD, {"a"}), card("s1", SMALL_CARD)]
    handed = []
    for _ in range(3):  # round after round: never handed out, never in anyone's way
        for state in small:
            state.free_slots, state.queued_ms = 2, 0
        handed += [decision.job.job_id for decision in policy.assign(Round(pending, small, {"a": 1}))]
    assert handed == ["small-job"]
    assert [pending_job.job_id for pending_job in pending.jobs()] == ["big-job"]
    joined = card("big", BIG_CARD)
    decisions = policy.assign(Round(pending, [*small, joined], {"a": 1}))
    assert [(decision.job.job_id, decision.worker.worker_id) for decision in decisions] == [("big-job", "big")]


def test_a_set_held_only_by_cards_too_small_for_its_next_job_is_built_by_one_that_can_run_it() -> None:
    # Holders are counted among the cards that can run the job: the small holders do not count,
    # so the set is wanted and the big card builds it (else the job waited for ever: the build
    # costs more than the holders' backlog, so no steal either).
    holders = [card(f"s{i}", SMALL_CARD, {"a"}, queued=3.0) for i in range(2)]
    for state in holders:
        state.free_slots = 0
    big = card("big", BIG_CARD)
    big.free_slots = 1  # with two, it would take the small job too: it holds the set by then
    pending = PendingIndex([job("big-job", "a", BIG, work=1.0, build=5.0), job("small-job", "a", SMALL, build=5.0)])
    decisions = AffinityPolicy().assign(Round(pending, [*holders, big], {"a": 2}))
    assert [(decision.job.job_id, decision.worker.worker_id) for decision in decisions] == [("big-job", "big")]
    assert [pending_job.job_id for pending_job in pending.jobs()] == ["small-job"]  # left to its holders


def test_a_small_card_takes_what_it_can_run_past_a_big_job_of_its_own_set() -> None:
    small = card("small", SMALL_CARD, {"a"})
    pending = PendingIndex([job("big-job", "a", BIG), job("small-job", "a", SMALL)])
    decisions = AffinityPolicy().assign(Round(pending, [small], {"a": 1}))
    assert [decision.job.job_id for decision in decisions] == ["small-job"]
    assert [pending_job.job_id for pending_job in pending.jobs()] == ["big-job"]
    assert pending.queues["a"][0].job_id == "big-job" and pending.backlog_ms["a"] == 1000


def test_costs_are_counted_in_each_workers_own_seconds() -> None:
    fast, slow = card("fast", Capability(speed=1.7)), card("slow", Capability(speed=1.0))
    holders: dict[str, int] = {}
    jobs = [job(str(i), "a", SMALL, work=1.0 + i / 3, build=0.7) for i in range(6)]
    fast_costs = [commit(fast, pending_job, holders).cost_ms for pending_job in jobs[:3]]
    slow_costs = [commit(slow, pending_job, holders).cost_ms for pending_job in jobs[3:]]
    # The first job of a set pays the build; each cost is the cost model's over the worker's speed.
    assert fast_costs == [round(1700 / 1.7), round(1333 / 1.7), round(1667 / 1.7)] == [1000, 784, 981]
    assert slow_costs == [2700, 2333, 2667]  # its first job of "a" builds it there too
    assert fast.queued_ms == sum(fast_costs) and slow.queued_ms == sum(slow_costs)
    assert own_ms(1, 3.0) == 1 and own_ms(0, 3.0) == 0  # never rounded down to nothing
    assert own_ms(1000, 1e9) == 1
    for bad in (0.0, -1.0, float("inf"), float("nan")):  # a bad heartbeat figure counts as 1.0
        assert own_ms(1000, bad) == 1000
        assert card("odd", Capability(speed=bad)).speed == 1.0
    for cost in fast_costs:  # integers: what is taken away brings it back to exactly zero
        fast.queued_ms -= cost
    assert fast.queued_ms == 0


def test_the_load_cap_and_order_go_by_each_workers_own_seconds() -> None:
    # The same cost-model work queued: the fast card frees first, so it is asked first.
    fast, slow = card("b-fast", Capability(speed=2.0)), card("a-slow", Capability(speed=1.0))
    holders: dict[str, int] = {}
    commit(fast, job("x", None, SMALL, work=4.0), holders)
    commit(slow, job("y", None, SMALL, work=4.0), holders)
    assert (fast.queued_ms, slow.queued_ms) == (2000, 4000)
    pending = PendingIndex([job("z", None, SMALL)])
    decisions = AffinityPolicy().assign(Round(pending, [slow, fast], holders))
    assert [decision.worker.worker_id for decision in decisions] == ["b-fast"]


def test_a_fleet_without_capabilities_decides_as_before() -> None:
    # Shapes on the jobs, no capability on the workers: the uniform farm's decisions, to the job.
    def run(shaped: bool) -> list[tuple[str, str]]:
        workers = [card(f"w{i}", None) for i in range(3)]
        pending = PendingIndex(
            job(str(i), None if i % 5 == 0 else f"s{i % 3}", BIG if i % 2 else SMALL if shaped else None)
            for i in range(30)
        )
        out = []
        policy = AffinityPolicy()
        while pending:
            out += [(d.job.job_id, d.worker.worker_id) for d in policy.assign(Round(pending, workers, {}))]
            for state in workers:
                state.free_slots, state.queued_ms = 2, 0
        return out

    assert run(True) == run(False)


# The simulator's mixed fleet.


def mixed_jobs(count: int, workers: int) -> tuple[list[TraceJob], list[Card]]:
    costs = CostModel()
    fleet = mixed_fleet(workers)
    capacity = sum(member.speed for member in fleet)
    rows = with_large_outputs(zipf_trace(1.1, count, capacity, 1, costs), 0.2, 1, costs)
    return trace_jobs(rows, costs), fleet


def test_the_lower_bound_counts_the_speeds_and_the_cards_a_job_fits() -> None:
    jobs = [TraceJob(index, 0.0, None, 10.0, 0.0, 0, SMALL) for index in range(6)]
    fast, slow = Card("fast", 3.0, GIB, Capability(speed=3.0)), Card("slow", 1.0, GIB, Capability(speed=1.0))
    assert lower_bound(jobs, 2) == 30.0
    assert lower_bound(jobs, 2, [fast, slow]) == 15.0  # 60 s of work at 4 s per second
    # Every job too big for the slow card: all the work on the fast one.
    big_only = [TraceJob(index, 0.0, None, 10.0, 0.0, 0, BIG) for index in range(6)]
    fast_big = Card("fast", 3.0, GIB, Capability(job_bytes=int(46 * GIB), speed=3.0))
    slow_small = Card("slow", 1.0, GIB, Capability(job_bytes=int(14.75 * GIB), speed=1.0))
    assert lower_bound(big_only, 2, [fast_big, slow_small]) == 20.0
    # One long job: no sooner than its time on the fastest card that can run it.
    long_job = [TraceJob(0, 5.0, "a", 30.0, 6.0, 1, BIG)]
    assert lower_bound(long_job, 2, [fast_big, slow_small]) == 5.0 + 36.0 / 3.0


def test_the_mixed_fleet_runs_every_job_each_on_a_card_that_fits_it_at_that_cards_speed() -> None:
    jobs, fleet = mixed_jobs(3000, 8)
    big_only = [j for j in jobs if j.shape is not None and not RTX_4090.capability.fits(j.shape)]  # type: ignore[union-attr]
    assert len(big_only) >= 5  # the check is not vacuous
    bound = lower_bound(jobs, 8, fleet)
    for outcome in (
        LateBindingSim(jobs, 8, 0, fleet=fleet).run(),
        simulate_push(jobs, 8, 0, POLICIES["least_loaded"](), fleet),
    ):
        assert outcome.unrun_jobs == 0
        assert all(fleet[outcome.worker[j.index]] is CARD_80GB for j in big_only)
        for j in jobs:
            speed = fleet[outcome.worker[j.index]].speed
            expected = (j.work_s + (0.0 if outcome.hit[j.index] else j.build_s)) / speed
            assert outcome.finish[j.index] - outcome.start[j.index] == pytest.approx(expected)
            assert outcome.start[j.index] >= j.arrival_s
        assert max(outcome.finish) >= bound
        assert sum(outcome.work) == pytest.approx(sum(b * fleet[i].speed for i, b in enumerate(outcome.busy)))


def test_every_policy_runs_every_job_on_the_mixed_fleet_and_none_beats_the_bound() -> None:
    costs = CostModel()
    fleet = mixed_fleet(8)
    rows = with_large_outputs(zipf_trace(1.1, 1500, sum(m.speed for m in fleet), 2, costs), 0.05, 2, costs)
    results = list(run_policies(rows, 8, 48.0, costs, fleet))
    assert [row["policy"] for row in results] == [*POLICIES, "oracle"]
    assert all(row["unrun"] == 0 for row in results)
    assert all(row["makespan_vs_lower_bound"] >= 1.0 for row in results)
    assert all(row["gpu_s"] >= results[-1]["gpu_s"] - 1e-6 for row in results)
