"""The files producers hand the farm: campaigns as YAML (defaults plus a job list) or JSONL (one job
per line, for big campaigns), and schedule files (YAML).

Whatever a file holds, reading it ends in a campaign or a ``CampaignFileError`` of one line naming
the file (and the line, for JSONL) and the problem: bad encoding, nesting too deep for the parsers'
recursion, keys that are not strings or not known, too many jobs, or a schema error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from pydantic import ValidationError

from kleinfarm.shared.errors import CampaignFileError
from kleinfarm.shared.jobs import MAX_JOBS_PER_CAMPAIGN, Campaign, check_job_count, describe_validation_error
from kleinfarm.shared.locators import has_scheme
from kleinfarm.shared.schedules import Schedule

# What a YAML campaign may hold beside ``jobs`` (the keyword arguments of ``Campaign.from_raw``).
HEADER_KEYS = ("name", "output_prefix", "priority", "error_limit", "defaults")
# Far deeper than any campaign (a job's reference sits at depth 4), far shallower than the parsers'
# recursion limit: 5,000 nested brackets would otherwise end in a RecursionError.
MAX_NESTING = 32
# A YAML file is parsed whole (PyYAML, pure Python, about 1 MB/s); bigger campaigns belong in
# JSONL, which is read a line at a time.
MAX_YAML_BYTES = 16 * 1024 * 1024
# One JSONL line is one job: a 4,000-character prompt and four references fit many times over.
MAX_JSONL_LINE_BYTES = 256 * 1024


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
    document = _parse_yaml(path)
    if not isinstance(document, dict) or not isinstance(document.get("jobs"), list):
        raise CampaignFileError(f"{path}: a YAML campaign is a mapping with a 'jobs' list")
    unknown = [key for key in document if key not in (*HEADER_KEYS, "jobs")]
    if unknown:
        allowed = ", ".join((*HEADER_KEYS, "jobs"))
        raise CampaignFileError(f"{path}: unknown top-level key {unknown[0]!r} (a campaign has {allowed})")
    jobs = document.pop("jobs")
    _check_count(path, len(jobs))
    if not all(isinstance(job, dict) for job in jobs):
        raise CampaignFileError(f"{path}: every entry of 'jobs' must be a mapping")
    if not isinstance(document.get("defaults") or {}, dict):
        raise CampaignFileError(f"{path}: 'defaults' must be a mapping")
    return document, jobs


def _parse_yaml(path: Path) -> Any:
    """The YAML document, its keys all strings and its nesting at most ``MAX_NESTING`` deep."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise CampaignFileError(
            f"{path}: {size} bytes, over the limit of {MAX_YAML_BYTES} for a YAML file: "
            "write big campaigns as JSONL (one job per line)"
        )
    text = _decode(path, _read_bytes(path))
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CampaignFileError(f"{path}: not valid YAML: {_yaml_problem(error)}") from error
    except RecursionError as error:
        raise CampaignFileError(f"{path}: nested deeper than {MAX_NESTING} levels") from error
    _check_structure(document, str(path))
    return document


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CampaignFileError(f"{path}: cannot read it: {error.strerror}") from error


def _decode(where: Path | str, data: bytes) -> str:
    """UTF-8 (with or without a byte-order mark), or a one-line error naming the offending byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        byte = data[error.start]
        raise CampaignFileError(f"{where}: not UTF-8 text: byte {byte:#04x} at offset {error.start}") from error


def _check_structure(document: Any, where: str) -> None:
    """Every mapping key a string and no container deeper than ``MAX_NESTING``.

    Iterative, and each container is visited once: YAML aliases may share one list many times over
    (the "billion laughs"), which a recursive walk would expand.
    """
    stack: list[tuple[Any, int, str]] = [(document, 0, "")]
    seen: set[int] = set()
    while stack:
        node, depth, at = stack.pop()
        if not isinstance(node, dict | list) or id(node) in seen:
            continue
        seen.add(id(node))
        if depth >= MAX_NESTING:
            raise CampaignFileError(f"{where}: {at or 'the document'} is nested deeper than {MAX_NESTING} levels")
        if isinstance(node, list):
            stack.extend((item, depth + 1, f"{at}[{index}]") for index, item in enumerate(node))
            continue
        for key, value in node.items():
            if not isinstance(key, str):
                place = f"{at}: " if at else ""
                raise CampaignFileError(f"{where}: {place}key {key!r} is not a string (put it in quotes)")
            stack.append((value, depth + 1, f"{at}.{key}" if at else key))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The jobs, one per line, read a line at a time (the file is never held whole)."""
    jobs: list[dict[str, Any]] = []
    try:
        with path.open("rb") as lines:
            for number, line in _bounded_lines(path, lines):
                if not line.strip():
                    continue
                if len(jobs) == MAX_JOBS_PER_CAMPAIGN:
                    raise CampaignFileError(
                        f"{path}:{number}: more than {MAX_JOBS_PER_CAMPAIGN} jobs, the limit per campaign "
                        "(MAX_JOBS_PER_CAMPAIGN): split them into several campaigns"
                    )
                jobs.append(_parse_job_line(f"{path}:{number}", line))
    except OSError as error:
        raise CampaignFileError(f"{path}: cannot read it: {error.strerror}") from error
    return jobs


def _bounded_lines(path: Path, stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Numbered lines, each at most ``MAX_JSONL_LINE_BYTES`` (a file without line breaks is not
    read whole into one line)."""
    number = 0
    while line := stream.readline(MAX_JSONL_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_JSONL_LINE_BYTES:
            raise CampaignFileError(f"{path}:{number}: longer than {MAX_JSONL_LINE_BYTES} bytes: one line is one job")
        yield number, line


def _parse_job_line(where: str, line: bytes) -> dict[str, Any]:
    text = _decode(where, line)
    try:
        job = json.loads(text)
    except json.JSONDecodeError as error:
        raise CampaignFileError(f"{where}: not valid JSON: {error.msg}") from error
    except RecursionError as error:
        raise CampaignFileError(f"{where}: nested deeper than {MAX_NESTING} levels") from error
    if not isinstance(job, dict):
        raise CampaignFileError(f"{where}: each line must be a JSON object (one job)")
    _check_structure(job, where)
    return job


def _check_count(path: Path, count: int) -> None:
    try:
        check_job_count(count)
    except ValueError as error:
        raise CampaignFileError(f"{path}: {error}") from error


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where, on one line (its own text spans several, with a caret)."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return " ".join(str(error).split())
    mark = error.problem_mark
    text = f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    if error.context and error.context_mark is not None:
        context = error.context_mark
        text += f" ({error.context} from line {context.line + 1}, column {context.column + 1})"
    return text


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
    if not path.is_file():
        raise CampaignFileError(f"{path}: no such schedule file")
    document = _parse_yaml(path)
    if isinstance(document, dict):
        document = resolve_local_references(document, path.parent)
    try:
        return Schedule.model_validate(document)
    except ValidationError as error:
        raise CampaignFileError(describe_validation_error(error, source=f"{path}: ")) from error
