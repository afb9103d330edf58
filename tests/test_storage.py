"""Storage failures classified against real endpoints, header-safe metadata, the streamed manifest."""

from __future__ import annotations

import gc
import json
import secrets
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from botocore.config import Config
from pydantic import SecretStr

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import S3Server
from kleinfarm.shared.errors import ReferenceNotFoundError, StorageError, StorageUnavailableError, TransientError
from kleinfarm.shared.manifest import manifest_key, write_manifest
from kleinfarm.shared.records import RoutingInfo
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.state import NewJob
from kleinfarm.shared.storage import Storage

# One attempt: these tests check how a failure is classified, not boto3's retries (one test below
# goes through the farm's own client, retries included).
ONE_ATTEMPT = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=1)
MANIFEST_JOBS = 20_000
PROMPT_CHARS = 2_000


def storage_at(endpoint: str, bucket: str = "farm", config: Config = ONE_ATTEMPT) -> Storage:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3Server.access_key,
        aws_secret_access_key=S3Server.secret_key,
        config=config.merge(Config(s3={"addressing_style": "path"})),
    )
    return Storage(client=client, bucket=bucket)


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections are refused, and nobody else can take
    it while the test runs."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


@pytest.fixture()
def moto_storage(s3_server: S3Server) -> Storage:
    """A fresh bucket of its own on the S3 server."""
    storage = storage_at(s3_server.url, bucket=f"t-{secrets.token_hex(6)}")
    storage.ensure_bucket()
    return storage


