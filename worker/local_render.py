"""``kleinfarm render``: one job on this machine, no queue, same engine and checks as the farm."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from kleinfarm.shared.errors import JobSpecError
from kleinfarm.shared.jobs import EditJob, GenerateJob, describe_validation_error
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage
from kleinfarm.worker.engine import RenderEngine
from kleinfarm.worker.references import ReferenceFetcher


def render_one(
    prompt: str,
    out: Path,
    model: str | None,
    references: list[str],
    width: int,
    height: int,
    seed: int | None,
    steps: int,
    device: str | None,
) -> tuple[Path, int]:
    """Render and write ``out``; return the file and the seed used."""
    settings = FarmSettings()
    fields = {"prompt": prompt, "width": width, "height": height, "seed": seed, "steps": steps}
    try:
        job: GenerateJob | EditJob = (
            EditJob.model_validate({**fields, "references": references})
            if references
            else GenerateJob.model_validate(fields)
        ).with_seed()
    except ValidationError as error:
        raise JobSpecError(describe_validation_error(error)) from error
    fetcher = ReferenceFetcher(Storage.from_settings(settings), settings)
    fetched = [fetcher.fetch(url) for url in references]
    engine = RenderEngine.load(model or settings.model, device)
    result = engine.render(job, [(ref.digest, ref.image) for ref in fetched])
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    return out, job.seed or 0
