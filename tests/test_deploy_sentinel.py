"""deploy/'s Redis without a single point of failure, read as compose and kustomize would: every
farm process is on Sentinel URLs that name Sentinels which exist and monitor the farm's master.
The failover itself runs against real processes in ``tests/test_sentinel.py``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from kleinfarm.shared.redis_urls import SentinelURL, is_sentinel

DEPLOY = Path(__file__).parent.parent / "deploy"
OVERLAY = DEPLOY / "k8s" / "sentinel"
BIN = Path(sys.executable).parent
ENV = {"REDIS_PASSWORD": "pw", "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p", "FLOWER_BASIC_AUTH": "a:b"}
ENV["FARM_HOST"] = "host-a"


def interpolate(text: str) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} (all set here), and $$ for a literal $."""

    def value(match: re.Match[str]) -> str:
        default = match.group(3) if match.group(2) == "-" else ""
        return ENV.get(match.group(1), default)

    text = re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", value, text)
    return text.replace("$$", "$")


def compose(*names: str) -> dict[str, Any]:
    """The files merged as ``docker compose -f ... -f ...`` merges them (mappings key by key)."""
    merged: dict[str, Any] = {}
    for name in names:
        _merge(merged, yaml.safe_load(interpolate((DEPLOY / name).read_text())))
    return merged


def _merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def test_with_the_sentinel_file_every_farm_service_finds_the_master_through_three_sentinels() -> None:
    services = compose("docker-compose.yml", "docker-compose.sentinel.yml")["services"]
    farm = [name for name, service in services.items() if "KLEINFARM_REDIS_URL" in service.get("environment", {})]
    assert {"flower", "beat", "worker-gpu0", "worker-gpu1"} <= set(farm)
    for name in farm:
        environment = services[name]["environment"]
        url = environment["KLEINFARM_REDIS_URL"]
        assert is_sentinel(url), name
        parsed = SentinelURL.parse(url)
        assert [host for host, _port in parsed.sentinels] == ["sentinel-1", "sentinel-2", "sentinel-3"]
        assert parsed.password == "pw" and environment["KLEINFARM_REDIS_SENTINEL_MASTER"] == "kleinfarm"
        assert all(f"sentinel-{index}" in services for index in (1, 2, 3))
    monitor = " ".join(services["sentinel-1"]["command"])
    assert "sentinel monitor kleinfarm redis 6379 2" in " ".join(monitor.split())
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 : replica.index("--replicaof") + 3] == ["redis", "6379"]
    assert "--masterauth" in services["redis"]["command"]  # an old master follows the promoted one


def merge_env_patch(document: dict[str, Any], patch: dict[str, Any]) -> None:
    """A strategic merge of containers' env, the only thing the overlay patches: items by name."""
    containers = {item["name"]: item for item in document["spec"]["template"]["spec"]["containers"]}
    for container in patch["spec"]["template"]["spec"]["containers"]:
        env = containers[container["name"]]["env"]  # a container the patch names must exist
        for item in container["env"]:
            env[:] = [old for old in env if old["name"] != item["name"]] + [item]


def overlay_workloads() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    names = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    base = {
        (doc["kind"], doc["metadata"]["name"]): doc
        for name in names
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())
        if doc
    }
    workloads = []
    for entry in kustomization["patches"]:
        patch = yaml.safe_load(entry["patch"])
        document = base[(patch["kind"], patch["metadata"]["name"])]
        merge_env_patch(document, patch)
        workloads.append(document)
    return workloads


def test_the_kubernetes_overlay_puts_every_farm_pod_on_the_sentinel_service() -> None:
    sentinel_docs = [doc for doc in yaml.safe_load_all((OVERLAY / "redis-sentinel.yaml").read_text()) if doc]
    services = {doc["metadata"]["name"]: doc for doc in sentinel_docs if doc["kind"] == "Service"}
    sentinels = next(
        doc for doc in sentinel_docs if doc["metadata"]["name"] == "kleinfarm-sentinel" and doc["kind"] == "StatefulSet"
    )
    assert sentinels["spec"]["replicas"] == 3
    assert "sentinel monitor kleinfarm kleinfarm-redis 6379 2" in " ".join(
        sentinels["spec"]["template"]["spec"]["containers"][0]["args"][0].split()
    )
    workloads = overlay_workloads()
    assert {doc["metadata"]["name"] for doc in workloads} == {
        "kleinfarm-beat",
        "kleinfarm-exporter",
        "kleinfarm-flower",
        "kleinfarm-worker",
    }
    for doc in workloads:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        parsed = SentinelURL.parse(env["KLEINFARM_REDIS_URL"])
        assert parsed.sentinels == (("kleinfarm-sentinel", 26379),), doc["metadata"]["name"]
        assert services["kleinfarm-sentinel"]["spec"]["ports"][0]["port"] == 26379
        assert env["KLEINFARM_REDIS_SENTINEL_MASTER"] == "kleinfarm" and "REDIS_PASSWORD" in env


def test_the_sentinel_manifests_pass_strict_schema_validation() -> None:
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(OVERLAY / "redis-sentinel.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