OPERATIONS: dict[str, Callable[[Storage], Any]] = {
    "ensure_bucket": lambda storage: storage.ensure_bucket(),
    "put_if_absent": lambda storage: storage.put_if_absent("a/b.png", b"x", "image/png", {"job": "j"}),
    "put": lambda storage: storage.put("a/b.json", b"{}", "application/json"),
    "put_jsonl": lambda storage: storage.put_jsonl("a/m.jsonl", iter([{"a": 1}])),
    "get": lambda storage: storage.get("a/b.png"),
    "read_chunks": lambda storage: list(storage.read_chunks("a/b.png")),
    "etag": lambda storage: storage.etag("a/b.png"),
    "metadata": lambda storage: storage.metadata("a/b.png"),
    "exists": lambda storage: storage.exists("a/b.png"),
    "list_objects": lambda storage: list(storage.list_objects("a/")),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_operation_on_an_unreachable_store_is_transient_and_names_the_endpoint(
    closed_port: int, operation: str
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(StorageUnavailableError) as caught:
        OPERATIONS[operation](storage_at(endpoint))
    assert isinstance(caught.value, TransientError)
    assert f"cannot reach S3 at {endpoint}" in str(caught.value) and "s3://farm/" in str(caught.value)


def test_the_farms_own_client_retries_then_reports_the_store_unavailable(closed_port: int) -> None:
    settings = FarmSettings(
        s3_endpoint_url=f"http://127.0.0.1:{closed_port}",
        s3_access_key_id=SecretStr("k"),
        s3_secret_access_key=SecretStr("s"),
    )
    with pytest.raises(StorageUnavailableError, match=r"cannot reach S3 at http://127\.0\.0\.1:\d+"):
        Storage.from_settings(settings).ensure_bucket()


def test_a_store_that_accepts_but_never_answers_times_out_as_unavailable() -> None:
    with socket.socket() as silent:  # the kernel completes the handshake; nobody ever reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        storage = storage_at(f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(StorageUnavailableError, match="Read timeout"):
            storage.get("a/b.png")


class FixedAnswer(BaseHTTPRequestHandler):
    """Answers every request with one S3 error (status and code set on the server)."""

    def _answer(self) -> None:
        status, code = self.server.answer  # type: ignore[attr-defined]
        body = f"<Error><Code>{code}</Code><Message>{code} here</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _answer  # noqa: N815 - http.server's names

    def log_message(self, format: str, *args: Any) -> None:  # the test output stays quiet
        pass


@pytest.fixture()
def answering() -> Iterator[Callable[[int, str], Storage]]:
    """A real HTTP endpoint that answers like S3 with a chosen error."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FixedAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def storage(status: int, code: str) -> Storage:
        server.answer = (status, code)  # type: ignore[attr-defined]
        return storage_at(f"http://127.0.0.1:{server.server_address[1]}")

    yield storage
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")])
def test_server_errors_and_throttling_are_transient(
    answering: Callable[[int, str], Storage], status: int, code: str
) -> None:
    with pytest.raises(
        StorageUnavailableError, match=f"is unavailable: writing s3://farm/a/b.png: {code} \\({status}\\)"
    ):
        answering(status, code).put_if_absent("a/b.png", b"x", "image/png", {})


@pytest.mark.parametrize(("status", "code"), [(403, "AccessDenied"), (400, "InvalidRequest")])
def test_a_refusal_names_bucket_and_key_and_is_not_transient(
    answering: Callable[[int, str], Storage], status: int, code: str
) -> None:
    storage = answering(status, code)
    for operation in (
        lambda: storage.put_if_absent("a/b.png", b"x", "image/png", {}),
        lambda: storage.get("a/b.png"),
        lambda: storage.metadata("a/b.png"),
    ):
        with pytest.raises(StorageError, match=rf"s3://farm/a/b\.png: \S+ \({status}\)") as caught:
            operation()
        assert not isinstance(caught.value, TransientError)


def test_a_missing_bucket_is_a_storage_error_not_a_transient_one(s3_server: S3Server) -> None:
    storage = storage_at(s3_server.url, bucket=f"missing-{secrets.token_hex(4)}")
    with pytest.raises(StorageError, match=rf"writing s3://{storage.bucket}/a/b.png: NoSuchBucket \(404\)") as caught:
        storage.put_if_absent("a/b.png", b"x", "image/png", {"job": "j"})
    assert not isinstance(caught.value, TransientError)
    with pytest.raises(ReferenceNotFoundError):
        storage.get("a/b.png")
    with pytest.raises(StorageError, match="404") as missing:
        storage_at(s3_server.url, bucket=storage.bucket).metadata("a/b.png")
    assert not isinstance(missing.value, TransientError)


def test_metadata_that_cannot_be_a_header_is_cleaned_not_a_crash(moto_storage: Storage) -> None:
    metadata = {
        "prompt": "a mug\non marble,\r\n\tlit from the left",  # YAML `prompt: |`
        "model": "café 中文",
        "note": "bell\x07 and del\x7f",
        "long": "x" * 5000,
    }
    assert moto_storage.put_if_absent("a/meta.png", b"png", "image/png", metadata)
    stored = moto_storage.metadata("a/meta.png")
    assert stored["prompt"] == "a mug on marble,   lit from the left"
    assert stored["model"] == "caf? ??"
    assert stored["note"] == "bell? and del?"
    assert sum(len(name) + len(value) for name, value in stored.items()) <= 2048  # S3's limit
    assert not moto_storage.put_if_absent("a/meta.png", b"png", "image/png", metadata)  # still conditional
    with pytest.raises(StorageError, match="not a valid header name"):
        moto_storage.put_if_absent("a/other.png", b"png", "image/png", {"bad name": "x"})


def test_a_streamed_object_over_one_part_is_uploaded_in_parts(moto_storage: Storage) -> None:
    part = b"y" * (3 * 1024 * 1024)
    moto_storage.put_stream("big/obj.bin", iter([part] * 4), "application/octet-stream")  # 12 MiB
    head = moto_storage.client.head_object(Bucket=moto_storage.bucket, Key="big/obj.bin")
    assert head["ContentLength"] == 12 * 1024 * 1024 and "-" in head["ETag"]  # a multipart upload


def test_the_manifest_of_a_large_campaign_is_written_in_bounded_memory(
    scratch_farm: FarmClient, moto_storage: Storage
) -> None:
    state = scratch_farm.state
    campaign_id = f"big-{secrets.token_hex(4)}"
    spec = {"kind": "generate", "prompt": "p" * PROMPT_CHARS, "width": 256, "height": 256, "seed": 1, "steps": 4}
    jobs = [
        NewJob(f"job-{index:05d}", spec, RoutingInfo(None, 1.0, 0.0, 0), {"kind": "generate"})
        for index in range(MANIFEST_JOBS)
    ]
    state.create_campaign(campaign_id, {"name": "big", "output_prefix": "out"}, 0, jobs)
    del jobs
    assert state.request_cancel(campaign_id) == MANIFEST_JOBS  # every job terminal, by the cancel move
    assert state.status(campaign_id).finished

    gc.collect()
    tracemalloc.start()
    try:
        key = write_manifest(state, moto_storage, campaign_id)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    body = moto_storage.get(key)
    assert key == manifest_key("out", campaign_id)
    lines = body.splitlines()
    assert len(lines) == MANIFEST_JOBS
    assert sorted(json.loads(line)["job_id"] for line in lines) == [f"job-{i:05d}" for i in range(MANIFEST_JOBS)]
    # The manifest is ~45 MB; holding its rows and its text at once took ~150 MB (measured).
    # Streamed, the peak is a chunk of records or one upload part (~13 MB), whatever its size.
    assert len(body) > 40_000_000
    assert peak < len(body) // 2, f"peak {peak / 1e6:.1f} MB for a {len(body) / 1e6:.1f} MB manifest"
