"""Schedules in Redis (definitions, runs, what was edited) and in celery-redbeat (when they fire)."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from kleinfarm.producer.client import CampaignHandle, FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.errors import ConfigError, JobSpecError, ReferenceNotFoundError
from kleinfarm.shared.jobs import MAX_JOBS_PER_CAMPAIGN, Campaign
from kleinfarm.shared.locators import parse_locator, split_s3_url
from kleinfarm.shared.schedules import Schedule, parse_cron
from kleinfarm.shared.states import JobState
from kleinfarm.shared.storage import ListedObject

SCHEDULE_TASK = "kleinfarm.schedule"
# Photos one run submits at most (one campaign, well under MAX_JOBS_PER_CAMPAIGN); the rest wait
# for the next run, and the run's summary says how many were left.
MAX_PHOTOS_PER_RUN = 10_000
# Edit keys checked against the schedule's done set in one round trip.
DONE_CHECK_BATCH = 500
# A multipart photo is hashed from its bytes, read this much at a time (never held whole).
HASH_CHUNK_BYTES = 1024 * 1024


class ScheduleBook:
    """Add, list, remove and run schedules."""

    def __init__(self, client: FarmClient, max_photos: int = MAX_PHOTOS_PER_RUN) -> None:
        self.client = client
        self.redis = client.state.redis
        self.max_photos = min(max_photos, MAX_JOBS_PER_CAMPAIGN)  # one run is one campaign
        self.max_bytes = client.settings.reference_max_bytes

    def add(self, schedule: Schedule) -> None:
        from redbeat import RedBeatSchedulerEntry

        bucket, _ = split_s3_url(schedule.output)
        if bucket != self.client.settings.s3_bucket:
            raise JobSpecError(
                f"output {schedule.output}: images go to the farm's bucket {self.client.settings.s3_bucket!r}"
            )
        schedule = self._with_uploaded_references(schedule)
        self.redis.hset(keys.SCHEDULES, schedule.name, schedule.model_dump_json())
        entry = RedBeatSchedulerEntry(
            f"kleinfarm-{schedule.name}",
            SCHEDULE_TASK,
            parse_cron(schedule.cron),
            args=[schedule.name],
            app=beat_app(self.client),
        )
        entry.save()

    def _with_uploaded_references(self, schedule: Schedule) -> Schedule:
        """Upload the schedule's local references now: its runs come later, from beat, perhaps on
        another machine, and no job may carry a local path."""
        named = ((f"references[{position}]", ref) for position, ref in enumerate(schedule.references))
        uploaded = self.client.upload_references(named)
        return schedule.model_copy(update={"references": [uploaded.get(ref, ref) for ref in schedule.references]})

    def schedules(self) -> list[Schedule]:
        stored: dict[str, str] = self.redis.hgetall(keys.SCHEDULES)  # type: ignore[assignment]
        return [Schedule.model_validate_json(text) for _, text in sorted(stored.items())]

    def get(self, name: str) -> Schedule:
        text = self.redis.hget(keys.SCHEDULES, name)
        if not text:
            raise ConfigError(f"no schedule named {name!r}")
        return Schedule.model_validate_json(str(text))

    def remove(self, name: str) -> None:
        from redbeat import RedBeatSchedulerEntry

        schedule = self.get(name)
        self.redis.hdel(keys.SCHEDULES, name)
        app = beat_app(self.client)
        RedBeatSchedulerEntry(f"kleinfarm-{name}", SCHEDULE_TASK, parse_cron(schedule.cron), app=app).delete()

    def runs(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.redis.lrange(keys.schedule_runs(name), 0, -1)]  # type: ignore[union-attr]

    def run(self, name: str) -> CampaignHandle | None:
        """Submit a campaign for the photos not yet edited this way (at most ``max_photos``; the
        rest wait for the next run); None if there are none."""
        schedule = self.get(name)
        _refuse_local_references(schedule)
        in_flight = self._harvest(name)
        scan = self._scan(schedule, in_flight)
        summary: dict[str, Any] = {"at": time.time(), **scan.summary()}
        handle = None
        if scan.todo:
            handle = self.client.submit(_campaign(name, schedule, scan.todo))
            self.redis.rpush(keys.schedule_campaigns(name), handle.id)
            summary["campaign"] = handle.id
        self.redis.rpush(keys.schedule_runs(name), json.dumps(summary))
        return handle

    def _harvest(self, name: str) -> set[str]:
        """Record the edits this schedule's campaigns finished in its done set; return the edit
        keys still in flight."""
        done_key = keys.schedule_done(name)
        in_flight: set[str] = set()
        for campaign_id in self.redis.lrange(keys.schedule_campaigns(name), 0, -1):  # type: ignore[union-attr]
            succeeded = []
            for record in self.client.state.jobs(str(campaign_id)):
                if record.state == JobState.SUCCEEDED:
                    succeeded.append(record.local_id)
                elif not record.state.terminal:
                    in_flight.add(record.local_id)
            if succeeded:
                self.redis.sadd(done_key, *succeeded)
        return in_flight

    def _scan(self, schedule: Schedule, in_flight: set[str]) -> PhotoScan:
        """Examine the photos under the source, listing page by page, until ``max_photos`` are new;
        the ones listed after that are only counted (no content read, no edit key)."""
        bucket, prefix = split_s3_url(schedule.source)
        scan = PhotoScan()
        listed = self.client.storage.list_objects(prefix, bucket=bucket)
        while (room := self.max_photos - len(scan.todo)) > 0:
            # No more at once than there is room for: a batch cannot overshoot the cap, so no photo
            # past it is hashed.
            batch = list(islice(listed, min(DONE_CHECK_BATCH, room)))
            if not batch:
                break
            self._examine(schedule, bucket, batch, in_flight, scan)
        scan.left_for_next_run = sum(1 for _ in listed)
        return scan

    def _examine(
        self, schedule: Schedule, bucket: str, batch: list[ListedObject], in_flight: set[str], scan: PhotoScan
    ) -> None:
        """Sort a batch of listed photos into done, in flight and to do (one round trip to Redis)."""
        settings = self._edit_settings(schedule)
        keyed: list[tuple[str, str]] = []
        for item in batch:
            try:
                content = self._content_id(bucket, item)
            except ReferenceNotFoundError:
                continue  # deleted since it was listed: not a photo any more
            if content is None:
                scan.too_large += 1
                continue
            edit_key = hashlib.sha256(f"{content}|{settings}".encode()).hexdigest()[:32]
            keyed.append((edit_key, f"s3://{bucket}/{item.key}"))
        if not keyed:
            return
        done_key = keys.schedule_done(schedule.name)
        done: list[Any] = self.redis.smismember(done_key, [key for key, _ in keyed])  # type: ignore[assignment]
        for (edit_key, url), is_done in zip(keyed, done, strict=True):
            scan.photos += 1
            if is_done:
                scan.already_edited += 1
            elif edit_key in in_flight:
                scan.in_flight += 1
            else:
                scan.todo.setdefault(edit_key, url)  # two copies of one photo are one edit

    def _edit_settings(self, schedule: Schedule) -> str:
        """What, beside the photo's content, makes an edit: a change to any of it edits again."""
        return json.dumps(
            [schedule.prompt, schedule.references, self.client.settings.model, schedule.width, schedule.height]
        )

    def _content_id(self, bucket: str, item: ListedObject) -> str | None:
        """A single-part upload's ETag is the MD5 of its bytes; otherwise hash the bytes ourselves,
        streamed. None for a photo over the reference byte limit: the worker would refuse it, so it
        is neither downloaded nor hashed."""
        if item.size > self.max_bytes:
            return None
        if item.etag and "-" not in item.etag:
            return f"md5:{item.etag}"
        digest = hashlib.sha256()
        read = 0
        with closing(self.client.storage.read_chunks(item.key, bucket=bucket, chunk_bytes=HASH_CHUNK_BYTES)) as chunks:
            for chunk in chunks:
                read += len(chunk)
                if read > self.max_bytes:
                    return None  # it grew since it was listed
                digest.update(chunk)
        return "sha256:" + digest.hexdigest()


