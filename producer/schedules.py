"""Schedules in Redis (definitions, runs, what was edited) and in celery-redbeat (when they fire)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from kleinfarm.producer.client import CampaignHandle, FarmClient
from kleinfarm.shared import keys
from kleinfarm.shared.errors import ConfigError, JobSpecError
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.locators import parse_locator, split_s3_url
from kleinfarm.shared.schedules import Schedule, parse_cron
from kleinfarm.shared.states import JobState

SCHEDULE_TASK = "kleinfarm.schedule"


class ScheduleBook:
    """Add, list, remove and run schedules."""

    def __init__(self, client: FarmClient) -> None:
        self.client = client
        self.redis = client.state.redis

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
        """Submit a campaign for the photos not yet edited this way; None if there are none."""
        schedule = self.get(name)
        _refuse_local_references(schedule)
        done, in_flight = self._harvest(name)
        photos = self._photos(schedule)
        todo = {key: url for key, url in photos.items() if key not in done and key not in in_flight}
        summary: dict[str, Any] = {
            "at": time.time(),
            "photos": len(photos),
            "submitted": len(todo),
            "already_edited": len(photos.keys() & done),
            "in_flight": len(photos.keys() & in_flight),
        }
        handle = None
        if todo:
            jobs = [
                {"id": key, "prompt": schedule.prompt, "references": [url, *schedule.references]}
                for key, url in todo.items()
            ]
            campaign = Campaign.from_raw(
                f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                jobs,
                output_prefix=split_s3_url(schedule.output)[1].strip("/"),
                priority=schedule.priority,
                defaults={"width": schedule.width, "height": schedule.height},
            )
            handle = self.client.submit(campaign)
            self.redis.rpush(keys.schedule_campaigns(name), handle.id)
            summary["campaign"] = handle.id
        self.redis.rpush(keys.schedule_runs(name), json.dumps(summary))
        return handle

    def _harvest(self, name: str) -> tuple[set[str], set[str]]:
        """Edit keys done (succeeded) and in flight, from this schedule's campaigns."""
        done_key = keys.schedule_done(name)
        in_flight: set[str] = set()
        for campaign_id in self.redis.lrange(keys.schedule_campaigns(name), 0, -1):  # type: ignore[union-attr]
            for record in self.client.state.jobs(str(campaign_id)):
                if record.state == JobState.SUCCEEDED:
                    self.redis.sadd(done_key, record.local_id)
                elif not record.state.terminal:
                    in_flight.add(record.local_id)
        return set(self.redis.smembers(done_key)), in_flight  # type: ignore[arg-type]

    def _photos(self, schedule: Schedule) -> dict[str, str]:
        """Edit key -> photo URL: the key hashes the photo's content with the edit's settings."""
        bucket, prefix = split_s3_url(schedule.source)
        settings = json.dumps(
            [schedule.prompt, schedule.references, self.client.settings.model, schedule.width, schedule.height]
        )
        photos: dict[str, str] = {}
        paginator = self.client.storage.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                content = self._content_id(bucket, item)
                key = hashlib.sha256(f"{content}|{settings}".encode()).hexdigest()[:32]
                photos[key] = f"s3://{bucket}/{item['Key']}"
        return photos

    def _content_id(self, bucket: str, item: dict[str, Any]) -> str:
        """A single-part upload's ETag is the MD5 of its bytes; otherwise hash the bytes ourselves."""
        etag = str(item.get("ETag", "")).strip('"')
        if etag and "-" not in etag:
            return f"md5:{etag}"
        return "sha256:" + hashlib.sha256(self.client.storage.get(item["Key"], bucket=bucket)).hexdigest()


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

    app = make_celery(client.settings)
    app.conf.update(
        redbeat_redis_url=client.settings.redis_url,
        redbeat_key_prefix=keys.REDBEAT_PREFIX,
        beat_scheduler="redbeat.RedBeatScheduler",
        beat_max_loop_interval=10,
        task_default_queue=keys.CONTROL_QUEUE,
    )
    if tls := redis_tls(client.settings.redis_url):
        app.conf.redbeat_redis_use_ssl = tls
    return app
