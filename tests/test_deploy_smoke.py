"""deploy/ brought up without Docker or a cluster: each service of docker-compose.yml (and each pod of
k8s/) runs as a local process the way compose (or the kubelet) would start it.

What is taken from the files as written: each service's command and its image's ENTRYPOINT and ENV,
the environment from ``env_file`` (a copy of the example, as the guide says) and ``environment``
with ``${...}`` filled in from a deploy/.env made from .env.example; in Kubernetes the ConfigMap,
the secret (from secrets.env.example), ``fieldRef`` and ``$(VAR)``. What stands in for what this
machine lacks: service names in URLs are rewritten to the local process's 127.0.0.1 port (a
Service name must name a Service of the manifests on its port), volumes and secrets are fresh
folders and files, moto stands in for MinIO, the tiny model for FLUX.2 (``--gpu 0`` dropped: no CUDA
here), and ports a container owns alone (metrics, Flower) become free ports.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kleinfarm.producer.client import FarmClient
from kleinfarm.producer.localfarm.services import RedisServer, S3Server, free_port, settings_of
from kleinfarm.shared import keys
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.storage import Storage

DEPLOY = Path(__file__).parent.parent / "deploy"
K8S = DEPLOY / "k8s"
START_S = 240.0
RENDER_S = 240.0


# -- reading the files as compose and the kubelet do ----------------------------------------------
def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name, "")
        if op == ":?" and not value:
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return value or (arg if op == ":-" else "")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, text).replace("$$", "$")


def env_lines(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return {key.strip(): value for key, value in pairs}


@dataclass(frozen=True)
class Image:
    entrypoint: list[str]
    env: dict[str, str]

    @classmethod
    def of(cls, dockerfile: Path) -> Image:
        text = dockerfile.read_text().replace("\\\n", " ")
        env: dict[str, str] = {}
        for line in re.findall(r"^ENV (.+)$", text, re.MULTILINE):
            env.update(part.split("=", 1) for part in shlex.split(line))
        (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, re.MULTILINE)
        return cls(json.loads(entrypoint), env)


def as_local_command(argv: list[str]) -> list[str]:
    """``kleinfarm ...`` run by this interpreter; ``--gpu N`` dropped (this machine has no CUDA)."""
    assert argv[0] == "kleinfarm"
    args = list(argv[1:])
    if "--gpu" in args:
        del args[args.index("--gpu") : args.index("--gpu") + 2]
    return [sys.executable, "-m", "kleinfarm.producer", *args]


def rewrite(env: dict[str, str], hosts: dict[str, int], mounts: dict[str, Path]) -> dict[str, str]:
    """Service names in URLs to their local ports; container paths to the folders standing in."""
    out = {}
    for key, value in env.items():
        for name, port in hosts.items():
            value = re.sub(rf"(?<=[/@]){re.escape(name)}\b", f"127.0.0.1:{port}", value)
        for target, folder in mounts.items():
            if value == target or value.startswith(target + "/"):
                value = str(folder) + value[len(target) :]
        out[key] = value
    return out


def strip_port(env: dict[str, str]) -> dict[str, str]:
    """Drop the in-cluster port after a rewritten host (``127.0.0.1:N:6379`` -> ``127.0.0.1:N``)."""
    return {key: re.sub(r"(127\.0\.0\.1:\d+):\d+", r"\1", value) for key, value in env.items()}


class PasswordRedis(RedisServer):
    """``redis-server`` with the arguments of the deploy file, on a local port and folder."""

    def __init__(self, args: list[str], password: str) -> None:
        super().__init__()
        self.args, self.password = args, password

    def command(self) -> list[str]:
        return [*super().command()[:1], *self.args, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", "."]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                time.sleep(0.05)
                return b"+PONG" in connection.recv(64)
        except OSError:
            return False


@dataclass
class Processes:
    """The services started, each logging to its own file; all stopped at the end."""

    log_dir: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        base = {key: value for key, value in os.environ.items() if not key.startswith(("KLEINFARM_", "HF_"))}
        with (self.log_dir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(argv, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.started[name] = process
        return process

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.terminate()
        for process in self.started.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for(condition: Any, what: str, processes: Processes, timeout_s: float = START_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [name for name, process in processes.started.items() if process.poll() is not None]
        assert not dead, f"{dead} exited while waiting for {what}:\n{processes.logs()[-6000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{processes.logs()[-6000:]}"
        time.sleep(0.1)


def http_get(url: str, auth: str | None = None) -> str | None:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def render_small_campaign(client: FarmClient, jobs: int) -> None:
    raw = [{"prompt": f"a mug {index}", "width": 256, "height": 256, "seed": index} for index in range(jobs)]
    handle = client.submit(Campaign.from_raw("deploy-smoke", raw))
    status = handle.wait(progress=False, timeout=RENDER_S)
    assert status.succeeded == jobs, [row["error"] for row in handle.results()]


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path / "logs")
    running.log_dir.mkdir()
    try:
        yield running
    finally:
        running.stop()


# -- docker-compose.yml ---------------------------------------------------------------------------
def compose_env() -> dict[str, str]:
    """deploy/.env as an operator fills in .env.example."""
    env = env_lines(DEPLOY / ".env.example")
    env.update(REDIS_PASSWORD=secrets.token_hex(16), MINIO_ROOT_PASSWORD=secrets.token_hex(16))
    env["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_hex(8)}"
    return env


def compose_services(env: dict[str, str]) -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(interpolate((DEPLOY / "docker-compose.yml").read_text(), env))
    return services


def service_env(service: dict[str, Any], image: Image, env_file_dir: Path) -> dict[str, str]:
    """Image ENV, then env_file, then environment: compose's precedence, last wins."""
    return {**image.env, **env_lines(env_file_dir / service["env_file"]), **service.get("environment", {})}


