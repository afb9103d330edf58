"""Local reference files, uploaded by the client when it submits: workers open no path a job names
(``worker/references.py`` refuses them), so every job reaches the farm naming S3 or HTTPS only.

Each distinct file is checked (a regular file within ``KLEINFARM_REFERENCE_MAX_BYTES``), read once
and stored in the farm's bucket under its content, ``<prefix>/<sha256><ext>``: a photo named by 500
jobs, or by the next campaign, is one object, and its locator (hence the jobs' routing key) is the
same every time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kleinfarm.shared.errors import JobSpecError
from kleinfarm.shared.jobs import Campaign, EditJob
from kleinfarm.shared.local_files import LocalFileError, check_image_bytes, check_local_file, read_local_file
from kleinfarm.shared.locators import parse_locator
from kleinfarm.shared.storage import Storage

# Fewer files than this upload before a progress bar would be worth drawing.
PROGRESS_OVER = 5
T = TypeVar("T")


def campaign_references(campaign: Campaign) -> Iterator[tuple[str, str]]:
    """``(field, reference)`` for every reference of every edit job, e.g. ``jobs[3].references[0]``."""
    for index, job in enumerate(campaign.jobs):
        if isinstance(job, EditJob):
            for position, reference in enumerate(job.references):
                yield f"jobs[{index}].references[{position}]", reference


def local_references(named: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each distinct local path among ``(field, reference)`` pairs -> the first field naming it."""
    first: dict[str, str] = {}
    for field, reference in named:
        if parse_locator(reference).is_local:
            first.setdefault(reference, field)
    return first


def image_type(data: bytes) -> tuple[str, str]:
    """The extension and content type of the image formats workers accept; none for anything else
    (the worker refuses it with its own message)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png", "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg", "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp", "image/webp"
    return "", "application/octet-stream"


def content_key(prefix: str, data: bytes) -> str:
    """Where ``data`` is stored: ``<prefix>/<sha256 of the bytes><ext>``."""
    name = hashlib.sha256(data).hexdigest() + image_type(data)[0]
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


class ReferenceUploader:
    """Uploads local reference files into the farm's bucket, each content once."""

    def __init__(self, storage: Storage, prefix: str, max_bytes: int, max_pixels: int, progress: bool = False) -> None:
        self.storage = storage
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.progress = progress
        self._stored: set[str] = set()  # keys known to be in the bucket: two paths, same bytes

    def upload(self, named: Mapping[str, str]) -> dict[str, str]:
        """``named``: local path -> the field naming it. Return local path -> ``s3://`` locator.

        Every file is checked before the first upload, so an obviously bad campaign uploads nothing.
        """
        for path, field in named.items():
            _with_field(field, check_local_file, path, self.max_bytes)
        uploaded: dict[str, str] = {}
        with _progress_bar(len(named), self.progress and len(named) > PROGRESS_OVER) as advance:
            for path, field in named.items():
                data = _with_field(field, read_local_file, path, self.max_bytes)
                # Only an image leaves this machine: a campaign naming ~/.ssh/id_rsa uploads nothing.
                _with_field(field, check_image_bytes, path, data, self.max_pixels)
                uploaded[path] = self._upload_one(data)
                advance()
        return uploaded

    def _upload_one(self, data: bytes) -> str:
        key = content_key(self.prefix, data)
        # A HEAD first: a file already there (an earlier campaign's) is not sent again. The write
        # stays conditional for the race with another client uploading the same bytes.
        if key not in self._stored and not self._holds(key, data):
            self.storage.put(key, data, image_type(data)[1])
        self._stored.add(key)
        return f"s3://{self.storage.bucket}/{key}"

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether ``key`` holds exactly ``data``: an object planted under a photo's hash is replaced."""
        if not self.storage.exists(key):
            return False
        stored = self.storage.get(key, max_bytes=self.max_bytes)
        return hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()


def _with_field(field: str, call: Callable[..., T], *args: object) -> T:
    try:
        return call(*args)
    except LocalFileError as error:
        raise JobSpecError(f"{field}: {error}") from error


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    bar = Progress(
        TextColumn("[bold]uploading references"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),  # stdout stays for what scripts read (ids, JSON)
        disable=not enabled,
    )
    task = bar.add_task("references", total=total)
    with bar:
        yield lambda: bar.advance(task)
