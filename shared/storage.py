"""S3-compatible object storage (AWS S3, MinIO, R2, moto) through boto3.

Every failure leaves this module as a ``StorageError`` (``shared/errors.py``), classified so the
worker knows whose fault it is: the store unreachable, timing out, failing (5xx) or throttling is a
``StorageUnavailableError`` (transient: retry later, blame nobody); a refusal (403, 404 and other
4xx) is a plain ``StorageError`` naming the bucket and key (retrying will not help).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from kleinfarm.shared.errors import ReferenceNotFoundError, StorageError, StorageUnavailableError
from kleinfarm.shared.locators import redact
from kleinfarm.shared.settings import FarmSettings

MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
CONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
# Answers that say "not now" rather than "no": throttling and the store's own failures.
THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded", "RequestTimeout"}
)
# botocore's errors for a store that could not be reached or stopped answering mid-way
# (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, ...).
UNREACHABLE_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError)

# S3 user metadata travels as HTTP headers: printable ASCII, at most 2 KB of names and values.
METADATA_BUDGET_BYTES = 2048
METADATA_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# A streamed object is spooled in memory up to this size, then on disk: a manifest of any length
# costs at most this much memory, plus the one part being uploaded.
SPOOL_MEMORY_BYTES = 1024 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024
# No threads: parts go one at a time, so memory holds one part (8 MiB), not ten.
SERIAL_TRANSFER = TransferConfig(use_threads=False)


@dataclass(frozen=True)
class ListedObject:
    """One object of a listing: its key, size in bytes and ETag (without quotes)."""

    key: str
    size: int
    etag: str


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _http_status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_unavailable(error: ClientError | BotoCoreError) -> bool:
    """Whether the store could not be reached, failed (5xx) or throttled: it may pass by itself."""
    if isinstance(error, ClientError):
        status = _http_status(error)
        return status >= 500 or status == 429 or _error_code(error) in THROTTLING_CODES
    return isinstance(error, UNREACHABLE_ERRORS)


def _describe(error: ClientError | BotoCoreError) -> str:
    """The store's code, status and message, on one line (botocore's own texts may span several)."""
    if isinstance(error, ClientError):
        message = error.response.get("Error", {}).get("Message") or ""
        text = f"{_error_code(error)} ({_http_status(error)}) {message}"
    else:
        text = str(error)
    return " ".join(text.split())


def header_safe_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata S3 takes as header values: printable ASCII (line breaks and tabs become spaces,
    anything else '?'), no outer whitespace, cut to S3's 2 KB budget. botocore refuses non-ASCII
    values, and a line break in one fails inside the HTTP client as if the store were unreachable."""
    budget = METADATA_BUDGET_BYTES
    cleaned: dict[str, str] = {}
    for name, value in metadata.items():
        if not METADATA_NAME.fullmatch(name):
            raise StorageError(f"metadata name {name!a} is not a valid header name")
        text = _printable_ascii(str(value))[: max(budget - len(name), 0)].rstrip()
        budget -= len(name) + len(text)
        cleaned[name] = text
    return cleaned


def _printable_ascii(text: str) -> str:
    return "".join(char if " " <= char <= "~" else " " if char in "\t\r\n" else "?" for char in text).strip()


