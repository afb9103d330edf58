"""Offline checks of deploy/: linters (yamllint, kubernetes-validate --strict, hadolint) and the
promises an operator relies on (no secret in an image, ports on loopback, jobs finish on stop,
pods schedulable on GPU nodes and locked down, images pinned)."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
CORE_MANIFESTS = [K8S / name for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True, timeout=120, check=False)


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def test_yamllint_passes_on_every_deploy_file() -> None:
    result = run(BIN / "yamllint", "-c", ROOT / ".yamllint.yaml", "--strict", DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_kubernetes_manifest_passes_strict_schema_validation() -> None:
    result = run(BIN / "kubernetes-validate", "--strict", "--quiet", *CORE_MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {path.name for path in CORE_MANIFESTS}
    unlisted = {path.name for path in K8S.glob("*.yaml")} - listed - {"kustomization.yaml"}
    assert not unlisted  # kubectl apply -k applies them all


def test_hadolint_passes_on_both_dockerfiles() -> None:
    result = run(BIN / "hadolint", "--failure-threshold", "info", *sorted(DEPLOY.glob("Dockerfile.*")))
    assert result.returncode == 0, result.stdout + result.stderr


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated, glob = pattern.startswith("!"), pattern.lstrip("!")
        regex = fnmatch.translate(glob).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_no_secret_or_local_state_reaches_an_image_and_no_filled_in_secret_is_tracked() -> None:
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for secret in ("deploy/kleinfarm.env", "deploy/.env", "deploy/secrets/hf_token", "deploy/k8s/secrets.env"):
        assert dockerignored(secret, patterns), secret
    for local in (".kleinfarm.env", ".venv/bin/python", ".git/config", "kleinfarm-out/x.png", "tests/conftest.py"):
        assert dockerignored(local, patterns), local
    for source in ("shared/settings.py", "worker/engine/engine.py", "pyproject.toml", "deploy/requirements-worker.txt"):
        assert not dockerignored(source, patterns), source
    for dockerfile in DEPLOY.glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert "COPY . " not in text and "kleinfarm.env" not in text
        # Dependencies from the pinned list come before the source, so a source change reuses them.
        assert text.index("requirements") < text.index("COPY shared")
    ignored = run("git", "-C", ROOT, "check-ignore", "deploy/kleinfarm.env", "deploy/.env", "deploy/secrets/hf_token")
    assert len(ignored.stdout.split()) == 3


def test_the_worker_image_installs_pinned_torch_diffusers_and_transformers() -> None:
    pins = dict(
        line.split("==") for line in (DEPLOY / "requirements-worker.txt").read_text().splitlines() if "==" in line
    )
    assert {"torch", "diffusers", "transformers", "accelerate", "celery"} <= set(pins)
    lines = [
        line for line in (DEPLOY / "requirements-worker.txt").read_text().splitlines() if line[:1] not in ("#", "")
    ]
    assert all("==" in line for line in lines)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def test_compose_publishes_on_loopback_only_and_lets_workers_finish_their_job() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (name, image)
    workers = {name: service for name, service in services.items() if name.startswith("worker-")}
    assert workers
    for service in workers.values():
        grace = re.fullmatch(r"(\d+)m", service["stop_grace_period"])
        assert grace and int(grace.group(1)) >= 10
        assert "${FARM_HOST:?" in service["environment"]["KLEINFARM_WORKER_NAME"]


def test_compose_takes_each_credential_from_one_place() -> None:
    services = compose()["services"]
    minio, redis = services["minio"]["environment"], services["redis"]["command"]
    for service in ("flower", "beat", "worker-gpu0", "worker-gpu1"):
        env = services[service]["environment"]
        assert env["KLEINFARM_S3_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert env["KLEINFARM_S3_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
        assert redis[redis.index("--requirepass") + 1] in env["KLEINFARM_REDIS_URL"]


def pod_specs() -> dict[str, dict[str, Any]]:
    specs = {}
    for path in CORE_MANIFESTS:
        for document in documents(path):
            template = document.get("spec", {}).get("template")
            if template:
                specs[document["metadata"]["name"]] = template["spec"]
    return specs


def test_kubernetes_pods_are_pinned_probed_bounded_and_locked_down() -> None:
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            image = container["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), (name, image)
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert "memory" in container["resources"]["limits"], name
            if name not in ("kleinfarm-fetch-model", "kleinfarm-beat"):  # no port; a crash restarts them
                assert "livenessProbe" in container, name
    worker = pod_specs()["kleinfarm-worker"]
    assert worker["terminationGracePeriodSeconds"] >= 600
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    (container,) = worker["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1 and "startupProbe" in container
    models = next(volume for volume in worker["volumes"] if volume["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "kleinfarm-models", "readOnly": True}
    kinds = {
        (document["kind"], document["metadata"]["name"]) for path in CORE_MANIFESTS for document in documents(path)
    }
    assert ("PodDisruptionBudget", "kleinfarm-worker") in kinds


def test_the_monitoring_manifests_scrape_what_the_pods_serve_and_scale_the_workers() -> None:
    (monitor,) = documents(K8S / "monitoring" / "podmonitor.yaml")
    selector = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    scraped = [
        name
        for name, spec in pod_specs().items()
        if any(p.get("name") == port for c in spec["containers"] for p in c.get("ports", []))
    ]
    assert {"kleinfarm-worker", "kleinfarm-exporter"} <= set(scraped)
    for path in CORE_MANIFESTS:
        for document in documents(path):
            if (
                document["metadata"]["name"] in ("kleinfarm-worker", "kleinfarm-exporter")
                and document["kind"] != "Service"
            ):
                labels = document.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
                assert not labels or selector.items() <= labels.items()
    (scaled,) = documents(K8S / "monitoring" / "keda.yaml")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "kleinfarm-worker",
    }
    assert "kleinfarm_farm_pending_jobs" in scaled["spec"]["triggers"][0]["metadata"]["query"]
