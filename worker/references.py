"""Reference images: fetched from S3 or HTTPS (never a local path), checked, and cached by content hash.

The disk cache keeps only bytes that passed the checks, within a byte budget
(``KLEINFARM_REFERENCE_CACHE_MB``), evicting the least recently used first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kleinfarm.shared.errors import (
    ReferenceInvalidError,
    ReferenceRefusedError,
    ReferenceTooLargeError,
    UnsupportedSchemeError,
)
from kleinfarm.shared.jobs import MAX_REFERENCE_ASPECT, MIN_REFERENCE_SIDE
from kleinfarm.shared.locators import Locator, LocatorKind, parse_locator, redact
from kleinfarm.shared.refset import content_digest
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage
from kleinfarm.worker.https_fetch import HttpsPolicy, fetch_https

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
# Pillow's parsers tried, and nothing else: JPEG's also opens the MPO files phone cameras write (a
# JPEG with extra frames), which Pillow names "MPO" and which are read as their first frame.
PARSERS = ("PNG", "JPEG", "WEBP")
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# What a small file costs on disk, at least: an index entry is charged this, so entries are bounded too.
DISK_BLOCK_BYTES = 4096


@dataclass(frozen=True)
class Reference:
    """A checked reference: where it came from, its content digest and its decoded image."""

    url: str
    digest: str
    image: Image.Image
    decoded: bool = True  # False: only its header was read (its set's K/V are held)


class ReferenceCache:
    """Checked reference bytes on disk by content digest, plus an index from an S3 object version
    (bucket, key, ETag) to its digest; at most ``budget_bytes``, least recently used evicted first.

    Recency is a file's modification time, touched on every hit, so workers sharing the folder
    share one order and one budget; each writes a temporary file and renames it into place.
    """

    def __init__(self, folder: Path, budget_bytes: int) -> None:
        self.folder = folder
        self.index = folder / "s3"
        self.budget_bytes = budget_bytes
        self.index.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def index_name(bucket: str, key: str, etag: str) -> str:
        return hashlib.sha256(f"{bucket}/{key}@{etag}".encode()).hexdigest()

    def lookup(self, name: str) -> bytes | None:
        """The bytes an index entry names, if both are still here (and now the most recent)."""
        entry = self.index / name
        try:
            path = self.folder / entry.read_text().strip()
            data = path.read_bytes()
        except (OSError, ValueError):
            return None
        for used in (entry, path):
            _touch(used)
        return data

    def store(self, digest: str, data: bytes, name: str | None) -> None:
        """Keep ``data`` (already checked) under its digest, and ``name`` -> digest; then evict."""
        if len(data) + DISK_BLOCK_BYTES > self.budget_bytes:
            return  # it alone would break the budget
        path = self.folder / digest
        if not path.exists():
            self._write(path, data)
        _touch(path)
        if name is not None:
            self._write(self.index / name, digest.encode())
            _touch(self.index / name)
        self.evict()

    def evict(self) -> int:
        """Delete least recently used files until the folder is within budget; return bytes freed."""
        entries = sorted(self._entries())
        total = sum(cost for _, cost, _ in entries)
        freed = 0
        for _, cost, path in entries:
            if total - freed <= self.budget_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another worker evicted it first
                path.unlink()
            freed += cost
        return freed

    def used_bytes(self) -> int:
        return sum(cost for _, cost, _ in self._entries())

    def _entries(self) -> list[tuple[int, int, Path]]:
        """(last use, disk cost, path) of every cached file; another worker's temporary file is not one."""
        found = []
        for folder in (self.folder, self.index):
            for entry in os.scandir(folder):
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    found.append((stat.st_mtime_ns, max(stat.st_size, DISK_BLOCK_BYTES), Path(entry.path)))
        return found

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(data)
        Path(tmp.name).replace(path)


