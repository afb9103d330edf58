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


@bench_app.command("routing")
def bench_routing(
    workers: Annotated[int, typer.Option(help="Workers (GPUs) to simulate")] = 8,
    trace: Annotated[
        Path | None, typer.Option(help="JSONL trace: arrival_s, refset, num_refs, ref_px, width, height")
    ] = None,
    zipf: Annotated[float | None, typer.Option(help="Zipf exponent of a generated trace")] = None,
    bursty: Annotated[bool, typer.Option(help="A generated trace of whole campaigns arriving in bursts")] = False,
    jobs: Annotated[int, typer.Option(help="Jobs in a generated trace")] = 10_000,
    kv_gib: Annotated[float, typer.Option(help="Reference K/V budget per worker (device + host), GiB")] = 48.0,
    refsets: Annotated[int | None, typer.Option(help="Reference sets in a Zipf trace (default jobs/100)")] = None,
    seed: int = 1,
    write_trace: Annotated[Path | None, typer.Option(help="Also write the generated trace here")] = None,
) -> None:
    """Simulate every routing policy on one trace with the farm's own routing code."""
    from kleinfarm.producer.bench.routing import bench_routing as run_bench

    run_bench(workers, trace, zipf, bursty, jobs, kv_gib, seed, write_trace, refsets)
