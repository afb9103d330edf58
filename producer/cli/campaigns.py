"""Campaign commands: submit, status, results, cancel, pause, resume, retry, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kleinfarm.producer.cli.common import AsJson, EnvFile, app, farm_client, print_table, say
from kleinfarm.shared.records import COUNTS_ORDER, RESULT_FIELDS


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
    handle = farm_client(env_file).submit(campaign, progress=not as_json)
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
    counts = farm_client(env_file).campaign(campaign_id).status().as_dict()
    print(json.dumps(counts)) if as_json else _print_status(counts)


def _print_status(counts: dict[str, Any]) -> None:
    print_table(("campaign", *COUNTS_ORDER), [{"campaign": counts["campaign_id"], **counts}])
    if counts.get("waiting"):
        say(str(counts["waiting"]))
    if counts.get("failed_reason"):
        say(f"failed: {counts['failed_reason']}")


@app.command()
def results(
    campaign_id: str,
    as_json: AsJson = False,
    download: Annotated[Path | None, typer.Option(help="Copy the images into this folder")] = None,
    env_file: EnvFile = None,
) -> None:
    """One line per job: job_id, state, key, error, seed, width, height."""
    handle = farm_client(env_file).campaign(campaign_id)
    rows = handle.results()
    if download:
        from kleinfarm.producer.contact_sheet import write_contact_sheet

        files = handle.download(download)
        sheet = write_contact_sheet(files, download / "contact-sheet.png")
        say(f"{len(files)} image(s) in {download}; contact sheet: {sheet}")
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print_table(RESULT_FIELDS, rows)


@app.command()
def cancel(campaign_id: str, env_file: EnvFile = None) -> None:
    """Cancel a whole campaign: queued jobs are dropped, running ones stop at their next step."""
    dropped = farm_client(env_file).campaign(campaign_id).cancel()
    say(f"cancelled {campaign_id}: {dropped} queued job(s) dropped")


@app.command()
def pause(campaign_id: str, env_file: EnvFile = None) -> None:
    """Set a campaign's queued jobs aside; running jobs finish."""
    paused = farm_client(env_file).campaign(campaign_id).pause()
    say(f"paused {campaign_id}: {paused} queued job(s) set aside")


@app.command()
def resume(campaign_id: str, env_file: EnvFile = None) -> None:
    """Give a paused campaign's jobs back to the farm."""
    released = farm_client(env_file).campaign(campaign_id).resume()
    say(f"resumed {campaign_id}: {released} job(s) queued again")


@app.command()
def retry(
    campaign_id: str,
    failed: Annotated[bool, typer.Option("--failed", help="Requeue the failed jobs (the only mode)")] = False,
    env_file: EnvFile = None,
) -> None:
    """Requeue a campaign's failed jobs."""
    if not failed:
        say("say what to retry: --failed")
        raise typer.Exit(2)
    retried = farm_client(env_file).campaign(campaign_id).retry_failed()
    say(f"{campaign_id}: {retried} failed job(s) requeued")


@app.command()
def report(
    campaign_id: str,
    out: Annotated[Path | None, typer.Option(help="Also write the page here (default: report-<id>.html)")] = None,
    open_page: Annotated[bool, typer.Option("--open/--no-open", help="Open it in a browser")] = False,
    env_file: EnvFile = None,
) -> None:
    """Write the campaign's HTML contact sheet beside its images in S3, and here."""
    from kleinfarm.producer.report import write_report

    key, page = write_report(farm_client(env_file).campaign(campaign_id))
    target = out or Path(f"report-{campaign_id}.html")
    target.write_text(page)
    say(f"report: s3 key {key}; local copy {target.resolve()}")
    if open_page:
        import webbrowser

        webbrowser.open(target.resolve().as_uri())