def test_compose_brings_up_a_farm_whose_hosts_keep_their_own_names_and_render(
    processes: Processes, tiny_model: Path, tmp_path: Path
) -> None:
    settings_dir = tmp_path / "deploy"
    settings_dir.mkdir()
    (settings_dir / "kleinfarm.env").write_text((DEPLOY / "kleinfarm.env.example").read_text())
    env = compose_env()
    compose = compose_services(env)
    services = compose["services"]
    assert {"KLEINFARM_S3_ACCESS_KEY_ID", "KLEINFARM_S3_SECRET_ACCESS_KEY"} <= set(services["beat"]["environment"])
    redis_args = services["redis"]["command"][1:]
    with PasswordRedis(redis_args, env["REDIS_PASSWORD"]) as redis, S3Server() as s3:
        hosts = {"redis:6379": redis.port, "minio:9000": s3.port}
        hosts = {name.split(":")[0]: port for name, port in hosts.items()}
        workers: dict[str, subprocess.Popen[bytes]] = {}
        for host in ("host-a", "host-b"):  # two machines, each with its deploy/.env
            per_host = compose_services({**env, "FARM_HOST": host})["services"]["worker-gpu0"]
            image = Image.of(DEPLOY / per_host["build"]["dockerfile"].removeprefix("deploy/"))
            mounts = {volume.split(":")[1]: tmp_path / host / volume.split(":")[0] for volume in per_host["volumes"]}
            token = tmp_path / host / "hf_token"
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text("")
            mounts |= {f"/run/secrets/{name}": token for name in per_host["secrets"]}
            worker_env = strip_port(rewrite(service_env(per_host, image, settings_dir), hosts, mounts))
            worker_env |= {"KLEINFARM_MODEL": str(tiny_model), "KLEINFARM_METRICS_PORT": "0"}
            workers[host] = processes.start(
                f"{host}-worker", as_local_command(image.entrypoint + per_host["command"]), worker_env
            )
        client_image = Image.of(DEPLOY / "Dockerfile.client")
        flower_port = free_port()
        for name in ("flower", "beat"):
            service = services[name]
            argv = client_image.entrypoint + service["command"]
            if name == "flower":
                argv[argv.index("--port") + 1], argv[argv.index("--address") + 1] = str(flower_port), "127.0.0.1"
            service_env_local = strip_port(rewrite(service_env(service, client_image, settings_dir), hosts, {}))
            processes.start(name, as_local_command(argv), service_env_local)

        settings = settings_of(worker_env)
        client = FarmClient(settings)
        registry = Registry(client.state, settings.worker_lapse_s)
        wait_for(
            lambda: {v.identity for v in registry.live_workers()} == {"host-a-gpu0", "host-b-gpu0"},
            "both hosts' workers",
            processes,
        )
        first_ids = {view.identity: view.worker_id for view in registry.live_workers()}
        Storage.from_settings(settings).client.head_bucket(Bucket=settings.s3_bucket)  # the workers created it
        auth = env["FLOWER_BASIC_AUTH"]
        wait_for(lambda: http_get(f"http://127.0.0.1:{flower_port}/", auth) is not None, "Flower", processes)

        render_small_campaign(client, jobs=4)

        assert {view.identity: view.worker_id for view in registry.live_workers()} == first_ids  # nobody retired
        assert client.state.redis.hgetall(keys.IDENTITIES) == first_ids
        assert all(process.poll() is None for process in processes.started.values()), processes.logs()[-4000:]
        assert "restarted as" not in processes.logs()