@dataclass
class Storage:
    """The farm's bucket plus read access to any bucket the credentials reach."""

    client: Any
    bucket: str

    @classmethod
    def from_settings(cls, settings: FarmSettings) -> Storage:
        secret = settings.s3_secret_access_key
        key_id = settings.s3_access_key_id
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=key_id.get_secret_value() if key_id else None,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
        )
        return cls(client=client, bucket=settings.s3_bucket)

    @property
    def endpoint(self) -> str:
        """Where the store is, as it may be shown (no credentials in it)."""
        return redact(str(getattr(getattr(self.client, "meta", None), "endpoint_url", None) or "S3"))

    def failure(self, error: ClientError | BotoCoreError, action: str, bucket: str, key: str = "") -> StorageError:
        """The farm's error for a boto3 failure while doing ``action`` on ``s3://bucket/key``."""
        what = f"{action} s3://{bucket}/{key}: {_describe(error)}"
        if not is_unavailable(error):
            return StorageError(what)
        if isinstance(error, ClientError):
            return StorageUnavailableError(f"S3 at {self.endpoint} is unavailable: {what}")
        return StorageUnavailableError(f"cannot reach S3 at {self.endpoint} (KLEINFARM_S3_ENDPOINT_URL): {what}")

    @contextmanager
    def _classified(self, action: str, bucket: str, key: str = "", missing_ok: bool = False) -> Iterator[None]:
        """Turn boto3's errors into the farm's; a missing object is ``ReferenceNotFoundError`` when
        ``missing_ok`` (the caller expects that answer)."""
        try:
            yield
        except ClientError as error:
            if missing_ok and _error_code(error) in MISSING_CODES:
                raise ReferenceNotFoundError(f"s3://{bucket}/{key} does not exist") from error
            raise self.failure(error, action, bucket, key) from error
        except BotoCoreError as error:
            raise self.failure(error, action, bucket, key) from error

    def ensure_bucket(self) -> None:
        """Create the farm's bucket if it does not exist."""
        try:
            with self._classified("checking", self.bucket, missing_ok=True):
                self.client.head_bucket(Bucket=self.bucket)
        except ReferenceNotFoundError:
            with self._classified("creating", self.bucket):
                self.client.create_bucket(Bucket=self.bucket)

    def put_if_absent(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        """Write ``key`` unless it exists (conditional write); True if this call wrote it."""
        safe = header_safe_metadata(metadata)
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata=safe, IfNoneMatch="*"
            )
        except ClientError as error:
            if _error_code(error) in CONDITION_FAILED_CODES:
                return False
            raise self.failure(error, "writing", self.bucket, key) from error
        except BotoCoreError as error:
            raise self.failure(error, "writing", self.bucket, key) from error
        return True

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write or replace ``key`` (for derived documents such as the manifest)."""
        with self._classified("writing", self.bucket, key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def put_stream(self, key: str, chunks: Iterable[bytes], content_type: str) -> None:
        """Write or replace ``key`` from ``chunks`` without holding the object in memory: they are
        spooled (memory, then disk) and uploaded in parts, one at a time."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spool:
            for chunk in chunks:
                spool.write(chunk)
            spool.seek(0)
            self._upload(key, spool, content_type)

    def _upload(self, key: str, source: IO[bytes], content_type: str) -> None:
        with self._classified("writing", self.bucket, key):
            self.client.upload_fileobj(
                source, self.bucket, key, ExtraArgs={"ContentType": content_type}, Config=SERIAL_TRANSFER
            )

    def put_jsonl(self, key: str, rows: Iterable[dict[str, Any]]) -> None:
        """One JSON line per row, streamed: ``rows`` may be a generator of any length."""
        lines = ((json.dumps(row, sort_keys=True) + "\n").encode() for row in rows)
        self.put_stream(key, lines, "application/x-ndjson")

    def get(self, key: str, bucket: str | None = None, max_bytes: int | None = None) -> bytes:
        """Read an object; a missing one raises ``ReferenceNotFoundError``."""
        bucket = bucket or self.bucket
        with self._classified("reading", bucket, key, missing_ok=True):
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            return bytes(body.read() if max_bytes is None else body.read(max_bytes + 1))

    def read_chunks(
        self, key: str, bucket: str | None = None, chunk_bytes: int = STREAM_CHUNK_BYTES
    ) -> Generator[bytes, None, None]:
        """An object's bytes in chunks, so a reader can stop at a limit without holding them all."""
        bucket = bucket or self.bucket
        with self._classified("reading", bucket, key, missing_ok=True):
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                yield from body.iter_chunks(chunk_bytes)
            finally:
                body.close()  # a reader that stops early must not leave the connection half read

    def list_objects(self, prefix: str, bucket: str | None = None) -> Iterator[ListedObject]:
        """The objects under ``prefix``, a page (1,000) at a time: a listing of any length is never
        held whole."""
        bucket = bucket or self.bucket
        with self._classified("listing", bucket, prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ListedObject(str(item["Key"]), int(item.get("Size", 0)), str(item.get("ETag", "")).strip('"'))

    def etag(self, key: str, bucket: str | None = None) -> str:
        """The object's ETag, to tell a changed object from a known one without reading it."""
        bucket = bucket or self.bucket
        with self._classified("reading", bucket, key, missing_ok=True):
            return str(self.client.head_object(Bucket=bucket, Key=key)["ETag"])

    def metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata, names lowercased (MinIO keeps the case it was sent with)."""
        with self._classified("reading", self.bucket, key):
            found = self.client.head_object(Bucket=self.bucket, Key=key).get("Metadata", {})
        return {str(name).lower(): str(value) for name, value in found.items()}

    def exists(self, key: str) -> bool:
        try:
            self.etag(key)
        except ReferenceNotFoundError:
            return False
        return True