@dataclass
class PhotoScan:
    """What one run found under a schedule's source."""

    todo: dict[str, str] = field(default_factory=dict)  # edit key -> photo URL, at most the cap
    photos: int = 0  # examined: listed before the cap was reached and within the byte limit
    already_edited: int = 0
    in_flight: int = 0
    too_large: int = 0  # over KLEINFARM_REFERENCE_MAX_BYTES: skipped, not hashed
    left_for_next_run: int = 0  # listed after the cap was reached: not examined this run

    def summary(self) -> dict[str, int]:
        return {
            "photos": self.photos,
            "submitted": len(self.todo),
            "already_edited": self.already_edited,
            "in_flight": self.in_flight,
            "too_large": self.too_large,
            "left_for_next_run": self.left_for_next_run,
        }


def _campaign(name: str, schedule: Schedule, todo: dict[str, str]) -> Campaign:
    """One edit job per new photo (the job id is its edit key), in the schedule's output prefix."""
    jobs = [
        {"id": key, "prompt": schedule.prompt, "references": [url, *schedule.references]} for key, url in todo.items()
    ]
    return Campaign.from_raw(
        f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        jobs,
        output_prefix=split_s3_url(schedule.output)[1].strip("/") or None,  # none: the farm's prefix
        priority=schedule.priority,
        defaults={"width": schedule.width, "height": schedule.height},
    )


def _refuse_local_references(schedule: Schedule) -> None:
    """A schedule stored before ``add`` uploaded local files may still name one; beat reads none."""
    for position, reference in enumerate(schedule.references):
        if parse_locator(reference).is_local:
            raise JobSpecError(
                f"schedule {schedule.name}: references[{position}]: {reference} is a local path; "
                "add the schedule again (`kleinfarm schedule add` uploads local files)"
            )


def beat_app(client: FarmClient) -> Any:
    """The Celery app beat and the schedule task run on, with redbeat keeping the schedule in Redis."""
    from kleinfarm.shared.broker import make_celery, redis_tls
    from kleinfarm.shared.redis_urls import redbeat_settings

    app = make_celery(client.settings)
    app.conf.update(
        **redbeat_settings(client.settings),
        redbeat_key_prefix=keys.REDBEAT_PREFIX,
        beat_scheduler="redbeat.RedBeatScheduler",
        beat_max_loop_interval=10,
        task_default_queue=keys.CONTROL_QUEUE,
    )
    if tls := redis_tls(client.settings.redis_url):
        app.conf.redbeat_redis_use_ssl = tls
    return app
