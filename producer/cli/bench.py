"""Benchmarks that print their figures as JSON: bench submit, kv, routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kleinfarm.producer.cli.common import app

bench_app = typer.Typer(help="Benchmarks that print their figures as JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("submit")
def bench_submit(
    jobs: int = 10_000,
    references: Annotated[int, typer.Option(help="References per job (0 = generate jobs)")] = 1,
    redis_url: Annotated[str | None, typer.Option(help="Redis to use (default: start a redis-server)")] = None,
) -> None:
    """Time validating and submitting a campaign of JOBS jobs."""
    from kleinfarm.producer.bench.submit import bench_submit as run_bench

    run_bench(jobs, redis_url, references)


@bench_app.command("kv")
def bench_kv(
    refs: Annotated[str, typer.Option(help="Reference counts, comma-separated")] = "1,2,4",
    full_size: Annotated[bool, typer.Option(help="The real 9B shapes, 1024 px (needs a large GPU)")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    repeat: Annotated[int, typer.Option(help="Timed jobs per mode; the fastest counts")] = 1,
) -> None:
    """Reference K/V kept across jobs vs. per-job KV vs. recomputing references every step."""
    from kleinfarm.worker.bench.kv import run

    run([int(count) for count in refs.split(",")], full_size, device, repeat)


@bench_app.command("card")
def bench_card(
    card: Annotated[str, typer.Option(help="rtx4090, rtx5090, or a card's memory in GiB")] = "rtx4090",
    shapes: Annotated[
        str, typer.Option(help="full (the 9B shapes, CUDA), cpu or tiny (a check of the script)")
    ] = "full",
    device: Annotated[str, typer.Option(help="cuda or cpu")] = "cuda",
    baselines: Annotated[bool, typer.Option(help="Also run diffusers' offloaded pipeline and the whole card")] = True,
) -> None:
    """One fixed stream of jobs on a card capped to a 24 or 32 GB card: seconds, K/V source, peak per job."""
    from kleinfarm.worker.bench.card import run

    run(card, shapes, device, baselines)


@bench_app.command("fp8")
def bench_fp8(
    shapes: Annotated[str, typer.Option(help="full (the 9B shapes), cpu or tiny")] = "full",
    device: Annotated[str, typer.Option(help="cuda or cpu")] = "cuda",
) -> None:
    """The transformer in bf16, stored as fp8 and computed in fp8: seconds and error against bf16."""
    from kleinfarm.worker.bench.fp8 import run

    run(shapes, device)


@bench_app.command("farm")
def bench_farm(
    jobs: int = 200,
    sets: Annotated[int, typer.Option(help="Reference sets (2 to 4 references each)")] = 8,
    size: Annotated[int, typer.Option(help="Output side in px (1024 with the full-size model)")] = 256,
    ref_px: Annotated[int, typer.Option(help="Reference side in px")] = 256,
    devices: Annotated[
        str, typer.Option(help="One worker per device, comma-separated: cpu,cpu or cuda:0,cuda:1")
    ] = "cpu,cpu",
    model: Annotated[str | None, typer.Option(help="Local folder or Hub id (default: the tiny random model)")] = None,
) -> None:
    """A whole farm on one campaign against a plain Celery farm running Flux2KleinKVPipeline per job."""
    from kleinfarm.producer.bench.farm import FarmPlan, run

    plan = FarmPlan(jobs=jobs, sets=sets, size=size, ref_px=ref_px, devices=tuple(devices.split(",")), model=model)
    summary = run(plan)
    raise typer.Exit(0 if summary["all_rendered"] else 1)


@bench_app.command("routing")
def bench_routing(
    workers: Annotated[int, typer.Option(help="Workers (GPUs) to simulate")] = 8,
    trace: Annotated[
        Path | None, typer.Option(help="JSONL trace: arrival_s, refset, num_refs, ref_px, width, height")
    ] = None,
    zipf: Annotated[float | None, typer.Option(help="Zipf exponent of a generated trace")] = None,
    bursty: Annotated[bool, typer.Option(help="A generated trace of whole campaigns arriving in bursts")] = False,
    mixed: Annotated[
        bool, typer.Option(help="The generated two-hour mixed day (examples/traces/mixed-2h.jsonl); --jobs unused")
    ] = False,
    jobs: Annotated[int, typer.Option(help="Jobs in a generated trace")] = 10_000,
    kv_gib: Annotated[float, typer.Option(help="Reference K/V budget per worker (device + host), GiB")] = 48.0,
    refsets: Annotated[int | None, typer.Option(help="Reference sets in a Zipf trace (default jobs/100)")] = None,
    seed: int = 1,
    write_trace: Annotated[Path | None, typer.Option(help="Also write the generated trace here")] = None,
    fleet: Annotated[
        str,
        typer.Option(
            help="uniform (every worker alike, --kv-gib each) or mixed (4090s, 5090s and a bigger card: "
            "own speeds, K/V budgets and job limits; --kv-gib unused)"
        ),
    ] = "uniform",
    large_share: Annotated[
        float | None,
        typer.Option(
            help="Share of a generated Zipf or bursty trace's jobs at 2048x2048 (default 0.02 on a mixed fleet)"
        ),
    ] = None,
) -> None:
    """Simulate every routing policy on one trace with the farm's own routing code (exit 1 if a job never ran)."""
    from kleinfarm.producer.bench.fleets import FLEETS
    from kleinfarm.producer.bench.routing import bench_routing as run_bench

    if fleet not in FLEETS:
        raise typer.BadParameter(f"unknown fleet {fleet!r}; known: {', '.join(FLEETS)}", param_hint="--fleet")
    results = run_bench(
        workers, trace, zipf, bursty, jobs, kv_gib, seed, write_trace, refsets, mixed, fleet, large_share
    )
    if any(row["unrun"] for row in results):
        raise typer.Exit(1)


@bench_app.command("chaos")
def bench_chaos(
    workers: Annotated[int, typer.Option(help="Worker processes")] = 2,
    jobs: Annotated[int, typer.Option(help="Jobs in the campaign (plus a few with bad input)")] = 40,
    kills: Annotated[int, typer.Option(help="Workers SIGKILLed mid-campaign (each replaced)")] = 2,
    outages: Annotated[int, typer.Option(help="S3 outages the workers meet")] = 2,
    outage_s: Annotated[float, typer.Option(help="Seconds each outage lasts")] = 3.0,
    seed: int = 1,
    model: Annotated[str | None, typer.Option(help="Hub id or folder (default: the tiny model)")] = None,
) -> None:
    """A whole local farm, one campaign, worker kills and S3 outages; checks every promise (exit 1 if broken)."""
    from kleinfarm.producer.bench.chaos import ChaosPlan, run_chaos

    plan = ChaosPlan(workers=workers, jobs=jobs, kills=kills, outages=outages, outage_s=outage_s, seed=seed)
    if not run_chaos(plan, model)["ok"]:
        raise typer.Exit(1)
