"""``kleinfarm bench chaos``: a whole farm on this machine, one campaign, and faults while it runs.

Workers are SIGKILLed mid-job and replaced; the S3 endpoint the workers use goes away for seconds
at a time (a cuttable proxy: connections reset, new ones refused). The farm's promises are then
checked, not assumed: every job ends; only the jobs whose input is bad fail, with their own
message; every image is in storage exactly once, written by its own job; the manifest lists every
job. It prints one JSON object and exits non-zero when a promise is broken.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from kleinfarm.producer.bench.proxy import CuttableProxy
from kleinfarm.producer.client import CampaignHandle, FarmClient
from kleinfarm.producer.localfarm.processes import Processes
from kleinfarm.producer.localfarm.services import RedisServer, S3Server, service_env, settings_of, tiny_model
from kleinfarm.shared.errors import FarmTimeoutError
from kleinfarm.shared.jobs import Campaign
from kleinfarm.shared.registry import Registry
from kleinfarm.shared.storage import Storage

console = Console(stderr=True)
REFS = Path(__file__).resolve().parents[2] / "examples" / "refs"
WORKER_START_S = 180.0
BUCKET = "chaos"


@dataclass(frozen=True)
class ChaosPlan:
    """How big the campaign is and which faults it meets."""

    workers: int = 2
    jobs: int = 40
    kills: int = 2
    outages: int = 2
    outage_s: float = 3.0
    gap_s: float = 4.0  # between two faults
    deadline_s: float = 900.0
    seed: int = 1


@dataclass
class Farm:
    """The processes of the chaos farm and how to reach them."""

    env: dict[str, str]
    client: FarmClient
    proxy: CuttableProxy
    log_dir: Path
    processes: Processes = field(init=False)

    def __post_init__(self) -> None:
        self.processes = Processes(self.log_dir)

    def start_worker(self) -> subprocess.Popen[bytes]:
        name = f"worker-{len(self.processes.children)}"
        return self.processes.start(name, [sys.executable, "-m", "kleinfarm.producer", "worker"], self.env)

    def live(self) -> list[subprocess.Popen[bytes]]:
        return self.processes.live()

    def wait_registered(self, processes: list[subprocess.Popen[bytes]]) -> None:
        registry = Registry(self.client.state, float(self.env["KLEINFARM_WORKER_LAPSE_S"]))
        wanted, deadline = {process.pid for process in processes}, time.monotonic() + WORKER_START_S
        while not wanted <= {view.report.pid for view in registry.live_workers()}:
            if time.monotonic() > deadline or any(process.poll() is not None for process in processes):
                raise RuntimeError(f"workers did not start; logs in {self.log_dir}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.processes.stop()


@contextmanager
def chaos_farm(plan: ChaosPlan, model: str | None, work: Path) -> Iterator[Farm]:
    """Redis, S3 behind a cuttable proxy, and ``plan.workers`` worker processes."""
    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        s3 = stack.enter_context(S3Server())
        proxy = stack.enter_context(CuttableProxy(("127.0.0.1", s3.port)))
        direct = service_env(redis_server, s3, BUCKET)
        settings = settings_of(direct)
        Storage.from_settings(settings).ensure_bucket()
        worker_env = {
            **direct,
            "KLEINFARM_S3_ENDPOINT_URL": proxy.url,  # only the workers go through the proxy
            "KLEINFARM_MODEL": model or tiny_model(work),
            "KLEINFARM_CACHE_DIR": str(work / "cache"),
            "KLEINFARM_HEARTBEAT_S": "0.5",
            "KLEINFARM_WORKER_LAPSE_S": "3",
        }
        farm = Farm(worker_env, FarmClient(settings), proxy, work)
        stack.callback(farm.stop)
        farm.wait_registered([farm.start_worker() for _ in range(plan.workers)])
        yield farm


def chaos_campaign(plan: ChaosPlan) -> tuple[Campaign, set[str]]:
    """Generates, edits over three shared sets, a multi-line prompt, and jobs whose input is bad."""
    rng = random.Random(plan.seed)
    sets = [[REFS / "product-mug.png"], [REFS / "product-lamp.png", REFS / "logo.png"], [REFS / "brand-background.png"]]
    jobs: list[dict[str, Any]] = []
    for index in range(plan.jobs):
        job: dict[str, Any] = {"id": f"job-{index:04d}", "prompt": f"product shot {index}", "seed": index}
        if rng.random() < 0.75:
            job["references"] = [str(path) for path in rng.choice(sets)]
        jobs.append(job)
    jobs.append({"id": "multi-line", "prompt": "a mug\non marble\n", "seed": 1})
    bad = {"missing-reference": f"s3://{BUCKET}/nowhere/gone.png"}
    jobs += [{"id": job_id, "prompt": "bad input", "references": [url]} for job_id, url in bad.items()]
    campaign = Campaign.from_raw("chaos", jobs, defaults={"width": 256, "height": 256})
    return campaign, set(bad)


def inject_faults(farm: Farm, handle: CampaignHandle, plan: ChaosPlan) -> list[dict[str, Any]]:
    """Kills and outages in a seeded order, one every ``gap_s``, while the campaign runs."""
    rng = random.Random(plan.seed)
    faults = ["kill"] * plan.kills + ["outage"] * plan.outages
    rng.shuffle(faults)
    done: list[dict[str, Any]] = []
    for fault in faults:
        time.sleep(plan.gap_s)
        if handle.status().finished:
            break
        done.append(_kill(farm, rng) if fault == "kill" else _outage(farm, plan))
        console.print(f"fault: {done[-1]}", markup=False, highlight=False)
    return done


def _kill(farm: Farm, rng: random.Random) -> dict[str, Any]:
    victim = rng.choice(farm.live())
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    replacement = farm.start_worker()
    return {"fault": "kill", "pid": victim.pid, "replacement": replacement.pid, "at": round(time.time(), 1)}


def _outage(farm: Farm, plan: ChaosPlan) -> dict[str, Any]:
    farm.proxy.cut()
    time.sleep(plan.outage_s)
    farm.proxy.restore()
    return {"fault": "s3-outage", "seconds": plan.outage_s, "at": round(time.time(), 1)}


def check_promises(handle: CampaignHandle, storage: Storage, bad: set[str]) -> dict[str, Any]:
    """What the campaign ended as, against what the farm promises."""
    status = handle.status()
    records = list(handle.client.state.jobs(handle.id))
    broken: list[str] = []
    if not status.done:
        broken.append(f"campaign not done: {status.as_dict()}")
    unexpected = [r.local_id for r in records if (r.state == "failed") != (r.local_id in bad)]
    broken += [f"{local_id} ended unexpectedly" for local_id in unexpected]
    blamed = [r.local_id for r in records if r.error and "internal error" in r.error]
    broken += [f"{local_id} failed as the worker's fault" for local_id in blamed]
    for record in records:
        if record.state == "succeeded" and (not record.key or storage.metadata(record.key).get("job") != record.job_id):
            broken.append(f"{record.local_id}: its image is missing or not its own")
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"kleinfarm/{handle.id}/")
    images = [item["Key"] for item in listed.get("Contents", []) if item["Key"].endswith(".png")]
    if len(images) != status.succeeded:
        broken.append(f"{len(images)} images in storage for {status.succeeded} succeeded jobs")
    return {
        "jobs": status.total,
        "succeeded": status.succeeded,
        "failed": status.failed,
        "expected_failed": len(bad),
        "max_attempt": max((record.attempt for record in records), default=0),
        "broken": broken,
    }


def run_chaos(plan: ChaosPlan, model: str | None = None) -> dict[str, Any]:
    """Run the campaign through the faults; return the figures (``ok`` False if a promise broke)."""
    with (
        tempfile.TemporaryDirectory(prefix="kleinfarm-chaos-") as folder,
        chaos_farm(plan, model, Path(folder)) as farm,
    ):
        campaign, bad = chaos_campaign(plan)
        started = time.monotonic()
        handle = farm.client.submit(campaign)
        faults = inject_faults(farm, handle, plan)
        try:
            handle.wait(progress=True, timeout=plan.deadline_s)
        except FarmTimeoutError as error:  # a stuck campaign is a finding, reported below with the rest
            console.print(f"campaign did not finish: {error}", markup=False, highlight=False)
        figures = check_promises(handle, farm.client.storage, bad)
        figures.update(
            workers=plan.workers,
            faults=faults,
            wall_s=round(time.monotonic() - started, 1),
            workers_alive_at_end=len(farm.live()),
            ok=not figures["broken"],
        )
    print(json.dumps(figures), flush=True)
    return figures
