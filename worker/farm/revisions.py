"""One model revision per campaign: a farm being upgraded runs two revisions side by side, and a
campaign's images must not mix them (the same seed and prompt give another image on another
revision, and reference K/V of one revision are not the other's).

Each campaign is pinned, the first time the dispatcher sees it, to the model that most live workers
not being drained run (``WorkerReport.model``, ``id@revision``); workers running another are kept off it through the
policy's exclusions (``Round.exclusions``), so nothing new is needed in the policies. A campaign
whose revision no live worker runs waits, with a note saying so. The worker checks again when a
job arrives (a job handed out before its campaign was pinned goes back, costing nothing).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import redis

from kleinfarm.shared import keys
from kleinfarm.shared.registry import WorkerView

MODEL_FIELD = "model"


def pin_campaigns(client: redis.Redis, campaigns: Iterable[str], views: Iterable[WorkerView]) -> dict[str, str]:
    """Each campaign's model, pinning the unpinned ones to the model most live workers run."""
    ordered = sorted(campaigns)
    # Draining workers are on their way out (an upgrade drains the old revision first): not counted.
    live = Counter(view.report.model for view in views if view.report.model and not view.report.draining)
    if not ordered:
        return {}
    pipe = client.pipeline(transaction=False)
    for campaign in ordered:
        pipe.hget(keys.campaign(campaign), MODEL_FIELD)
    pinned: dict[str, str] = {c: m for c, m in zip(ordered, pipe.execute(), strict=True) if m}
    unpinned = [campaign for campaign in ordered if campaign not in pinned]
    if unpinned and live:
        model = max(live, key=lambda name: (live[name], name))
        for campaign in unpinned:
            pipe.hsetnx(keys.campaign(campaign), MODEL_FIELD, model)
            pipe.hget(keys.campaign(campaign), MODEL_FIELD)
        replies = pipe.execute()
        pinned.update({campaign: str(replies[2 * index + 1]) for index, campaign in enumerate(unpinned)})
    return pinned


def kept_off(pinned: dict[str, str], views: Iterable[WorkerView]) -> dict[str, frozenset[str]]:
    """Per campaign, the identities of live workers that run another model than its own."""
    running = [(view.identity, view.report.model) for view in views]
    found = {
        campaign: frozenset(identity for identity, model in running if model != pinned_model)
        for campaign, pinned_model in pinned.items()
    }
    return {campaign: identities for campaign, identities in found.items() if identities}


def campaign_model(client: redis.Redis, campaign_id: str, mine: str) -> str:
    """The campaign's model, pinned to ``mine`` if it had none (a job that reached a worker first)."""
    pipe = client.pipeline(transaction=False)
    pipe.hsetnx(keys.campaign(campaign_id), MODEL_FIELD, mine)
    pipe.hget(keys.campaign(campaign_id), MODEL_FIELD)
    return str(pipe.execute()[1])
