"""Scheduled bulk product edits: a prompt (and brand references) applied to every new photo under
an S3 prefix, on a cron schedule."""

from __future__ import annotations

from typing import Annotated

from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kleinfarm.shared.jobs import MAX_PRIORITY, MAX_REFERENCES, check_output_prefix, check_reference_url, check_side
from kleinfarm.shared.locators import split_s3_url


def parse_cron(expression: str) -> crontab:
    """Five cron fields (minute hour day-of-month month day-of-week) as a Celery crontab."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"cron {expression!r} must have 5 fields: minute hour day-of-month month day-of-week")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return crontab(minute, hour, day_of_week, day_of_month, month_of_year)


class Schedule(BaseModel):
    """One schedule file."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    source: str  # s3://bucket/prefix/ of product photos
    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    references: Annotated[list[str], Field(max_length=MAX_REFERENCES - 1)] = []  # added after the photo
    output: str  # s3://bucket/prefix for the images
    width: int = 1024
    height: int = 1024
    cron: str
    priority: Annotated[int, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0

    @field_validator("source", "output")
    @classmethod
    def _s3_prefix(cls, value: str) -> str:
        if not value.startswith("s3://") or not split_s3_url(value)[0]:
            raise ValueError(f"{value!r} must be an s3://bucket/prefix")
        return value

    @field_validator("output")
    @classmethod
    def _output_prefix(cls, value: str) -> str:
        prefix = split_s3_url(value)[1].strip("/")
        if prefix:  # it becomes the start of every image's key
            check_output_prefix(prefix, field="output prefix")
        return value

    @field_validator("references")
    @classmethod
    def _references(cls, references: list[str]) -> list[str]:
        return [check_reference_url(url) for url in references]

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int, info: object) -> int:
        return check_side(value, getattr(info, "field_name", "side"))

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        parse_cron(value)
        return value
