"""The affinity policy's submission rules (lumps, a bulk edit cheapest first) and its catch-up rule
(``shared/routing/submissions.py``, ``shared/routing/catchup.py``), on small rounds built by hand,
and the farm's dispatcher handing them the submission, the clock and the submitted-jobs count."""

from __future__ import annotations

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.broker import make_celery
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.records import WorkerReport
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.routing import PendingIndex, PendingJob, Round, Take, WorkerState, choose_route
from kleinfarm.shared.routing.affinity import last_resort, lump
from kleinfarm.shared.routing.catchup import OLD_S, CatchUp
from kleinfarm.worker.farm.dispatcher import Dispatcher


def job(
    job_id: str,
    route: str | None,
    submission: str,
    work: float = 1.0,
    build: float = 1.0,
    submitted_s: float = 0.0,
) -> PendingJob:
    return PendingJob(job_id, route, work, build, campaign=submission, submission=submission, submitted_s=submitted_s)


def worker(name: str, holds: set[str] | None = None) -> WorkerState:
    return WorkerState(name, name, 0.0, 2, holds or set())


def kit(count: int, submission: str = "campaign", submitted_s: float = 0.0, route: str = "kit") -> list[PendingJob]:
    return [job(f"{route}{index}", route, submission, submitted_s=submitted_s) for index in range(count)]


def test_a_kit_submitted_whole_is_a_lump_and_a_stream_is_not() -> None:
    stream = [job(f"s{index}", "hot", f"arrival-{index}") for index in range(6)]
    pending = PendingIndex([*kit(6), *stream, job("one", "single", "campaign")])
    assert lump(pending, "kit")
    assert not lump(pending, "hot")  # each job its own submission: a steady stream
    assert not lump(pending, "single")  # one job of its submission: nothing to drain


def test_a_lump_is_stolen_only_when_its_holders_are_far_behind_and_a_stream_sooner() -> None:
    stream = [job(f"s{index}", "hot", f"arrival-{index}") for index in range(6)]
    pending = PendingIndex([*kit(6), *stream])
    holders = {"kit": 1, "hot": 1}
    # Six 1 s jobs with a 1 s build each: a holder 6 s behind outlasts one job with a build here.
    assert last_resort(["hot"], pending, holders, fair_ms=10_000) == Take("hot")
    assert last_resort(["kit"], pending, holders, fair_ms=10_000) is None  # a lump: 3 fair shares, 30 s
    assert last_resort(["kit"], pending, holders, fair_ms=1_000) == Take("kit")  # 3 fair shares: 3 s


def test_a_lump_spreads_to_a_holder_per_ten_of_its_jobs_at_least() -> None:
    stream = [job(f"s{index}", "hot", f"arrival-{index}") for index in range(12)]
    lumped = PendingIndex(kit(12))
    streamed = PendingIndex(stream)
    # A fair share of 4 s: twelve 1 s jobs want two holders as a stream (12 s over 2 fair shares),
    # one as a lump (ten of its jobs with a build each, 20 s, per holder), nor is it stolen (3 fair shares).
    assert choose_route(worker("w2"), streamed, {"hot": 1}, 8, 4_000) == Take("hot")
    assert choose_route(worker("w2"), lumped, {"kit": 1}, 8, 4_000) is None


def test_a_bulk_edit_runs_its_cheapest_sets_first_and_a_campaign_in_order() -> None:
    bulk = [
        job("p0", "photo0", "bulk", work=2.0, build=3.0),
        job("p1", "photo1", "bulk", work=1.0, build=1.0),
        job("p2", "photo2", "bulk", work=1.0, build=2.0),
    ]
    assert choose_route(worker("w"), PendingIndex(bulk), {}, 8, 10_000) == Take("photo1")
    # A submission with a set of two jobs is no bulk of singletons: its order stands.
    mixed = [*bulk, job("p3", "photo0", "bulk", work=2.0, build=3.0)]
    campaign = PendingIndex([job(j.job_id, j.route, "campaign", j.work_s, j.build_s) for j in mixed])
    assert choose_route(worker("w"), campaign, {}, 8, 10_000) == Take("photo0")


def test_a_submission_is_judged_by_what_is_pending_alike_on_a_long_lived_and_a_rebuilt_index() -> None:
    spec = [("kit", 1.0), ("kit", 1.0), ("photo1", 9.0), ("photo2", 5.0), ("photo3", 1.0)]
    jobs = [job(f"j{index}", route, "campaign", work=cost, build=cost) for index, (route, cost) in enumerate(spec)]
    kept = PendingIndex(jobs)  # the simulator's: one index for the whole run
    kept.pop("kit")
    kept.pop("kit")
    rebuilt = PendingIndex(jobs[2:])  # the farm's: the queue's head each round
    # Once its kit is handed out, what is left of the campaign is one job per set: cheapest first, in both.
    assert choose_route(worker("w"), kept, {"kit": 1}, 8, 10_000) == Take("photo3")
    assert choose_route(worker("w"), rebuilt, {"kit": 1}, 8, 10_000) == Take("photo3")
    for route in ("photo1", "photo2", "photo3"):
        kept.pop(route)
    assert not kept.submissions._pending and not kept.submissions._cheapest  # nothing kept once none pends


