"""The state graph: every move is a named rule, and the one Lua script refuses anything else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kleinfarm.producer.client import FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.states import TERMINAL_STATES, TRANSITIONS, JobState, Move, rule_for

ROOT = Path(__file__).parent.parent


def test_every_state_but_the_terminal_ones_can_be_left_and_every_move_is_named() -> None:
    sources = {state for rule in TRANSITIONS.values() for state in rule.sources}
    assert sources | TERMINAL_STATES == set(JobState)
    assert set(TRANSITIONS) == set(Move)
    with pytest.raises(ValueError, match="cannot lead to"):
        rule_for(Move.CANCEL, JobState.SUCCEEDED)


def test_the_script_refuses_a_move_from_a_state_the_rule_does_not_list(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    handle = scratch_farm.submit(Campaign.from_raw("graph", [{"prompt": "p"}]))
    (job_id,) = state.job_ids(handle.id)
    assert not state.move(job_id, Move.CLAIM, JobState.RUNNING).changed  # pending: not claimable
    assert not state.move(job_id, Move.FINISH, JobState.SUCCEEDED).changed
    attempt = state.assign(job_id, "w1", 1.5)
    assert attempt == 1 and state.assign(job_id, "w2", 1.5) == 0  # taken: no second assignment
    assert not state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=2, if_worker="w1").changed
    assert state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="w1").changed
    assert not state.move(job_id, Move.CANCEL, JobState.CANCELLED).changed  # only a pending job is cancelled
    assert state.move(job_id, Move.FINISH, JobState.SUCCEEDED, if_attempt=1, if_worker="w1").closed_campaign
    status = state.status(handle.id)
    assert (status.pending, status.running, status.succeeded) == (0, 0, 1)
    assert scratch_farm.state.redis.zscore(keys.worker_assigned("w1"), job_id) == 1.5


def test_a_claim_reads_what_the_worker_needs_in_the_same_round_trip_and_nothing_when_stale(
    scratch_farm: FarmClient,
) -> None:
    state = scratch_farm.state
    campaign = Campaign.from_raw("claims", [{"prompt": "a mug", "seed": 7}], output_prefix="shots")
    handle = scratch_farm.submit(campaign)
    (job_id,) = state.job_ids(handle.id)
    attempt = state.assign(job_id, "w1", 1.5)
    assert not state.claim(job_id, attempt + 1, "w1", 100.0).outcome.changed  # a stale attempt
    stale = state.claim(job_id, attempt, "w2", 100.0)  # another worker's delivery
    assert not stale.outcome.changed and stale.record is None and stale.campaign == {}
    claim = state.claim(job_id, attempt, "w1", 100.0)
    assert claim.outcome.changed and claim.outcome.previous == JobState.ASSIGNED
    assert claim.record is not None and claim.record.state == JobState.RUNNING
    assert claim.record.spec["prompt"] == "a mug" and claim.record.spec["seed"] == 7
    assert claim.campaign["output_prefix"] == "shots" and float(claim.campaign["created"]) > 0
    assert claim.routing == state.routing([job_id])[0] and claim.routing is not None
    assert claim.cancel_reason is None
    assert state.redis.hget(keys.job(job_id), "started") == "100.0"
    assert not state.claim(job_id, attempt, "w1", 101.0).outcome.changed  # a redelivery: running already


def test_a_claimed_job_of_a_cancelled_campaign_says_so(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    handle = scratch_farm.submit(Campaign.from_raw("claim-cancelled", [{"prompt": "p"}, {"prompt": "q"}]))
    first, _second = state.job_ids(handle.id)
    attempt = state.assign(first, "w1", 1.0)
    handle.cancel()
    claim = state.claim(first, attempt, "w1", 100.0)
    assert claim.outcome.changed and claim.cancel_reason == "campaign cancelled"


def test_a_stale_queue_entry_whose_job_is_gone_is_dropped_not_assigned(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    state.redis.zadd(keys.PENDING, {"gone/job-0": 1.0})
    assert state.assign("gone/job-0", "w1", 1.0) == 0
    assert state.redis.zcard(keys.PENDING) == 0 and state.redis.zcard(keys.worker_assigned("w1")) == 0


def test_a_requeued_job_goes_back_to_the_queue_and_a_paused_campaign_keeps_it_aside(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    handle = scratch_farm.submit(Campaign.from_raw("requeue", [{"prompt": "a"}, {"prompt": "b"}]))
    first, second = state.job_ids(handle.id)
    for job_id in (first, second):
        state.assign(job_id, "w1", 1.0)
    assert state.move(first, Move.REQUEUE, JobState.PENDING, if_worker="w1").changed
    assert state.redis.zrange(keys.PENDING, 0, -1) == [first]
    state.redis.hset(keys.campaign(handle.id), "paused", 1)
    assert state.move(second, Move.REQUEUE, JobState.PENDING, if_worker="w1").changed
    assert state.redis.zrange(keys.campaign_paused(handle.id), 0, -1) == [second]


def test_every_redis_key_is_built_in_keys_py_and_documented() -> None:
    """No module or script builds a key of its own; docs/redis.md names every key."""
    builders = re.compile(r"""f?["']kf[:.]|\{PREFIX\}|\.\. *['"]:""")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("shared", "producer", "worker")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".lua") and path.name != "keys.py" and builders.search(path.read_text())
    ]
    assert offenders == []
    schema = (ROOT / "docs" / "redis.md").read_text()
    source = (ROOT / "shared" / "keys.py").read_text()
    names = re.findall(r"^def (\w+)\(", source, re.MULTILINE) + re.findall(r"^([A-Z_]+) = f", source, re.MULTILINE)
    undocumented = [
        name for name in names if f"`{name}" not in schema and name not in ("job_id", "campaign_of", "local_id_of")
    ]
    assert undocumented == []


def test_a_backoff_waits_in_the_delayed_set_by_the_redis_clock_then_keeps_its_place(scratch_farm: FarmClient) -> None:
    state = scratch_farm.state
    handle = scratch_farm.submit(Campaign.from_raw("backoff", [{"prompt": "a"}, {"prompt": "b"}]))
    first, second = state.job_ids(handle.id)
    score = state.redis.zscore(keys.PENDING, first)
    state.assign(first, "w1", 1.0)
    state.move(first, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="w1")
    assert state.active_job_ids() == [first]
    before = state.server_time()
    outcome = state.move(first, Move.BACKOFF, JobState.PENDING, if_attempt=1, if_worker="w1", delay_s=30, release="w1")
    assert outcome.changed and state.active_job_ids() == []
    assert state.redis.zrange(keys.PENDING, 0, -1) == [second]  # not queued yet
    ready_at = state.redis.zscore(keys.DELAYED, first)
    assert ready_at is not None and before + 30 <= ready_at <= state.server_time() + 30
    assert state.redis.zcard(keys.worker_assigned("w1")) == 0  # its slot freed in the same step
    assert state.status(handle.id).pending == 2 and state.status(handle.id).running == 0
    assert state.promote_ready() == 0  # 30 s to go

    state.redis.zadd(keys.DELAYED, {first: before - 1})  # as if the 30 s had passed
    assert state.promote_ready() == 1
    assert state.redis.zscore(keys.PENDING, first) == score  # back in its own place in the queue
    assert state.redis.zcard(keys.DELAYED) == 0


def test_a_job_whose_backoff_ends_while_its_campaign_is_paused_or_cancelled_is_not_dispatched(
    scratch_farm: FarmClient,
) -> None:
    state = scratch_farm.state
    paused = scratch_farm.submit(Campaign.from_raw("paused", [{"prompt": "a"}]))
    cancelled = scratch_farm.submit(Campaign.from_raw("cancelled", [{"prompt": "b"}]))
    waiting = [state.job_ids(paused.id)[0], state.job_ids(cancelled.id)[0]]
    for job_id in waiting:
        state.assign(job_id, "w1", 1.0)
        state.move(job_id, Move.CLAIM, JobState.RUNNING, if_attempt=1, if_worker="w1")
        state.move(job_id, Move.BACKOFF, JobState.PENDING, if_attempt=1, delay_s=0)
    paused.pause()
    assert state.request_cancel(cancelled.id) == 1
    assert state.redis.zrange(keys.DELAYED, 0, -1) == [waiting[0]]  # cancel took its job out
    assert state.promote_ready() == 1
    assert state.redis.zcard(keys.PENDING) == 0
    assert state.redis.zrange(keys.campaign_paused(paused.id), 0, -1) == [waiting[0]]
