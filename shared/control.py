"""Campaign control as Deadline, Flamenco and InvokeAI users expect it: pause, resume, retry the
failed jobs, fail a campaign past its error limit, keep a failing worker off a campaign."""

from __future__ import annotations

from kleinfarm.shared import keys
from kleinfarm.shared.state import FarmState, load_script
from kleinfarm.shared.states import JobState, Move

# A worker whose own errors (not the job's bad input) fail this many of a campaign's jobs is kept
# off that campaign (Flamenco's blocklist_threshold).
BLOCKLIST_THRESHOLD = 3


class CampaignControl:
    """Whole-campaign operations on the farm's state."""

    def __init__(self, state: FarmState) -> None:
        self.state = state
        self.redis = state.redis
        self._move = load_script(state.redis, "move.lua")

    def pause(self, campaign_id: str) -> int:
        """Set the campaign's queued jobs aside (running ones finish); return how many."""
        self.state.campaign_meta(campaign_id)
        self.redis.hset(keys.campaign(campaign_id), "paused", 1)
        return self._move_all(campaign_id, keys.PENDING, keys.campaign_paused(campaign_id))

    def resume(self, campaign_id: str) -> int:
        """Give the paused jobs back to the dispatcher; return how many."""
        self.state.campaign_meta(campaign_id)
        self.redis.hset(keys.campaign(campaign_id), "paused", 0)
        moved = self._move_all(campaign_id, keys.campaign_paused(campaign_id), keys.PENDING)
        self.state.wake_dispatcher(campaign_id)
        return moved

    def retry_failed(self, campaign_id: str) -> int:
        """Requeue the failed jobs only, as new (no failure, loss or backoff counted); return how many.

        The blocklist is built from those failures, so it goes with them: the retried jobs may run
        on any worker again.
        """
        self.state.campaign_meta(campaign_id)
        self.redis.hdel(keys.campaign(campaign_id), "failed_reason", "manifest_key")
        self.redis.hset(keys.campaign(campaign_id), "cancel_requested", 0)
        self.redis.delete(keys.campaign_worker_failures(campaign_id), keys.campaign_blocked(campaign_id))
        job_ids = self.state.job_ids(campaign_id)
        fresh = {"error": "", "lost": "0", "transient_failures": "0", "transient_error": ""}
        retried = sum(outcome.changed for outcome in self.state.move_many(job_ids, Move.RETRY, JobState.PENDING, fresh))
        self.state.wake_dispatcher(campaign_id)
        return retried

    def fail_if_over_limit(self, campaign_id: str) -> bool:
        """Fail the campaign once its failures pass its error limit; True if it did now."""
        meta = self.state.campaign_meta(campaign_id)
        limit, failed = meta.get("error_limit"), int(meta.get("n_failed", 0))
        if limit in (None, "") or failed <= int(str(limit)) or meta.get("failed_reason"):
            return False
        reason = f"{failed} jobs failed: more than the campaign's error_limit of {limit}"
        self.redis.hset(keys.campaign(campaign_id), "failed_reason", reason)
        self.state.request_cancel(campaign_id, reason=f"campaign failed: {reason}")
        return True

    def record_worker_failure(self, campaign_id: str, identity: str) -> bool:
        """Count a failure the worker caused; True once it is blocked from the campaign."""
        failures = self.redis.hincrby(keys.campaign_worker_failures(campaign_id), identity, 1)
        if int(failures) >= BLOCKLIST_THRESHOLD:
            self.redis.sadd(keys.campaign_blocked(campaign_id), identity)
            return True
        return False

    def exclusions(self, campaign_ids: set[str]) -> dict[str, frozenset[str]]:
        """Worker identities kept off each campaign (only campaigns that keep any off)."""
        ordered = sorted(campaign_ids)
        pipe = self.redis.pipeline(transaction=False)
        for campaign_id in ordered:
            pipe.smembers(keys.campaign_blocked(campaign_id))
        found = zip(ordered, pipe.execute(), strict=True)
        return {campaign_id: frozenset(identities) for campaign_id, identities in found if identities}

    def _move_all(self, campaign_id: str, source: str, target: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in self.state.job_ids(campaign_id):
            self._move(keys=[source, target], args=[job_id], client=pipe)
        return sum(int(moved) for moved in pipe.execute())
