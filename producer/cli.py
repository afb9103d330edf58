"""The ``kleinfarm`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kleinfarm.shared.errors import KleinfarmError
from kleinfarm.shared.manifest import RESULT_FIELDS

app = typer.Typer(
    help="kleinfarm: a render farm for FLUX.2 \\[klein] 9B-KV.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console(stderr=True)
EnvFile = Annotated[Path | None, typer.Option("--env-file", help="KLEINFARM_* settings file (e.g. .kleinfarm.env)")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]


def _fail(error: KleinfarmError) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
    sys.exit(2)


def _client(env_file: Path | None) -> Any:
    from kleinfarm.producer.client import FarmClient

    return FarmClient.from_env(env_file or _default_env_file())


def _default_env_file() -> Path | None:
    """``kleinfarm local`` writes ``.kleinfarm.env`` here; use it when present."""
    path = Path(".kleinfarm.env")
    return path if path.is_file() else None


@app.command()
def submit(
    file: Path,
    wait: Annotated[bool, typer.Option("--wait", help="Wait; exit 0 only if every job succeeded")] = False,
    as_json: AsJson = False,
    name: Annotated[str | None, typer.Option(help="Campaign name (default: from the file)")] = None,
    env_file: EnvFile = None,
) -> None:
    """Submit a campaign file (YAML or JSONL) and print its id."""
    from kleinfarm.producer.campaign_files import load_campaign

    campaign = load_campaign(file, name)
    handle = _client(env_file).submit(campaign)
    print(json.dumps({"campaign_id": handle.id, "jobs": len(campaign.jobs)}) if as_json else handle.id, flush=True)
    if wait:
        status = handle.wait(progress=not as_json)
        if as_json:
            print(json.dumps(status.as_dict()))
        else:
            _print_status(status.as_dict())
        raise typer.Exit(0 if status.succeeded == status.total else 1)


@app.command()
def status(campaign_id: str, as_json: AsJson = False, env_file: EnvFile = None) -> None:
    """Counts by state: total, pending, running, succeeded, failed, cancelled."""
    counts = _client(env_file).campaign(campaign_id).status().as_dict()
    print(json.dumps(counts)) if as_json else _print_status(counts)


def _print_status(counts: dict[str, Any]) -> None:
    table = Table("campaign", "total", "pending", "running", "succeeded", "failed", "cancelled")
    table.add_row(
        *(
            str(counts[key])
            for key in ("campaign_id", "total", "pending", "running", "succeeded", "failed", "cancelled")
        )
    )
    Console().print(table)


@app.command()
def results(
    campaign_id: str,
    as_json: AsJson = False,
    download: Annotated[Path | None, typer.Option(help="Copy the images into this folder")] = None,
    env_file: EnvFile = None,
) -> None:
    """One line per job: job_id, state, key, error, seed, width, height."""
    handle = _client(env_file).campaign(campaign_id)
    rows = handle.results()
    if download:
        files = handle.download(download)
        from kleinfarm.producer.contact_sheet import write_contact_sheet

        sheet = write_contact_sheet(files, download / "contact-sheet.png")
        console.print(f"{len(files)} image(s) in {download}; contact sheet: {sheet}")
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table(*RESULT_FIELDS)
    for row in rows:
        table.add_row(*("" if row[field] is None else str(row[field]) for field in RESULT_FIELDS))
    Console().print(table)


@app.command()
def cancel(campaign_id: str, env_file: EnvFile = None) -> None:
    """Cancel a whole campaign: queued jobs are dropped, running ones stop at their next step."""
    dropped = _client(env_file).campaign(campaign_id).cancel()
    console.print(f"cancelled {campaign_id}: {dropped} queued job(s) dropped")


@app.command()
def workers(as_json: AsJson = False, env_file: EnvFile = None) -> None:
    """Live workers: card, jobs held, reference sets cached per tier, cache hits and misses."""
    from kleinfarm.shared.registry import Registry

    client = _client(env_file)
    rows = []
    for view in Registry(client.state, client.settings.worker_lapse_s).live_workers():
        engine = json.loads(view.info.get("engine", "{}"))
        kv = engine.get("kv", {})
        rows.append(
            {
                "worker": view.worker_id,
                "device": view.info.get("device"),
                "profile": engine.get("profile"),
                "memory": engine.get("memory", {}),
                "assigned": view.assigned,
                "kv_device": kv.get("device", {}).get("keys", {}),
                "kv_host": kv.get("host", {}).get("keys", {}),
                "kv_stats": kv.get("stats", {}),
            }
        )
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table("worker", "device", "profile", "assigned", "KV sets (device/host)", "hits dev/host/miss")
    for row in rows:
        stats = row["kv_stats"]
        table.add_row(
            row["worker"],
            str(row["device"]),
            str(row["profile"]),
            str(row["assigned"]),
            f"{len(row['kv_device'])}/{len(row['kv_host'])}",
            f"{stats.get('hits_device', 0)}/{stats.get('hits_host', 0)}/{stats.get('misses', 0)}",
        )
    Console().print(table)


@app.command()
def report(
    campaign_id: str,
    out: Annotated[Path | None, typer.Option(help="Also write the page here (default: report-<id>.html)")] = None,
    open_page: Annotated[bool, typer.Option("--open/--no-open", help="Open it in a browser")] = False,
    env_file: EnvFile = None,
) -> None:
    """Write the campaign's HTML contact sheet beside its images in S3, and here."""
    from kleinfarm.producer.report import write_report

    key, page = write_report(_client(env_file).campaign(campaign_id))
    target = out or Path(f"report-{campaign_id}.html")
    target.write_text(page)
    console.print(f"report: s3 key {key}; local copy {target.resolve()}")
    if open_page:
        import webbrowser

        webbrowser.open(target.resolve().as_uri())


