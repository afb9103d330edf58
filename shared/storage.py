"""S3-compatible object storage (AWS S3, MinIO, R2, moto) through boto3."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kleinfarm.shared.errors import ReferenceNotFoundError, StorageError
from kleinfarm.shared.settings import FarmSettings

MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


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

    def ensure_bucket(self) -> None:
        """Create the farm's bucket if it does not exist."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _error_code(error) not in MISSING_CODES:
                raise StorageError(f"bucket {self.bucket!r}: {error}") from error
            self.client.create_bucket(Bucket=self.bucket)

    def put_if_absent(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        """Write ``key`` unless it exists (conditional write); True if this call wrote it."""
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata=metadata,
                IfNoneMatch="*",
            )
        except ClientError as error:
            if _error_code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise StorageError(f"writing s3://{self.bucket}/{key}: {error}") from error
        return True

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write or replace ``key`` (for derived documents such as the manifest)."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"writing s3://{self.bucket}/{key}: {error}") from error

    def put_jsonl(self, key: str, rows: list[dict[str, Any]]) -> None:
        body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        self.put(key, body.encode(), "application/x-ndjson")

    def get(self, key: str, bucket: str | None = None, max_bytes: int | None = None) -> bytes:
        """Read an object; a missing one raises ``ReferenceNotFoundError``."""
        bucket = bucket or self.bucket
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in MISSING_CODES:
                raise ReferenceNotFoundError(f"s3://{bucket}/{key} does not exist") from error
            raise StorageError(f"reading s3://{bucket}/{key}: {error}") from error
        body = response["Body"]
        return bytes(body.read() if max_bytes is None else body.read(max_bytes + 1))

    def etag(self, key: str, bucket: str | None = None) -> str:
        """The object's ETag, to tell a changed object from a known one without reading it."""
        bucket = bucket or self.bucket
        try:
            return str(self.client.head_object(Bucket=bucket, Key=key)["ETag"])
        except ClientError as error:
            if _error_code(error) in MISSING_CODES:
                raise ReferenceNotFoundError(f"s3://{bucket}/{key} does not exist") from error
            raise StorageError(f"reading s3://{bucket}/{key}: {error}") from error

    def metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata (names lowercased, as S3 returns them)."""
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key).get("Metadata", {}))
        except ClientError as error:
            raise StorageError(f"reading s3://{self.bucket}/{key}: {error}") from error

    def exists(self, key: str) -> bool:
        try:
            self.etag(key)
        except ReferenceNotFoundError:
            return False
        return True
