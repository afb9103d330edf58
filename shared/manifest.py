"""The campaign manifest: one JSON line per job, written beside the images when the campaign ends."""

from __future__ import annotations

import json
from typing import Any

from kleinfarm.shared.state import FarmState, campaign_key
from kleinfarm.shared.storage import Storage

RESULT_FIELDS = ("job_id", "state", "key", "error", "seed", "width", "height")


def output_key(prefix: str, campaign_id: str, job_id: str) -> str:
    """Deterministic key of a job's image, so a retried job finds its own earlier write."""
    return f"{prefix.strip('/')}/{campaign_id}/{job_id}.png"


def manifest_key(prefix: str, campaign_id: str) -> str:
    return f"{prefix.strip('/')}/{campaign_id}/manifest.jsonl"


def result_row(record: dict[str, str]) -> dict[str, Any]:
    """A job record reduced to what ``kleinfarm results`` prints."""
    row: dict[str, Any] = {name: record.get(name) or None for name in RESULT_FIELDS}
    for name in ("seed", "width", "height"):
        row[name] = int(row[name]) if row[name] is not None else None
    return row


def manifest_row(record: dict[str, str]) -> dict[str, Any]:
    spec = json.loads(record.get("spec", "{}"))
    return {
        **result_row(record),
        "kind": spec.get("kind"),
        "prompt": spec.get("prompt"),
        "references": spec.get("references", []),
        "refset": record.get("refset") or None,
        "kv": record.get("kv") or None,
        "attempt": int(record.get("attempt", 0)),
        "worker": record.get("worker") or None,
        "timings": json.loads(record["timings"]) if record.get("timings") else None,
    }


def write_manifest(state: FarmState, storage: Storage, campaign_id: str) -> str:
    """Write (or rewrite) the campaign's manifest; return its key."""
    meta = state.campaign_meta(campaign_id)
    key = manifest_key(meta["output_prefix"], campaign_id)
    storage.put_jsonl(key, [manifest_row(record) for record in state.jobs(campaign_id)])
    state.redis.hset(campaign_key(campaign_id), "manifest_key", key)
    state.redis.publish(state.events_channel(campaign_id), "manifest")
    return key