@app.command()
def pause(campaign_id: str, env_file: EnvFile = None) -> None:
    """Hold a campaign's queued jobs; running jobs finish."""
    held = _client(env_file).campaign(campaign_id).pause()
    console.print(f"paused {campaign_id}: {held} queued job(s) held")


@app.command()
def resume(campaign_id: str, env_file: EnvFile = None) -> None:
    """Give a paused campaign's held jobs back to the farm."""
    released = _client(env_file).campaign(campaign_id).resume()
    console.print(f"resumed {campaign_id}: {released} job(s) queued again")


@app.command()
def retry(
    campaign_id: str,
    failed: Annotated[bool, typer.Option("--failed", help="Requeue the failed jobs (the only mode)")] = False,
    env_file: EnvFile = None,
) -> None:
    """Requeue a campaign's failed jobs."""
    if not failed:
        console.print("say what to retry: --failed")
        raise typer.Exit(2)
    retried = _client(env_file).campaign(campaign_id).retry_failed()
    console.print(f"{campaign_id}: {retried} failed job(s) requeued")


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Port of Flower's web UI and API")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    env_file: EnvFile = None,
) -> None:
    """Start Flower on the farm, behind basic auth from KLEINFARM_FLOWER_BASIC_AUTH=user:password."""
    from kleinfarm.worker.monitor import run_flower

    run_flower(port, address, env_file or _default_env_file())


@app.command()
def worker(
    gpu: Annotated[int | None, typer.Option(help="CUDA device index to pin (default: CPU)")] = None,
    model: Annotated[str | None, typer.Option(help="Hub id or local folder (default: KLEINFARM_MODEL)")] = None,
    profile: Annotated[
        str | None, typer.Option(help="Memory profile: auto, large, rtx5090, rtx4090 or cpu (default: auto)")
    ] = None,
    env_file: EnvFile = None,
) -> None:
    """Run one GPU worker (one process per card)."""
    from kleinfarm.worker.main import run_worker

    run_worker(gpu=gpu, model=model, env_file=env_file or _default_env_file(), profile=profile)


@app.command()
def render(
    prompt: Annotated[str, typer.Option(help="The prompt")],
    out: Annotated[Path, typer.Option(help="PNG file to write")],
    model: Annotated[str | None, typer.Option(help="Hub id or local folder")] = None,
    ref: Annotated[list[str] | None, typer.Option(help="Reference image (repeat, up to 4)")] = None,
    width: int = 1024,
    height: int = 1024,
    seed: int | None = None,
    steps: int = 4,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1 or cpu (default: cuda if present)")] = None,
) -> None:
    """Render one job locally, without Redis, Celery or S3."""
    from kleinfarm.worker.local_render import render_one

    path, seed_used = render_one(prompt, out, model, ref or [], width, height, seed, steps, device)
    console.print(f"wrote {path} (seed {seed_used})")


@app.command("make-tiny-model")
def make_tiny_model(
    folder: Path,
    kv: Annotated[bool, typer.Option("--kv/--no-kv", help="A KV checkpoint, or one without reuse (like 4B)")] = True,
) -> None:
    """Write a tiny random-weight FLUX.2 klein pipeline (images are noise; for tests and demos)."""
    from kleinfarm.worker.tiny_model import make_tiny_model as build

    console.print(f"tiny model written to {build(folder, kv=kv)}")


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
    from kleinfarm.producer.local import LocalFarm, run_demo

    with LocalFarm(workers=workers, model=model, env_file=env_file) as farm:
        if demo:
            run_demo(farm, demo_file, out)
        else:
            farm.serve_until_interrupted()


