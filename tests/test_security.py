"""What a campaign from someone else's file cannot do: write outside its prefix, claim an object it
did not write, leak a credential from a reference URL, or put markup on an operator's terminal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image
from pydantic import ValidationError

from kleinfarm.producer.client import FarmClient, prepare_jobs
from kleinfarm.producer.localfarm.services import free_port, wait_until
from kleinfarm.shared.broker import make_celery
from kleinfarm.shared.errors import JobSpecError
from kleinfarm.shared.jobs import MAX_PRIORITY, Campaign, describe_validation_error
from kleinfarm.shared.locators import redact
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage

from conftest import WorkerPool

WAIT_S = 300


def refused(**fields: object) -> str:
    with pytest.raises(ValidationError) as caught:
        Campaign.from_raw(str(fields.pop("name", "campaign")), [{"prompt": "p"}], **fields)
    return describe_validation_error(caught.value)


@pytest.mark.parametrize("prefix", ["../../etc", "/", "x/..", "a/./b", "a//b", "x/", "a\u202eb", "p" * 257, "a b"])
def test_an_output_prefix_that_could_leave_its_place_is_refused(prefix: str) -> None:
    assert refused(output_prefix=prefix).startswith("output_prefix: ")


def test_safe_prefixes_pass_and_keys_stay_far_below_the_s3_limit() -> None:
    campaign = Campaign.from_raw("ok", [{"id": "j" * 128, "prompt": "p"}], output_prefix="/".join(["a" * 63] * 4))
    (job,) = prepare_jobs(campaign)
    key = f"{campaign.output_prefix}/{'c' * 49}/{job.local_id}.png"
    assert len(key.encode()) < 1024


def test_priority_is_bounded_and_names_with_control_characters_are_refused() -> None:
    assert "priority" in refused(priority=MAX_PRIORITY + 1)
    assert "priority" in refused(priority=-(10**30))
    assert "control or formatting character" in refused(name="spring\u202e2026")
    assert "control or formatting character" in refused(name="line\x1b[31mred")


def test_the_settings_prefix_is_checked_too() -> None:
    with pytest.raises(ValidationError, match="output_prefix"):
        FarmSettings(output_prefix="../up")


def test_credentials_in_reference_urls_are_redacted_wherever_shown() -> None:
    assert redact("https://user:pa55@host.example/a.png?X-Amz-Signature=abc") == (
        "https://host.example/a.png?(redacted)"
    )
    assert redact("s3://bucket/key.png?v=1") == "s3://bucket/key.png?v=1"  # "?" is part of an S3 key


def test_an_object_planted_at_a_jobs_key_is_not_recorded_as_its_image(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    campaign = Campaign.from_raw("planted", [{"id": "victim", "prompt": "p", "width": 256, "height": 256}])
    campaign_id = "planted-0001"
    storage.put_if_absent(f"kleinfarm/{campaign_id}/victim.png", b"not ours", "image/png", {"job": "someone-else"})
    meta = {"name": campaign.name, "output_prefix": "kleinfarm"}
    client.state.create_campaign(campaign_id, meta, 0, prepare_jobs(campaign))
    status = client.campaign(campaign_id).wait(progress=False, timeout=WAIT_S)
    (row,) = client.campaign(campaign_id).results()
    assert status.failed == 1 and "was not written by this job" in str(row["error"])
    assert storage.get(f"kleinfarm/{campaign_id}/victim.png") == b"not ours"


def test_a_secret_in_a_reference_url_reaches_no_record(
    client: FarmClient, storage: Storage, workers: WorkerPool
) -> None:
    secret_url = "https://user:topsecret@127.0.0.1:9/logo.png?X-Amz-Signature=topsecret"
    jobs = [{"prompt": "edit", "references": [secret_url]}, {"prompt": "plain"}]
    handle = client.submit(Campaign.from_raw("secrets", jobs, defaults={"width": 256, "height": 256}))
    handle.wait(progress=False, timeout=WAIT_S)
    manifest = storage.get(f"kleinfarm/{handle.id}/manifest.jsonl").decode()
    shown = manifest + json.dumps(handle.results())
    for row in handle.results():
        if row["key"]:
            shown += Image.open(io.BytesIO(storage.get(row["key"]))).info.get("kleinfarm", "")
    assert "topsecret" not in shown
    assert [row["state"] for row in handle.results()] == ["failed", "succeeded"]


def test_results_print_keys_and_errors_as_plain_text(
    client: FarmClient, farm_env: dict[str, str], storage: Storage, workers: WorkerPool
) -> None:
    hostile = f"s3://{storage.bucket}/x[/]y[link=https://evil.example]z.png"
    handle = client.submit(Campaign.from_raw("markup", [{"prompt": "p", "references": [hostile]}]))
    handle.wait(progress=False, timeout=WAIT_S)
    shown = subprocess.run(
        [sys.executable, "-m", "kleinfarm.producer", "results", handle.id],
        env={**os.environ, **farm_env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "[/]" in shown.stdout and "[link=https://evil.example]" in shown.stdout
    assert "\x1b]8;" not in shown.stdout  # no terminal hyperlink


@pytest.fixture()
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS and wants a password, with its self-signed certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file",
         str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", "farm-secret",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _answers(port), "TLS redis-server", server)
        yield port, cert
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_farm_talks_to_redis_over_tls_and_refuses_a_server_it_cannot_verify(tls_redis: tuple[int, Path]) -> None:
    port, cert = tls_redis
    url = f"rediss://:farm-secret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    client = FarmClient(FarmSettings(redis_url=url))
    handle = client.submit(Campaign.from_raw("over-tls", [{"prompt": "p"}]))
    assert handle.status().pending == 1
    app = make_celery(client.settings)
    app.send_task("kleinfarm.generate", kwargs={"job": "probe"}, queue="kf.tls-probe")
    assert client.state.redis.llen("kf.tls-probe") == 1
    unverified = f"rediss://:farm-secret@127.0.0.1:{port}/0"  # the system's CAs do not know this server
    with pytest.raises(redis.exceptions.ConnectionError):
        FarmClient(FarmSettings(redis_url=unverified)).state.redis.ping()


@pytest.mark.parametrize(
    "reference", ["https://[::1/x.png", "https://a]b/x.png", "https:///no-host.png", "s3://b/k\x1b]8;;x"]
)
def test_a_reference_that_cannot_be_parsed_or_holds_control_characters_is_refused_at_submit(reference: str) -> None:
    with pytest.raises(ValidationError):
        Campaign.from_raw("bad-ref", [{"prompt": "p", "references": [reference]}])
    assert redact("https://[::1/x.png") == "https://(unparsable)"  # never raises


def test_a_local_file_that_is_not_an_image_is_never_uploaded(client: FarmClient, tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(JobSpecError, match=r"jobs\[0\]\.references\[0\]: .* is not a PNG, JPEG or WebP image"):
        client.submit(Campaign.from_raw("exfiltrate", [{"prompt": "p", "references": [str(secret)]}]))


def test_an_object_planted_under_a_photos_hash_is_replaced_by_the_real_bytes(
    client: FarmClient, storage: Storage
) -> None:
    photo = Path(__file__).parent.parent / "examples" / "refs" / "logo.png"
    data = photo.read_bytes()
    key = f"{client.settings.reference_upload_prefix}/{hashlib.sha256(data).hexdigest()}.png"
    storage.put(key, b"poisoned", "image/png")
    client.upload_references([("jobs[0].references[0]", str(photo))])
    assert storage.get(key) == data


def test_the_farms_own_bucket_is_always_allowed_and_a_changed_campaign_is_checked_again(
    client: FarmClient,
) -> None:
    assert FarmSettings(s3_bucket="farm", reference_buckets="photos").allowed_reference_buckets == {"farm", "photos"}
    campaign = Campaign.from_raw("changed", [{"prompt": "p"}])
    campaign.output_prefix = "../escape"
    with pytest.raises(JobSpecError, match="output_prefix"):
        client.submit(campaign)


def test_terminal_escape_sequences_in_data_are_shown_not_obeyed() -> None:
    from kleinfarm.producer.cli.common import shown

    hostile = "key\x1b]8;;https://evil.example\x1b\\link\u202eevil"
    assert shown(hostile) == "key\\u001b]8;;https://evil.example\\u001b\\link\\u202eevil"
    assert shown("plain [/] text") == "plain [/] text"
