"""Model tools that need no farm: render one job here, write the tiny test model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kleinfarm.producer.cli.common import EnvFile, app, farm_settings, say


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
    say(f"wrote {path} (seed {seed_used})")


@app.command("make-tiny-model")
def make_tiny_model(
    folder: Path,
    kv: Annotated[bool, typer.Option("--kv/--no-kv", help="A KV checkpoint, or one without reuse (like 4B)")] = True,
) -> None:
    """Write a tiny random-weight FLUX.2 klein pipeline (images are noise; for tests and demos)."""
    from kleinfarm.worker.engine.random_model import make_tiny_model as build

    say(f"tiny model written to {build(folder, kv=kv)}")


@app.command("make-random-model")
def make_random_model(
    folder: Path,
    shape: Annotated[
        str, typer.Option(help="tiny, cpu (every width 1/8, true depth) or full (the 9B shapes)")
    ] = "tiny",
    device: Annotated[str, typer.Option(help="cpu (fp32) or cuda (bf16: the full shape needs ~34 GB)")] = "cpu",
) -> None:
    """Write a random-weight FLUX.2 klein KV pipeline of any shape, to load like the real one (``--model FOLDER``)."""
    from kleinfarm.worker.engine.random_model import SHAPES
    from kleinfarm.worker.engine.random_model import make_random_model as build

    if shape not in SHAPES:
        raise typer.BadParameter(f"--shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    say(f"{shape} random model written to {build(folder, SHAPES[shape], device=device)}")


@app.command("fetch-model")
def fetch_model(env_file: EnvFile = None) -> None:
    """Download KLEINFARM_MODEL at KLEINFARM_MODEL_REVISION into the Hugging Face cache (HF_HOME), once
    for every worker sharing it (HF_TOKEN for a gated model, read from the environment, never printed)."""
    from diffusers import DiffusionPipeline

    settings = farm_settings(env_file)
    folder = DiffusionPipeline.download(settings.model, revision=settings.model_revision)
    say(f"{settings.model} at {settings.model_revision or 'its default branch'} is in {folder}")