def catching_up(submitted_later: int, waited_s: float, now_s: float | None = 1_000.0) -> bool:
    """A round at t=0 with 100 jobs submitted, 50 dispatched since, then one at ``now_s`` with
    ``submitted_later`` more submitted and the oldest job waiting ``waited_s``."""
    catchup = CatchUp()
    start = 1_000.0 - waited_s
    old = PendingIndex(kit(3, submitted_s=start))
    assert not catchup.engaged(Round(old, [], {}, now_s=start, submitted_jobs=100))
    catchup.dispatched(50)
    return catchup.engaged(Round(old, [], {}, now_s=now_s, submitted_jobs=100 + submitted_later))


def test_the_farm_catches_up_only_on_an_old_backlog_it_is_draining() -> None:
    assert catching_up(submitted_later=10, waited_s=OLD_S + 100)  # 10 in, 50 out: draining
    assert not catching_up(submitted_later=60, waited_s=OLD_S + 100)  # more in than out: a lasting overload
    assert not catching_up(submitted_later=10, waited_s=OLD_S - 100)  # a young backlog
    assert not catching_up(submitted_later=10, waited_s=OLD_S + 100, now_s=None)  # no clock: never


def test_a_job_no_worker_may_take_does_not_keep_the_farm_catching_up() -> None:
    catchup = CatchUp()
    stuck = job("stuck", "orphan", "pinned-elsewhere", submitted_s=0.0)
    pending = PendingIndex([stuck, *kit(3, submitted_s=OLD_S)])
    workers = [worker("w")]
    kept_off = {"pinned-elsewhere": frozenset({"w"})}  # e.g. its campaign runs a model no live worker has
    assert not catchup.engaged(Round(pending, workers, {}, exclusions=kept_off, now_s=0.0, submitted_jobs=4))
    catchup.dispatched(10)
    later = Round(pending, workers, {}, exclusions=kept_off, now_s=OLD_S + 100, submitted_jobs=4)
    assert not catchup.engaged(later)  # the oldest job any worker may take waited only 100 s
    assert catchup.engaged(Round(pending, workers, {}, now_s=OLD_S + 100, submitted_jobs=4))  # were it takeable


def test_while_catching_up_the_oldest_jobs_go_before_a_later_held_set() -> None:
    pending = PendingIndex([*kit(3, submitted_s=0.0, route="old"), *kit(3, "later", submitted_s=500.0, route="new")])
    holder = worker("w", {"new"})
    assert choose_route(holder, pending, {"new": 1}, 8, 10_000) == Take("new")
    assert choose_route(holder, pending, {"new": 1}, 8, 10_000, catchup=CatchUp()) == Take("old")


def test_while_catching_up_an_old_hot_set_spreads_to_finish_when_first_in_first_out_would() -> None:
    pending = PendingIndex(kit(20))
    # Twenty 1 s jobs with one holder, a fair share of 8 s: as a lump it keeps one holder; catching up,
    # the farm clears the work up to its last job in 8 s, so it wants five (a holder per 4 s of it).
    assert choose_route(worker("w2"), pending, {"kit": 1}, 8, 8_000) is None
    assert choose_route(worker("w2"), pending, {"kit": 1}, 8, 8_000, catchup=CatchUp()) == Take("kit")


def test_a_draining_worker_is_no_holder_so_another_builds_its_sets(scratch_farm: FarmClient) -> None:
    registry = Registry(scratch_farm.state, lapse_s=60)
    queue = keys.worker_queue
    registry.heartbeat("w1", WorkerReport(identity="host-gpu0", queue=queue("w1"), pid=1, routes=["kit"], slots=0))
    registry.heartbeat("w2", WorkerReport(identity="host-gpu1", queue=queue("w2"), pid=2, routes=["logo"]))
    registry.drain("host-gpu0")
    registry.heartbeat(
        "w1", WorkerReport(identity="host-gpu0", queue=queue("w1"), pid=1, routes=["kit"], slots=0, draining=True)
    )
    handle = scratch_farm.submit(Campaign.from_raw("any", [{"prompt": "a"}]))
    dispatcher = Dispatcher(make_celery(scratch_farm.settings), scratch_farm.state, registry, tick_s=1.0)
    round = dispatcher._round(scratch_farm.state.job_ids(handle.id), {v.worker_id: v for v in registry.live_workers()})
    assert round.holders == {"logo": 1}  # the drained card keeps "kit" cached but will take none of its jobs


def test_the_dispatcher_hands_each_job_its_campaign_submit_time_and_the_farm_clock(
    scratch_farm: FarmClient,
) -> None:
    registry = Registry(scratch_farm.state, lapse_s=60)
    registry.heartbeat("w1", WorkerReport(identity="host-gpu0", queue=keys.worker_queue("w1"), pid=1))
    first = scratch_farm.submit(Campaign.from_raw("first", [{"prompt": "a"}, {"prompt": "b"}]))
    second = scratch_farm.submit(Campaign.from_raw("second", [{"prompt": "c"}]))
    dispatcher = Dispatcher(make_celery(scratch_farm.settings), scratch_farm.state, registry, tick_s=1.0)
    job_ids = [*scratch_farm.state.job_ids(first.id), *scratch_farm.state.job_ids(second.id)]
    round = dispatcher._round(job_ids, {view.worker_id: view for view in registry.live_workers()})
    jobs = list(round.pending.jobs())
    assert [pending.submission for pending in jobs] == [first.id, first.id, second.id]
    created = [float(str(scratch_farm.state.redis.hget(keys.campaign(c.id), "created"))) for c in (first, second)]
    assert [pending.submitted_s for pending in jobs] == [created[0], created[0], created[1]]
    assert round.now_s is not None and created[1] <= round.now_s <= scratch_farm.state.server_time()
    assert round.submitted_jobs == int(str(scratch_farm.state.redis.get(keys.SEQUENCE)))