# -- k8s/ -----------------------------------------------------------------------------------------
def manifests() -> list[dict[str, Any]]:
    names = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [doc for name in names for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def pod_template(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return dict(doc["spec"]["template"])


def container_env(template: dict[str, Any], pod_name: str, secret: dict[str, str]) -> dict[str, str]:
    """What the kubelet gives the container: image ENV, envFrom, then env with $(VAR) expanded."""
    (container,) = template["spec"]["containers"]
    config = {doc["metadata"]["name"]: doc["data"] for doc in manifests() if doc["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= config[source["configMapRef"]["name"]]  # a missing ConfigMap fails here
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "kleinfarm-secrets" and ref["key"] in secret, ref
            env[item["name"]] = secret[ref["key"]]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
    return env


def services_named_in(env: dict[str, str]) -> set[tuple[str, int]]:
    return {
        (host, int(port)) for host, port in re.findall(r"://(?:[^@/]*@)?([a-z][\w-]*):(\d+)", " ".join(env.values()))
    }


def test_kubernetes_pods_reach_the_services_the_manifests_define_and_render(
    processes: Processes, tiny_model: Path, tmp_path: Path
) -> None:
    secret = env_lines(K8S / "secrets.env.example")
    secret.update(REDIS_PASSWORD=secrets.token_hex(16), MINIO_ROOT_PASSWORD=secrets.token_hex(16))
    secret.update(FLOWER_BASIC_AUTH=f"admin:{secrets.token_hex(8)}", HF_TOKEN="")
    defined = {
        (doc["metadata"]["name"], port["port"])
        for doc in manifests()
        if doc["kind"] == "Service"
        for port in doc["spec"]["ports"]
    }
    worker_env = container_env(pod_template("StatefulSet", "kleinfarm-worker"), "kleinfarm-worker-0", secret)
    exporter_env = container_env(pod_template("Deployment", "kleinfarm-exporter"), "kleinfarm-exporter-x", secret)
    for name in ("kleinfarm-flower", "kleinfarm-beat", "kleinfarm-exporter"):
        assert services_named_in(container_env(pod_template("Deployment", name), name, secret)) <= defined, name
    assert services_named_in(worker_env) == {("kleinfarm-redis", 6379), ("kleinfarm-minio", 9000)} <= defined

    redis_template = pod_template("StatefulSet", "kleinfarm-redis")
    redis_env = container_env(redis_template, "kleinfarm-redis-0", secret)
    redis_args = [
        re.sub(r"\$\((\w+)\)", lambda m: redis_env[m.group(1)], arg)
        for arg in redis_template["spec"]["containers"][0]["args"][1:]
    ]
    with PasswordRedis(redis_args, secret["REDIS_PASSWORD"]) as redis, S3Server() as s3:
        hosts = {"kleinfarm-redis": redis.port, "kleinfarm-minio": s3.port}
        (worker,) = pod_template("StatefulSet", "kleinfarm-worker")["spec"]["containers"]
        mounts = {mount["mountPath"]: tmp_path / "volumes" / mount["name"] for mount in worker["volumeMounts"]}
        image = Image.of(DEPLOY / "Dockerfile.worker")
        local = strip_port(rewrite({**image.env, **worker_env}, hosts, mounts))
        metrics_port = free_port()  # the pod's own 9400, the port its probes ask
        local |= {"KLEINFARM_MODEL": str(tiny_model), "KLEINFARM_METRICS_PORT": str(metrics_port)}
        processes.start("worker", as_local_command(image.entrypoint + worker["args"]), local)
        (exporter,) = pod_template("Deployment", "kleinfarm-exporter")["spec"]["containers"]
        exporter_port = free_port()
        argv = ["kleinfarm", *exporter["args"]]
        argv[argv.index("--port") + 1], argv[argv.index("--address") + 1] = str(exporter_port), "127.0.0.1"
        processes.start("exporter", as_local_command(argv), strip_port(rewrite(exporter_env, hosts, {})))

        settings = settings_of(local)
        client = FarmClient(settings)
        registry = Registry(client.state, settings.worker_lapse_s)
        wait_for(
            lambda: [v.identity for v in registry.live_workers()] == ["kleinfarm-worker-0"], "the worker pod", processes
        )
        assert http_get(f"http://127.0.0.1:{metrics_port}/metrics") is not None  # what its probes ask
        render_small_campaign(client, jobs=2)
        wait_for(
            lambda: "kleinfarm_farm_live_workers 1.0" in (http_get(f"http://127.0.0.1:{exporter_port}/metrics") or ""),
            "the exporter",
            processes,
            30,
        )
        lines = [
            json.loads(line)
            for line in (processes.log_dir / "worker.log").read_text().splitlines()
            if line.startswith("{")
        ]
        assert any(line.get("job") for line in lines)  # KLEINFARM_LOG_FORMAT=json from the ConfigMap
