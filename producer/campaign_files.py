"""The files producers hand the farm: campaigns as YAML (defaults plus a job list) or JSONL (one job
per line, for big campaigns), and schedule files (YAML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kleinfarm.shared.errors import CampaignFileError
from kleinfarm.shared.jobs import Campaign, describe_validation_error
from kleinfarm.shared.locators import has_scheme
from kleinfarm.shared.schedules import Schedule


def load_campaign(path: Path, name: str | None = None) -> Campaign:
    """Read a ``.yaml``/``.yml`` or ``.jsonl`` campaign; relative local references resolve beside it."""
    if not path.is_file():
        raise CampaignFileError(f"{path}: no such campaign file")
    if path.suffix in (".yaml", ".yml"):
        header, raw_jobs = _read_yaml(path)
    elif path.suffix in (".jsonl", ".ndjson"):
        header, raw_jobs = {}, _read_jsonl(path)
    else:
        raise CampaignFileError(f"{path}: a campaign file must end in .yaml, .yml or .jsonl")
    raw_jobs = [resolve_local_references(job, path.parent) for job in raw_jobs]
    header.setdefault("name", name or path.stem)
    header["defaults"] = resolve_local_references(header.get("defaults") or {}, path.parent)
    try:
        return Campaign.from_raw(header.pop("name"), raw_jobs, **header)
    except ValidationError as error:
        raise CampaignFileError(describe_validation_error(error, source=f"{path}: ")) from error


def _read_yaml(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CampaignFileError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("jobs"), list):
        raise CampaignFileError(f"{path}: a YAML campaign is a mapping with a 'jobs' list")
    jobs = document.pop("jobs")
    if not all(isinstance(job, dict) for job in jobs):
        raise CampaignFileError(f"{path}: every entry of 'jobs' must be a mapping")
    return document, jobs


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    jobs = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except json.JSONDecodeError as error:
                raise CampaignFileError(f"{path}:{number}: not valid JSON: {error.msg}") from error
            if not isinstance(job, dict):
                raise CampaignFileError(f"{path}:{number}: each line must be a JSON object (one job)")
            jobs.append(job)
    return jobs


def resolve_local_references(job: dict[str, Any], base: Path) -> dict[str, Any]:
    references = job.get("references")
    if not isinstance(references, list):
        return job
    resolved = [
        str((base / ref).resolve())
        if isinstance(ref, str) and not has_scheme(ref) and not Path(ref).is_absolute()
        else ref
        for ref in references
    ]
    return {**job, "references": resolved}


def load_schedule(path: Path) -> Schedule:
    """Read a schedule file; relative local references resolve beside it."""
    try:
        document = yaml.safe_load(path.read_text())
        if isinstance(document, dict):
            document = resolve_local_references(document, path.parent)
        return Schedule.model_validate(document)
    except (OSError, yaml.YAMLError) as error:
        raise CampaignFileError(f"{path}: {error}") from error
    except ValidationError as error:
        raise CampaignFileError(describe_validation_error(error, source=f"{path}: ")) from error
