"""The Python client: submit campaigns, follow them, fetch their results, cancel them."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from kleinfarm.producer.uploads import ReferenceUploader, campaign_references, local_references
from kleinfarm.shared import keys
from kleinfarm.shared.control import CampaignControl
from kleinfarm.shared.costmodel import CostModel
from kleinfarm.shared.errors import FarmTimeoutError, JobSpecError
from kleinfarm.shared.jobs import Campaign, EditJob, GenerateJob, describe_validation_error
from kleinfarm.shared.klein import REFERENCE_MAX_SIDE
from kleinfarm.shared.locators import parse_locator
from kleinfarm.shared.manifest import write_manifest
from kleinfarm.shared.records import CampaignStatus, RoutingInfo
from kleinfarm.shared.redis_urls import connect
from kleinfarm.shared.refset import route_key
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.state import FarmState, NewJob
from kleinfarm.shared.storage import Storage

COSTS = CostModel()
# How long the finisher of a campaign's last job gets to write the manifest before a client does.
MANIFEST_GRACE_S = 10.0
RECONNECT_WAIT_S = 1.0  # between tries to listen again while Redis is restarting or failing over


def revalidate(campaign: Campaign) -> Campaign:
    try:
        return Campaign.model_validate(campaign.model_dump())
    except ValidationError as error:
        raise JobSpecError(describe_validation_error(error)) from error


def new_campaign_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "campaign"
    return f"{slug}-{secrets.token_hex(4)}"


def prepare_jobs(campaign: Campaign, uploaded: Mapping[str, str] | None = None) -> list[NewJob]:
    """Give every job an id and a seed, refuse duplicate ids, and name the ``s3://`` locator the
    client uploaded each local reference to (``uploaded``: local path -> locator)."""
    width = len(str(len(campaign.jobs)))
    seen: set[str] = set()
    prepared = []
    for index, job in enumerate(campaign.jobs):
        local_id = job.id or f"job-{index:0{width}d}"
        if local_id in seen:
            raise JobSpecError(f"jobs[{index}].id: duplicate id {local_id!r}")
        seen.add(local_id)
        if isinstance(job, EditJob):
            job = with_uploaded_references(job, index, uploaded or {})
        seeded = job.with_seed()
        spec = seeded.model_dump(mode="json", exclude={"id"})
        routing = routing_info(seeded, campaign.priority)
        shown = {"kind": seeded.kind, "seed": str(seeded.seed), "width": str(job.width), "height": str(job.height)}
        if routing.route:
            shown["route"] = routing.route
        prepared.append(NewJob(local_id=local_id, spec=spec, routing=routing, fields=shown))
    return prepared


def routing_info(job: GenerateJob | EditJob, priority: int = 0, costs: CostModel = COSTS) -> RoutingInfo:
    """Routing key and cost estimates; references are assumed at the 1024 px they are capped to."""
    work = costs.cached_render_s(job.width, job.height)
    if not isinstance(job, EditJob):
        return RoutingInfo(None, work, 0.0, priority, job.width, job.height)
    refs = len(job.references)
    build = costs.build_s(refs, REFERENCE_MAX_SIDE)
    return RoutingInfo(route_key(job.references), work, build, priority, job.width, job.height, refs)


def with_uploaded_references(job: EditJob, index: int, uploaded: Mapping[str, str]) -> EditJob:
    """``job`` naming its uploaded copies in place of local paths: no local path reaches Redis (the
    routing key, from these locators, is then the same for the same content)."""
    references = []
    for position, reference in enumerate(job.references):
        if parse_locator(reference).is_local:
            if reference not in uploaded:
                raise JobSpecError(
                    f"jobs[{index}].references[{position}]: {reference} is a local path the client did not upload"
                )
            reference = uploaded[reference]
        references.append(reference)
    return job if references == job.references else job.model_copy(update={"references": references})


@dataclass
class CampaignHandle:
    """A submitted campaign: ask for its status, wait for it, read its results, cancel it."""

    client: FarmClient
    id: str

    def status(self) -> CampaignStatus:
        return self.client.state.status(self.id)

    def wait(self, progress: bool = True, timeout: float | None = None) -> CampaignStatus:
        """Block until every job has ended, woken by the campaign's own state changes."""
        from kleinfarm.producer.progress import CampaignProgress

        deadline = None if timeout is None else time.monotonic() + timeout
        with CampaignProgress(self.id, enabled=progress) as bar:
            while True:
                try:
                    return self._wait_listening(bar, deadline, timeout)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                    # A Redis restart or a Sentinel failover: listen again once it answers.
                    if deadline is not None and time.monotonic() > deadline:
                        raise FarmTimeoutError(f"campaign {self.id}: Redis unreachable ({error})") from error
                    time.sleep(RECONNECT_WAIT_S)

    def _wait_listening(self, bar: Any, deadline: float | None, timeout: float | None) -> CampaignStatus:
        pubsub = self.client.state.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(keys.campaign_events(self.id))
        try:
            while True:
                status = self.status()
                bar.update(status)
                if status.done:
                    return status
                if status.finished:
                    self._finalize_if_orphaned(status)
                if deadline is not None and time.monotonic() > deadline:
                    raise FarmTimeoutError(f"campaign {self.id} not done after {timeout} s: {status.as_dict()}")
                # Any transition of this campaign publishes; the timeout only refreshes the bar.
                pubsub.get_message(timeout=1.0)
                while pubsub.get_message(timeout=0):
                    pass
        finally:
            pubsub.close()

    def _finalize_if_orphaned(self, status: CampaignStatus) -> None:
        """Write the manifest if the process that ended the last job died before writing it."""
        ended = self.client.state.last_transition_age(self.id)
        if ended is not None and ended > MANIFEST_GRACE_S:
            write_manifest(self.client.state, self.client.storage, self.id)

    def results(self) -> list[dict[str, Any]]:
        """One row per job: job_id, state, key, error, seed, width, height."""
        return [record.result_row() for record in self.client.state.jobs(self.id)]

    def cancel(self) -> int:
        """Drop the queued jobs, stop the running ones at their next step; return jobs dropped."""
        dropped = self.client.state.request_cancel(self.id)
        if self.status().finished:
            write_manifest(self.client.state, self.client.storage, self.id)
        return dropped

    def pause(self) -> int:
        """Set the queued jobs aside (running ones finish); return how many."""
        return CampaignControl(self.client.state).pause(self.id)

    def resume(self) -> int:
        return CampaignControl(self.client.state).resume(self.id)

    def retry_failed(self) -> int:
        """Requeue the failed jobs only; return how many."""
        return CampaignControl(self.client.state).retry_failed(self.id)

    def download(self, folder: Path) -> list[Path]:
        """Copy every finished image into ``folder``; return the files written."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for row in self.results():
            if row["state"] == "succeeded" and row["key"]:
                target = folder / f"{row['job_id']}{Path(str(row['key'])).suffix}"  # .png, .jpg or .webp
                target.write_bytes(self.client.storage.get(row["key"]))
                written.append(target)
        return written


class FarmClient:
    """Talks to the farm's Redis (and S3 for results); needs neither Celery workers nor torch."""

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings
        self.state = FarmState(connect(settings))
        self._storage: Storage | None = None

    @classmethod
    def from_env(cls, env_file: Path | None = None) -> FarmClient:
        return cls(FarmSettings.from_env(env_file))

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage.from_settings(self.settings)
        return self._storage

    def submit(self, campaign: Campaign, progress: bool = False) -> CampaignHandle:
        """Upload the local files ``campaign`` names, queue every job (pipelined), return its handle.

        ``progress``: a bar on stderr while more than a handful of files upload. The campaign is
        validated again: a caller may have changed a field since it was built (pydantic does not
        check assignments), and the limits guard the farm's keys.
        """
        campaign = revalidate(campaign)
        uploaded = self.upload_references(campaign_references(campaign), progress)
        jobs = prepare_jobs(campaign, uploaded)
        campaign_id = new_campaign_id(campaign.name)
        meta = {"name": campaign.name, "output_prefix": campaign.output_prefix or self.settings.output_prefix}
        if campaign.error_limit is not None:
            meta["error_limit"] = str(campaign.error_limit)
        self.state.create_campaign(campaign_id, meta, campaign.priority, jobs)
        return CampaignHandle(self, campaign_id)

    def upload_references(self, named: Iterable[tuple[str, str]], progress: bool = False) -> dict[str, str]:
        """Upload the local files among ``(field, reference)`` pairs; return local path -> ``s3://``."""
        local = local_references(named)
        if not local:
            return {}  # a campaign of s3:// and https:// references needs no storage client here
        settings = self.settings
        uploader = ReferenceUploader(
            self.storage,
            settings.reference_upload_prefix,
            settings.reference_max_bytes,
            settings.reference_max_pixels,
            progress,
        )
        return uploader.upload(local)

    def campaign(self, campaign_id: str) -> CampaignHandle:
        self.state.campaign_meta(campaign_id)
        return CampaignHandle(self, campaign_id)
