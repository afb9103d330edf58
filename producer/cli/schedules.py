"""Scheduled bulk product edits: schedule add, list, remove, run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kleinfarm.producer.cli.common import AsJson, EnvFile, app, farm_client, say

schedule_app = typer.Typer(help="Scheduled bulk product edits.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("add")
def schedule_add(file: Path, env_file: EnvFile = None) -> None:
    """Add (or replace) the schedule in a YAML file."""
    from kleinfarm.producer.campaign_files import load_schedule
    from kleinfarm.producer.schedules import ScheduleBook

    schedule = load_schedule(file)
    ScheduleBook(farm_client(env_file)).add(schedule)
    say(f"schedule {schedule.name} added: {schedule.cron}")


@schedule_app.command("list")
def schedule_list(as_json: AsJson = False, env_file: EnvFile = None) -> None:
    """The schedules, with their last run."""
    from kleinfarm.producer.schedules import ScheduleBook

    book = ScheduleBook(farm_client(env_file))
    for schedule in book.schedules():
        runs = book.runs(schedule.name)
        row = {**schedule.model_dump(), "last_run": runs[-1] if runs else None}
        print(
            json.dumps(row) if as_json else f"{schedule.name}  {schedule.cron}  {schedule.source} -> {schedule.output}"
        )


@schedule_app.command("remove")
def schedule_remove(name: str, env_file: EnvFile = None) -> None:
    """Remove a schedule and its beat entry."""
    from kleinfarm.producer.schedules import ScheduleBook

    ScheduleBook(farm_client(env_file)).remove(name)
    say(f"schedule {name} removed")


@schedule_app.command("run")
def schedule_run(
    name: str,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the campaign")] = False,
    env_file: EnvFile = None,
) -> None:
    """Run a schedule now; print the campaign it submitted (nothing if every photo is done)."""
    from kleinfarm.producer.schedules import ScheduleBook

    handle = ScheduleBook(farm_client(env_file)).run(name)
    if handle is None:
        say(f"schedule {name}: no new photos")
        return
    print(handle.id, flush=True)
    if wait:
        status = handle.wait(progress=True)
        raise typer.Exit(0 if status.succeeded == status.total else 1)
