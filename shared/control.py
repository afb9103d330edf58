"""Campaign control as Deadline, Flamenco and InvokeAI users expect it: pause, resume, retry the
failed jobs, fail a campaign past its error limit, keep a failing worker off a campaign."""

from __future__ import annotations

from kleinfarm.shared.jobs import JobState
from kleinfarm.shared.state import PENDING, WAKE, FarmState, campaign_key, job_member, load_script

# A worker whose own errors (not the job's bad input) fail this many of a campaign's jobs is kept
# off that campaign (Flamenco's blocklist_threshold).
BLOCKLIST_THRESHOLD = 3


def held_key(campaign_id: str) -> str:
    return campaign_key(campaign_id) + ":held"


def _blocked_key(campaign_id: str) -> str:
    return campaign_key(campaign_id) + ":blocked"


def _worker_failures_key(campaign_id: str) -> str:
    return campaign_key(campaign_id) + ":worker-failures"


class CampaignControl:
    """Whole-campaign operations on the farm's state."""

    def __init__(self, state: FarmState) -> None:
        self.state = state
        self.redis = state.redis
        self._move = load_script(state.redis, "move.lua")

    def members(self, campaign_id: str) -> list[str]:
        return [job_member(campaign_id, job_id) for job_id in self.state.job_ids(campaign_id)]

    def pause(self, campaign_id: str) -> int:
        """Hold the campaign's queued jobs (running ones finish); return how many were held."""
        self.state.campaign_meta(campaign_id)
        self.redis.hset(campaign_key(campaign_id), "paused", 1)
        return self._move_all(campaign_id, PENDING, held_key(campaign_id))

    def resume(self, campaign_id: str) -> int:
        """Give the held jobs back to the dispatcher; return how many."""
        self.state.campaign_meta(campaign_id)
        self.redis.hset(campaign_key(campaign_id), "paused", 0)
        moved = self._move_all(campaign_id, held_key(campaign_id), PENDING)
        self.redis.lpush(WAKE, campaign_id)
        return moved

    def retry_failed(self, campaign_id: str) -> int:
        """Requeue the failed jobs only; return how many."""
        self.state.campaign_meta(campaign_id)
        self.redis.hdel(campaign_key(campaign_id), "failed_reason", "manifest_key")
        self.redis.hset(campaign_key(campaign_id), "cancel_requested", 0)
        retried = 0
        for member in self.members(campaign_id):
            outcome = self.state.transition(
                member, JobState.PENDING, [JobState.FAILED], enqueue=True, fields={"error": ""}
            )
            retried += outcome.changed
        self.redis.lpush(WAKE, campaign_id)
        return retried

    def fail_if_over_limit(self, campaign_id: str) -> bool:
        """Fail the campaign once its failures pass its error limit; True if it did now."""
        meta = self.state.campaign_meta(campaign_id)
        limit, failed = meta.get("error_limit"), int(meta.get("n_failed", 0))
        if limit in (None, "") or failed <= int(str(limit)) or meta.get("failed_reason"):
            return False
        reason = f"{failed} jobs failed: more than the campaign's error_limit of {limit}"
        self.redis.hset(campaign_key(campaign_id), "failed_reason", reason)
        self.state.request_cancel(campaign_id, reason=f"campaign failed: {reason}")
        return True

    def record_worker_failure(self, campaign_id: str, identity: str) -> bool:
        """Count a failure the worker caused; True once it is blocked from the campaign."""
        failures = self.redis.hincrby(_worker_failures_key(campaign_id), identity, 1)
        if int(failures) >= BLOCKLIST_THRESHOLD:
            self.redis.sadd(_blocked_key(campaign_id), identity)
            return True
        return False

    def blocked(self, campaign_ids: set[str]) -> dict[str, set[str]]:
        """Identities kept off each campaign."""
        ordered = sorted(campaign_ids)
        pipe = self.redis.pipeline(transaction=False)
        for campaign_id in ordered:
            pipe.smembers(_blocked_key(campaign_id))
        return {campaign_id: set(found) for campaign_id, found in zip(ordered, pipe.execute(), strict=True)}

    def _move_all(self, campaign_id: str, source: str, target: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for member in self.members(campaign_id):
            self._move(keys=[source, target], args=[member], client=pipe)
        return sum(int(moved) for moved in pipe.execute())
