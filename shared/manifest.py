"""Where a campaign's outputs go, and its manifest: one JSON line per job, written when it ends."""

from __future__ import annotations

from kleinfarm.shared import keys
from kleinfarm.shared.state import FarmState
from kleinfarm.shared.storage import Storage

# The file name extension of each output format.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def output_key(prefix: str, campaign_id: str, local_id: str, fmt: str = "png") -> str:
    """Deterministic key of a job's image, so a retried job finds its own earlier write."""
    return f"{prefix.strip('/')}/{campaign_id}/{local_id}.{EXTENSIONS[fmt]}"


def manifest_key(prefix: str, campaign_id: str) -> str:
    return f"{prefix.strip('/')}/{campaign_id}/manifest.jsonl"


def report_key(prefix: str, campaign_id: str) -> str:
    return f"{prefix.strip('/')}/{campaign_id}/report.html"


def write_manifest(state: FarmState, storage: Storage, campaign_id: str) -> str:
    """Write (or rewrite) the campaign's manifest; return its key.

    The rows are streamed from ``state.jobs`` (read in chunks) to storage (spooled, uploaded in
    parts): the worker that closes a big campaign never holds the whole manifest in memory.
    """
    meta = state.campaign_meta(campaign_id)
    key = manifest_key(meta["output_prefix"], campaign_id)
    storage.put_jsonl(key, (record.manifest_row() for record in state.jobs(campaign_id)))
    state.redis.hset(keys.campaign(campaign_id), "manifest_key", key)
    state.redis.publish(keys.campaign_events(campaign_id), "manifest")
    return key
