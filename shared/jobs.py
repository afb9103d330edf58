"""Job and campaign schemas: the contract between producers and workers (pydantic v2)."""

from __future__ import annotations

import re
import secrets
import unicodedata
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kleinfarm.shared.locators import parse_locator

MIN_OUTPUT_SIDE = 256
MAX_OUTPUT_SIDE = 2048
SIDE_MULTIPLE = 16
MAX_REFERENCES = 4
# diffusers' Flux2ImageProcessor.check_image_input refuses smaller references.
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8
MAX_SEED = 2**32 - 1
# Stored image formats; JPEG and WebP take a quality, this one when the job names none.
OutputFormat = Literal["png", "jpeg", "webp"]
DEFAULT_QUALITY = 90
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Object keys stay inside the prefix and under S3's 1,024 bytes whatever the campaign says:
# <prefix (256)>/<campaign id (49)>/<job id (128)>.png is at most 439 bytes.
MAX_PREFIX_CHARS = 256
PREFIX_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
OUTPUT_PREFIX_PATTERN = rf"^{PREFIX_SEGMENT}(/{PREFIX_SEGMENT})*$"
# Priority orders the queue; the bound keeps the queue score (priority x 1e12 + sequence) exact.
MAX_PRIORITY = 1000
MAX_NAME_CHARS = 200
# Jobs per campaign: a producer holds a campaign's jobs while it validates and writes them, so a
# bigger batch is split into several campaigns (about 1 KB each: 100,000 jobs is ~100 MB).
MAX_JOBS_PER_CAMPAIGN = 100_000


def check_job_count(count: int) -> None:
    """Refuse more jobs than one campaign may hold, naming the limit."""
    if count > MAX_JOBS_PER_CAMPAIGN:
        raise ValueError(
            f"{count} jobs, over the limit of {MAX_JOBS_PER_CAMPAIGN} per campaign (MAX_JOBS_PER_CAMPAIGN): "
            "split them into several campaigns"
        )


def check_output_prefix(prefix: str, field: str = "output_prefix") -> str:
    """A key prefix of safe segments (letters, digits, ``._-``, none starting with a dot)."""
    if len(prefix) > MAX_PREFIX_CHARS:
        raise ValueError(f"{field} is {len(prefix)} characters: the limit is {MAX_PREFIX_CHARS}")
    if not re.fullmatch(OUTPUT_PREFIX_PATTERN, prefix):
        raise ValueError(
            f"{field}={prefix!r} must be segments of letters, digits, '.', '_' or '-' separated by '/', "
            "each starting with a letter or digit (no '..', no leading or trailing '/')"
        )
    return prefix


def check_display_name(name: str, field: str = "name") -> str:
    """A name people read in a terminal or a report: printable, no control or bidi characters."""
    unsafe = [char for char in name if not char.isprintable() or unicodedata.category(char) == "Cf"]
    if unsafe:
        raise ValueError(f"{field} holds a control or formatting character ({unsafe[0]!a})")
    return name


def check_side(value: int, field: str) -> int:
    """Return ``value`` if it is a valid output side, else raise ``ValueError`` naming the limit."""
    if not MIN_OUTPUT_SIDE <= value <= MAX_OUTPUT_SIDE:
        raise ValueError(f"{field}={value} is out of range: it must be between {MIN_OUTPUT_SIDE} and {MAX_OUTPUT_SIDE}")
    if value % SIDE_MULTIPLE:
        raise ValueError(f"{field}={value} is not a multiple of {SIDE_MULTIPLE}")
    return value


def check_reference_url(url: str) -> str:
    """Accept ``s3://bucket/key``, ``https://...`` or a local path; refuse any other scheme."""
    return parse_locator(url).text


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=JOB_ID_PATTERN)] | None = None
    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    width: int = 1024
    height: int = 1024
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    steps: Annotated[int, Field(ge=1, le=50)] = 4
    # The stored image: PNG (lossless, the default), or JPEG / WebP at ``quality`` (1-100).
    format: OutputFormat = "png"
    quality: Annotated[int, Field(ge=1, le=100)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt

    @model_validator(mode="after")
    def _quality_for_lossy_only(self) -> Self:
        if self.quality is not None and self.format == "png":
            raise ValueError(f"quality={self.quality} applies to format jpeg or webp; PNG is lossless")
        return self

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int, info: Any) -> int:
        return check_side(value, info.field_name)

    def with_seed(self) -> Self:
        """Return this job with a seed drawn now if it had none, so its image can be reproduced."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})


class GenerateJob(_JobBase):
    """Text to image."""

    kind: Literal["generate"] = "generate"


class EditJob(_JobBase):
    """An edit conditioned on 1 to 4 ordered reference images."""

    kind: Literal["edit"] = "edit"
    references: Annotated[list[str], Field(min_length=1, max_length=MAX_REFERENCES)]

    @field_validator("references")
    @classmethod
    def _references(cls, references: list[str]) -> list[str]:
        return [check_reference_url(url) for url in references]


Job = Annotated[GenerateJob | EditJob, Field(discriminator="kind")]


class JobDefaults(BaseModel):
    """Values a campaign applies to every job that does not set them."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    references: list[str] | None = None


class Campaign(BaseModel):
    """A named batch of jobs, submitted and tracked as one."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    output_prefix: str | None = None
    priority: Annotated[int, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    error_limit: Annotated[int, Field(ge=0)] | None = None  # failed jobs allowed before the campaign fails
    jobs: Annotated[list[Job], Field(min_length=1)]

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_display_name(name)

    @field_validator("jobs", mode="before")
    @classmethod
    def _job_cap(cls, jobs: Any) -> Any:
        # Before the jobs are validated: a list over the cap is refused without validating each.
        if isinstance(jobs, list):
            check_job_count(len(jobs))
        return jobs

    @field_validator("output_prefix")
    @classmethod
    def _prefix(cls, prefix: str | None) -> str | None:
        return None if prefix is None else check_output_prefix(prefix)

    @classmethod
    def from_raw(cls, name: str, raw_jobs: list[dict[str, Any]], **fields: Any) -> Campaign:
        """Build a campaign from plain job dicts, applying ``fields['defaults']`` first."""
        defaults = JobDefaults.model_validate(fields.pop("defaults", None) or {})
        jobs = [job_with_defaults(raw, defaults) for raw in raw_jobs]
        return cls.model_validate({"name": name, "jobs": jobs, **fields})


def job_with_defaults(raw: dict[str, Any], defaults: JobDefaults) -> dict[str, Any]:
    """Merge ``defaults`` under ``raw`` and infer ``kind`` from the presence of references."""
    merged = {**defaults.model_dump(exclude_none=True), **raw}
    if raw.get("kind") == "generate" and "references" not in raw:
        merged.pop("references", None)
    merged.setdefault("kind", "edit" if merged.get("references") else "generate")
    return merged


def describe_validation_error(error: ValidationError, source: str = "") -> str:
    """One line per problem, each naming the field path (``jobs[3].width``) and the limit."""
    lines = []
    for item in error.errors():
        path = _field_path(item["loc"])
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        message = message.removeprefix("Value error, ")
        lines.append(f"{source}{path}: {message}" if path else f"{source}{message}")
    return "\n".join(lines)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if part in ("generate", "edit"):
            continue  # the union's tag, not a field the user wrote
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
