"""Settings come from KLEINFARM_* variables; the deploy example names only real settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kleinfarm.shared.settings import FarmSettings

EXAMPLE = Path(__file__).parent.parent / "deploy" / "kleinfarm.env.example"


def test_every_setting_the_deploy_example_names_exists_and_parses() -> None:
    names = [line.split("=", 1)[0] for line in EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    fields = {f"KLEINFARM_{name.upper()}" for name in FarmSettings.model_fields}
    assert names and not set(names) - fields
    settings = FarmSettings.from_env(EXAMPLE)
    assert settings.model_revision == "main" and settings.worker_lapse_s == 10


def test_the_deploy_example_holds_no_credential_or_address_compose_derives() -> None:
    """Compose derives these from deploy/.env: a second copy here is one that can disagree."""
    names = {line.split("=", 1)[0] for line in EXAMPLE.read_text().splitlines() if line and not line.startswith("#")}
    derived = {"KLEINFARM_REDIS_URL", "KLEINFARM_S3_ENDPOINT_URL", "KLEINFARM_S3_ACCESS_KEY_ID"}
    derived |= {"KLEINFARM_S3_SECRET_ACCESS_KEY", "KLEINFARM_FLOWER_BASIC_AUTH"}
    assert names and not names & derived


def test_the_environment_overrides_the_env_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLEINFARM_S3_BUCKET", "from-env")
    assert FarmSettings.from_env(EXAMPLE).s3_bucket == "from-env"


def test_secrets_do_not_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLEINFARM_S3_SECRET_ACCESS_KEY", "change-me-secret")
    monkeypatch.setenv("KLEINFARM_FLOWER_BASIC_AUTH", "admin:change-me-password")
    settings = FarmSettings.from_env(EXAMPLE)
    assert settings.s3_secret_access_key is not None and settings.flower_basic_auth is not None
    assert "change-me" not in repr(settings)


def test_the_new_deploy_settings_parse_and_are_checked() -> None:
    settings = FarmSettings(model_revision="0123abc", host_workers="2", log_format="json")  # type: ignore[arg-type]
    assert (settings.model_revision, settings.host_workers, settings.log_format) == ("0123abc", 2, "json")
    with pytest.raises(ValidationError):
        FarmSettings(host_workers=0)
    with pytest.raises(ValidationError):
        FarmSettings(log_format="xml")  # type: ignore[arg-type]


def test_every_deploy_file_parses_and_names_only_real_settings() -> None:
    import re

    import yaml

    deploy = EXAMPLE.parent
    fields = {f"KLEINFARM_{name.upper()}" for name in FarmSettings.model_fields}
    named: set[str] = set()
    for path in [deploy / "docker-compose.yml", *sorted((deploy / "k8s").rglob("*.yaml"))]:
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(document, dict) for document in documents), path
        named |= set(re.findall(r"KLEINFARM_[A-Z0-9_]+", path.read_text()))
    for dockerfile in deploy.glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert text.startswith("#") and "FROM " in text and "ENTRYPOINT" in text
        named |= set(re.findall(r"KLEINFARM_[A-Z0-9_]+", text))
    assert named and not named - fields


def test_an_unknown_routing_policy_is_refused_with_the_known_ones_named() -> None:
    assert FarmSettings(routing_policy="least_loaded").routing_policy == "least_loaded"
    with pytest.raises(ValidationError, match="kleinfarm"):
        FarmSettings(routing_policy="fastest")


def test_a_rediss_url_makes_every_celery_app_verify_the_servers_certificate() -> None:
    import ssl

    from kleinfarm.shared.broker import make_celery

    secure = make_celery(FarmSettings(redis_url="rediss://:pw@redis.example:6380/0"))
    assert secure.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert not make_celery(FarmSettings(redis_url="redis://127.0.0.1:6379/0")).conf.broker_use_ssl