class ReferenceFetcher:
    """Fetches and checks references; keeps checked S3 references on local disk by content hash."""

    def __init__(self, storage: Storage, settings: FarmSettings) -> None:
        self.storage = storage
        self.max_bytes = settings.reference_max_bytes
        self.max_pixels = settings.reference_max_pixels
        self.allowed_buckets = settings.allowed_reference_buckets
        self.https_policy = HttpsPolicy.from_settings(settings)
        self.cache = ReferenceCache(settings.cache_dir / "references", settings.reference_cache_mb << 20)

    def fetch(self, url: str) -> Reference:
        return self.fetch_set([url], lambda _digests: False)[0]

    def fetch_set(self, urls: list[str], held: Callable[[list[str]], bool]) -> list[Reference]:
        """Fetch and check a job's references. When ``held(digests)`` says the set's K/V are held,
        their pixels are not decoded: the same bytes were decoded and checked when the set was
        built, and a hit never looks at them (their headers are still checked)."""
        read = [(url, *self._read(url)) for url in urls]
        digests = [content_digest(data) for _url, data, _remember in read]
        decode = not (urls and held(digests))
        references = []
        for (url, data, remember), digest in zip(read, digests, strict=True):
            image = self.check(url, data, decode)  # before anything is kept: a bad file never reaches the cache
            remember(digest, data)
            references.append(Reference(url, digest, image, decode))
        return references

    def check(self, url: str, data: bytes, decode: bool = True) -> Image.Image:
        """Decode ``data`` within the limits (only its header unless ``decode``); raise a reference
        error naming the limit broken."""
        url = redact(url)  # a pre-signed URL's signature must not reach the job's error message
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=PARSERS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ReferenceTooLargeError(f"reference {url} has too many pixels: {error}") from error
        except (UnidentifiedImageError, OSError) as error:
            raise ReferenceInvalidError(f"reference {url} is not an image (PNG, JPEG or WebP)") from error
        kind = "JPEG" if image.format in JPEG_FORMATS else image.format
        if kind not in ALLOWED_FORMATS:
            raise ReferenceInvalidError(f"reference {url} is {image.format}: only PNG, JPEG and WebP are accepted")
        width, height = image.size
        if width * height > self.max_pixels:
            raise ReferenceTooLargeError(
                f"reference {url} is {width}x{height} = {width * height} pixels: "
                f"the limit is {self.max_pixels} (KLEINFARM_REFERENCE_MAX_PIXELS)"
            )
        if min(width, height) < MIN_REFERENCE_SIDE or max(width, height) > MAX_REFERENCE_ASPECT * min(width, height):
            raise ReferenceInvalidError(
                f"reference {url} is {width}x{height}: sides must be at least {MIN_REFERENCE_SIDE} px "
                f"and the aspect ratio at most {MAX_REFERENCE_ASPECT}:1"
            )
        if not decode:
            return image  # opened lazily: its pixels are read only if something asks for them
        try:
            image.load()
        except (OSError, SyntaxError) as error:
            raise ReferenceInvalidError(f"reference {url} is truncated or corrupt: {error}") from error
        return image.convert("RGB")

    def _read(self, url: str) -> tuple[bytes, Callable[[str, bytes], None]]:
        """The reference's bytes, and what to do with them once they pass the checks."""
        try:
            locator = parse_locator(url)
        except ValueError as error:
            raise UnsupportedSchemeError(str(error)) from error
        if locator.kind == LocatorKind.S3:
            return self._read_s3(locator)
        if locator.kind == LocatorKind.HTTPS:
            return self._read_https(url), _keep_nothing
        # The same words whether or not the path exists: the answer must not probe the worker's disk.
        raise ReferenceRefusedError(
            f"reference {url} is a local path: workers open no path a job names; "
            "submit it with the kleinfarm client, which uploads local files"
        )

    def _limit(self, url: str, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise self._too_many_bytes(url)
        return data

    def _too_many_bytes(self, url: str) -> ReferenceTooLargeError:
        return ReferenceTooLargeError(
            f"reference {url} is over {self.max_bytes} bytes: the limit is {self.max_bytes} "
            "(KLEINFARM_REFERENCE_MAX_BYTES)"
        )

    def _read_s3(self, locator: Locator) -> tuple[bytes, Callable[[str, bytes], None]]:
        """Skip the download when the object's ETag says we already hold its bytes."""
        url, bucket, key = locator.text, locator.bucket, locator.key
        if bucket not in self.allowed_buckets:  # before any request: the answer must not probe other buckets
            raise ReferenceRefusedError(
                f"reference {url} refused: bucket {bucket} is not one references may be read from; "
                "allow it with KLEINFARM_REFERENCE_BUCKETS"
            )
        name = self.cache.index_name(bucket, key, self.storage.etag(key, bucket=bucket))
        cached = self.cache.lookup(name)
        if cached is not None:
            return cached, _keep_nothing
        data = self._limit(url, self.storage.get(key, bucket=bucket, max_bytes=self.max_bytes))
        return data, lambda digest, checked: self.cache.store(digest, checked, name)

    def _read_https(self, url: str) -> bytes:
        # Not cached: nothing names a web object's version, so its bytes could not be found again.
        return fetch_https(url, self.https_policy)


def _touch(path: Path) -> None:
    """Mark ``path`` used now, to the nanosecond (a file system's own stamps are coarser)."""
    now = time.time_ns()
    with contextlib.suppress(OSError):  # evicted meanwhile by another worker
        os.utime(path, ns=(now, now))


def _keep_nothing(digest: str, data: bytes) -> None:
    """Bytes read from the cache, or from a source the cache cannot look up again."""
