"""Commands that run or inspect the farm's processes: worker, local, workers, flower, beat."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kleinfarm.producer.cli.common import AsJson, EnvFile, app, default_env_file, farm_client, print_table

WORKER_COLUMNS = (
    "worker",
    "device",
    "profile",
    "assigned",
    "KV sets (device/host)",
    "hits dev/host/miss",
    "speed",
    "job memory",
)


worker_app = typer.Typer(help="Run one GPU worker (one process per card); drain or undrain one.")
app.add_typer(worker_app, name="worker")


@worker_app.callback(invoke_without_command=True)
def worker(
    ctx: typer.Context,
    gpu: Annotated[int | None, typer.Option(help="CUDA device index to pin (default: CPU)")] = None,
    model: Annotated[str | None, typer.Option(help="Hub id or local folder (default: KLEINFARM_MODEL)")] = None,
    profile: Annotated[
        str | None, typer.Option(help="Memory profile: auto, large, rtx5090, rtx4090 or cpu (default: auto)")
    ] = None,
    env_file: EnvFile = None,
) -> None:
    """Run one GPU worker (one process per card)."""
    if ctx.invoked_subcommand is not None:
        return
    from kleinfarm.worker.main import run_worker

    run_worker(gpu=gpu, model=model, env_file=env_file or default_env_file(), profile=profile)


WorkerName = Annotated[str, typer.Argument(help="The worker's name (KLEINFARM_WORKER_NAME, as `workers` shows it)")]


@worker_app.command()
def drain(
    name: WorkerName,
    wait: Annotated[bool, typer.Option(help="Return once it holds no job")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most")] = 4 * 3600,
    env_file: EnvFile = None,
) -> None:
    """Stop handing NAME jobs: it finishes the one it runs, gives back any other, and stays loaded."""
    from kleinfarm.producer.operations import drain_worker

    drain_worker(farm_client(env_file), name, wait, timeout)


@worker_app.command()
def undrain(name: WorkerName, env_file: EnvFile = None) -> None:
    """Let a drained worker take jobs again."""
    from kleinfarm.producer.operations import undrain_worker

    undrain_worker(farm_client(env_file), name)


@app.command()
def exporter(
    port: Annotated[int, typer.Option(help="Port of the Prometheus endpoint")] = 9400,
    address: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    env_file: EnvFile = None,
) -> None:
    """Serve the farm's queue metrics (pending jobs, oldest pending age, live workers) for Prometheus."""
    from kleinfarm.producer.operations import run_exporter

    run_exporter(farm_client(env_file), port, address)


@app.command()
def local(
    workers: Annotated[int, typer.Option(help="Worker processes to start")] = 1,
    model: Annotated[str | None, typer.Option(help="Hub id or folder (default: a tiny model on CPU)")] = None,
    env_file: Annotated[Path, typer.Option(help="Where to write the KLEINFARM_* settings")] = Path(".kleinfarm.env"),
    demo: Annotated[bool, typer.Option(help="Submit examples/demo-campaign.yaml, show it, then stop")] = False,
    demo_file: Annotated[Path, typer.Option(help="Campaign the demo submits")] = Path("examples/demo-campaign.yaml"),
    out: Annotated[Path, typer.Option(help="Where the demo leaves its images")] = Path("kleinfarm-out"),
) -> None:
    """Run a whole farm on this machine: Redis, an S3 server, N workers. Ctrl-C stops it."""
    from kleinfarm.producer.localfarm.farm import LocalFarm, run_demo

    with LocalFarm(workers=workers, model=model, env_file=env_file) as farm:
        if demo:
            run_demo(farm, demo_file, out)
        else:
            farm.serve_until_interrupted()


@app.command()
def workers(as_json: AsJson = False, env_file: EnvFile = None) -> None:
    """Live workers: card, jobs assigned, reference sets cached per tier, cache hits and misses,
    measured speed and the memory a job may use on the card (--json: the largest square per reference count)."""
    from kleinfarm.shared.capacity import gib
    from kleinfarm.shared.registry import Registry

    client = farm_client(env_file)
    views = Registry(client.state, client.settings.worker_lapse_s).live_workers()
    if as_json:
        for view in views:
            engine = view.report.engine
            row = {
                "worker": view.worker_id,
                "device": view.report.device,
                "profile": engine.profile,
                "memory": engine.memory,
                "assigned": view.assigned,
                "kv_device": engine.kv.device.keys,
                "kv_host": engine.kv.host.keys,
                "kv_stats": engine.kv.stats,
                "capability": engine.capability.model_dump() if engine.capability else None,
                "largest_square": engine.capability.limits() if engine.capability else None,
            }
            print(json.dumps(row))
        return
    rows = []
    for view in views:
        engine, stats = view.report.engine, view.report.engine.kv.stats
        hits = f"{stats.get('hits_device', 0)}/{stats.get('hits_host', 0)}/{stats.get('misses', 0)}"
        sets = f"{len(engine.kv.device.keys)}/{len(engine.kv.host.keys)}"
        card = engine.capability
        speed = f"{card.speed:.2f}" if card else "-"
        room = gib(card.job_bytes) if card and card.job_bytes is not None else "no limit"
        values = (view.worker_id, view.report.device, engine.profile, view.assigned, sets, hits, speed, room)
        rows.append(dict(zip(WORKER_COLUMNS, values, strict=True)))
    print_table(WORKER_COLUMNS, rows)


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Port of Flower's web UI and API")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    env_file: EnvFile = None,
) -> None:
    """Start Flower on the farm, behind basic auth from KLEINFARM_FLOWER_BASIC_AUTH=user:password."""
    from kleinfarm.producer.flower import run_flower

    run_flower(port, address, env_file or default_env_file())


@app.command()
def beat(env_file: EnvFile = None) -> None:
    """Run the schedules (celery beat with redbeat, plus the task that submits their campaigns)."""
    from kleinfarm.producer.beat import run_beat

    run_beat(env_file or default_env_file())
