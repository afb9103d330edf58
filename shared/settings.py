"""Settings read from ``KLEINFARM_*`` environment variables (and an optional env file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "black-forest-labs/FLUX.2-klein-9b-kv"


class FarmSettings(BaseSettings):
    """Everything a producer or a worker needs to reach the farm."""

    model_config = SettingsConfigDict(env_prefix="KLEINFARM_", extra="ignore")

    # A server (redis://, rediss://) or Sentinels (sentinel://HOST:PORT;sentinel://...): shared/redis_urls.py.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_sentinel_master: str = "kleinfarm"  # the master's name the Sentinels monitor
    redis_sentinel_password: SecretStr | None = None  # the Sentinels' own requirepass, if any
    s3_endpoint_url: str | None = None
    s3_bucket: str = "kleinfarm"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    output_prefix: str = "kleinfarm"

    model: str = DEFAULT_MODEL
    # A Hub branch, tag or (best) commit of ``model``, passed to from_pretrained(revision=...), so
    # every worker of the farm renders with the same weights; None = the default branch.
    model_revision: str | None = None
    gpu: int | None = Field(default=None, description="CUDA device index the worker pins; None = CPU")
    worker_name: str | None = Field(
        default=None, description="identity of this worker's card, stable across restarts (default: host and GPU)"
    )
    profile: Literal["auto", "large", "rtx5090", "rtx4090", "cpu"] = "auto"
    # MiB of its card a worker may use (default: the card's, or the allocator's cap; on CPU no limit):
    # what decides which jobs it accepts and when it moves cached K/V off the card before a job.
    card_memory_mb: int | None = Field(default=None, gt=0)
    # The rtx4090 profile's transformer: "storage" keeps fp8 weights and computes in bf16 (diffusers'
    # layerwise casting); "compute" multiplies in fp8 (``torch._scaled_mm``, Ada/Hopper/Blackwell).
    fp8: Literal["storage", "compute"] = "storage"
    # Cost-model seconds this card renders per second, before its own renders have measured it.
    speed: float = Field(default=1.0, gt=0)
    # Cache budgets in MiB; unset = from the memory profile and what the card has free.
    kv_device_budget_mb: int | None = None
    kv_host_budget_mb: int | None = None
    prompt_cache_mb: int | None = None
    # Workers sharing this machine's (or container's) memory: each takes this share of it for its
    # host-side caches (one container per card, each with its own memory limit: leave 1).
    host_workers: int = Field(default=1, ge=1)
    cache_dir: Path = Path.home() / ".cache" / "kleinfarm"
    # Bytes of checked reference images a worker keeps on disk (under cache_dir), least recently
    # used evicted first; workers sharing the folder share the budget.
    reference_cache_mb: int = Field(default=4096, ge=0)

    reference_max_bytes: int = 50 * 1024 * 1024
    reference_max_pixels: int = 40_000_000
    # Buckets s3:// references may name besides the farm's own, comma-separated.
    reference_buckets: str = ""
    # Hosts or networks (names, addresses, CIDRs; comma-separated) that https:// references may
    # reach although they are loopback, private, link-local or reserved; empty = none.
    reference_allow_hosts: str = ""
    # Seconds a whole https:// fetch may take (connect, redirects and every read together).
    reference_fetch_deadline_s: float = 30.0
    # A CA bundle for https:// references served under a private CA (default: the system's).
    reference_ca_bundle: Path | None = None
    # Where a producer uploads the local files a campaign names, by content, in the farm's bucket.
    reference_upload_prefix: str = "kleinfarm-refs"

    # "user:password" for Flower's basic auth; Flower refuses to start without it.
    flower_basic_auth: SecretStr | None = None

    metrics_port: int | None = Field(default=None, description="worker's Prometheus port; 0 picks a free one")

    # "json": one JSON object per log line, carrying the worker, campaign and job ids.
    log_format: Literal["text", "json"] = "text"

    heartbeat_s: float = 2.0
    worker_lapse_s: float = 10.0
    # Longer than the longest job, or kombu redelivers a running task (celery #5306, #5935).
    visibility_timeout_s: int = 4 * 3600
    worker_slots: int = Field(default=2, description="jobs a worker may hold: one running, one waiting")
    # A job that meets a transient fault (storage, network, Redis) waits backoff_s, then twice that,
    # ... up to backoff_max_s, and fails with the last message after transient_retries of them.
    transient_retries: int = Field(default=6, ge=0)
    transient_backoff_s: float = Field(default=2.0, gt=0)
    transient_backoff_max_s: float = Field(default=60.0, gt=0)
    # Which routing policy the dispatcher applies (kleinfarm.shared.routing.POLICIES); the
    # baselines are there to compare against, ``kleinfarm`` is the farm's own.
    routing_policy: str = "kleinfarm"

    @field_validator("output_prefix")
    @classmethod
    def _safe_prefix(cls, prefix: str) -> str:
        from kleinfarm.shared.jobs import check_output_prefix

        return check_output_prefix(prefix)

    @field_validator("routing_policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from kleinfarm.shared.routing import POLICIES

        if name not in POLICIES:
            raise ValueError(f"routing_policy {name!r} is not one of {', '.join(POLICIES)}")
        return name

    @property
    def allowed_reference_buckets(self) -> frozenset[str]:
        named = {bucket.strip() for bucket in self.reference_buckets.split(",") if bucket.strip()}
        return frozenset(named | {self.s3_bucket})  # the client uploads local references there

    @property
    def allowed_reference_hosts(self) -> tuple[str, ...]:
        return tuple(host.strip() for host in self.reference_allow_hosts.split(",") if host.strip())

    @classmethod
    def from_env(cls, env_file: Path | None = None) -> FarmSettings:
        """Read the environment, then ``env_file`` for anything the environment leaves unset."""
        return cls(_env_file=env_file) if env_file else cls()  # type: ignore[call-arg]
