"""Reference images: fetched from S3 or HTTPS (never a local path), checked, and cached by content hash."""

from __future__ import annotations

import hashlib
import io
import tempfile
import warnings
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


@dataclass(frozen=True)
class Reference:
    """A checked reference: where it came from, its content digest and its decoded image."""

    url: str
    digest: str
    image: Image.Image


class ReferenceFetcher:
    """Fetches and checks references; keeps their bytes on local disk by content hash."""

    def __init__(self, storage: Storage, settings: FarmSettings) -> None:
        self.storage = storage
        self.max_bytes = settings.reference_max_bytes
        self.max_pixels = settings.reference_max_pixels
        self.allowed_buckets = settings.allowed_reference_buckets
        self.https_policy = HttpsPolicy.from_settings(settings)
        self.cache_dir = settings.cache_dir / "references"
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def fetch(self, url: str) -> Reference:
        data = self._read(url)
        digest = content_digest(data)
        self._remember(digest, data)
        return Reference(url, digest, self.check(url, data))

    def check(self, url: str, data: bytes) -> Image.Image:
        """Decode ``data`` within the limits; raise a reference error naming the limit broken."""
        url = redact(url)  # a pre-signed URL's signature must not reach the job's error message
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ReferenceTooLargeError(f"reference {url} has too many pixels: {error}") from error
        except (UnidentifiedImageError, OSError) as error:
            raise ReferenceInvalidError(f"reference {url} is not an image (PNG, JPEG or WebP)") from error
        if image.format not in ALLOWED_FORMATS:
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
        try:
            image.load()
        except (OSError, SyntaxError) as error:
            raise ReferenceInvalidError(f"reference {url} is truncated or corrupt: {error}") from error
        return image.convert("RGB")

    def _read(self, url: str) -> bytes:
        try:
            locator = parse_locator(url)
        except ValueError as error:
            raise UnsupportedSchemeError(str(error)) from error
        if locator.kind == LocatorKind.S3:
            return self._read_s3(locator)
        if locator.kind == LocatorKind.HTTPS:
            return self._read_https(url)
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

    def _read_s3(self, locator: Locator) -> bytes:
        """Skip the download when the object's ETag says we already hold its bytes."""
        url, bucket, key = locator.text, locator.bucket, locator.key
        if bucket not in self.allowed_buckets:  # before any request: the answer must not probe other buckets
            raise ReferenceRefusedError(
                f"reference {url} refused: bucket {bucket} is not one references may be read from; "
                "allow it with KLEINFARM_REFERENCE_BUCKETS"
            )
        etag = self.storage.etag(key, bucket=bucket)
        index = self.cache_dir / "s3" / hashlib.sha256(f"{bucket}/{key}@{etag}".encode()).hexdigest()
        if index.is_file():
            cached = self.cache_dir / index.read_text().strip()
            if cached.is_file():
                return cached.read_bytes()
        data = self._limit(url, self.storage.get(key, bucket=bucket, max_bytes=self.max_bytes))
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(content_digest(data))
        return data

    def _read_https(self, url: str) -> bytes:
        return fetch_https(url, self.https_policy)

    def _remember(self, digest: str, data: bytes) -> None:
        """Write once by content; workers sharing the folder each write their own temporary file."""
        path = self.cache_dir / digest
        if path.exists():
            return
        with tempfile.NamedTemporaryFile(dir=self.cache_dir, prefix=f".{digest}.", delete=False) as tmp:
            tmp.write(data)
        Path(tmp.name).replace(path)