schedule_app = typer.Typer(help="Scheduled bulk product edits.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("add")
def schedule_add(file: Path, env_file: EnvFile = None) -> None:
    """Add (or replace) the schedule in a YAML file."""
    from kleinfarm.producer.schedules import ScheduleBook
    from kleinfarm.shared.schedules import Schedule

    schedule = _load_schedule(file, Schedule)
    ScheduleBook(_client(env_file)).add(schedule)
    console.print(f"schedule {schedule.name} added: {schedule.cron}")


def _load_schedule(file: Path, model: Any) -> Any:
    import yaml
    from pydantic import ValidationError

    from kleinfarm.producer.campaign_files import resolve_local_references
    from kleinfarm.shared.errors import CampaignFileError
    from kleinfarm.shared.jobs import describe_validation_error

    try:
        document = yaml.safe_load(file.read_text())
        if isinstance(document, dict):
            document = resolve_local_references(document, file.parent)
        return model.model_validate(document)
    except (OSError, yaml.YAMLError) as error:
        raise CampaignFileError(f"{file}: {error}") from error
    except ValidationError as error:
        raise CampaignFileError(describe_validation_error(error, source=f"{file}: ")) from error


@schedule_app.command("list")
def schedule_list(as_json: AsJson = False, env_file: EnvFile = None) -> None:
    """The schedules, with their last run."""
    from kleinfarm.producer.schedules import ScheduleBook

    book = ScheduleBook(_client(env_file))
    for schedule in book.schedules():
        runs = book.runs(schedule.name)
        row = {**schedule.model_dump(), "last_run": runs[-1] if runs else None}
        print(
            json.dumps(row) if as_json else f"{schedule.name}  {schedule.cron}  {schedule.source} -> {schedule.output}"
        )


@schedule_app.command("remove")
def schedule_remove(name: str, env_file: EnvFile = None) -> None:
    from kleinfarm.producer.schedules import ScheduleBook

    ScheduleBook(_client(env_file)).remove(name)
    console.print(f"schedule {name} removed")


@schedule_app.command("run")
def schedule_run(
    name: str,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the campaign")] = False,
    env_file: EnvFile = None,
) -> None:
    """Run a schedule now; print the campaign it submitted (nothing if every photo is done)."""
    from kleinfarm.producer.schedules import ScheduleBook

    handle = ScheduleBook(_client(env_file)).run(name)
    if handle is None:
        console.print(f"schedule {name}: no new photos")
        return
    print(handle.id, flush=True)
    if wait:
        status = handle.wait(progress=True)
        raise typer.Exit(0 if status.succeeded == status.total else 1)


@app.command()
def beat(env_file: EnvFile = None) -> None:
    """Run the schedules (celery beat with redbeat, plus the task that submits their campaigns)."""
    from kleinfarm.producer.beat import run_beat

    run_beat(env_file or _default_env_file())


bench_app = typer.Typer(help="Benchmarks that print their figures as JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("submit")
def bench_submit(
    jobs: int = 10_000,
    references: Annotated[int, typer.Option(help="References per job (0 = generate jobs)")] = 1,
    redis_url: Annotated[str | None, typer.Option(help="Redis to use (default: start a redis-server)")] = None,
) -> None:
    """Time validating and submitting a campaign of JOBS jobs."""
    from kleinfarm.producer.bench import bench_submit as run_bench

    run_bench(jobs, redis_url, references)


@bench_app.command("kv")
def bench_kv(
    refs: Annotated[str, typer.Option(help="Reference counts, comma-separated")] = "1,2,4",
    full_size: Annotated[bool, typer.Option(help="The real 9B shapes, 1024 px (needs a large GPU)")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    repeat: Annotated[int, typer.Option(help="Timed jobs per mode; the fastest counts")] = 1,
) -> None:
    """Reference K/V kept across jobs vs. per-job KV vs. recomputing references every step."""
    from kleinfarm.worker.bench_kv import run

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
    from kleinfarm.producer.bench_routing import bench_routing as run_bench

    run_bench(workers, trace, zipf, bursty, jobs, kv_gib, seed, write_trace, refsets)


def main() -> None:
    """Every command's farm error ends the same way: its message on stderr, exit status 2."""
    try:
        sys.exit(app())
    except KleinfarmError as error:
        _fail(error)
