"""``kleinfarm render``: one job on this machine, no queue, same engine and checks as the farm."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from pydantic import ValidationError

from kleinfarm.shared.errors import JobSpecError, ReferenceImageError
from kleinfarm.shared.jobs import EditJob, GenerateJob, describe_validation_error
from kleinfarm.shared.local_files import LocalFileError, read_local_file
from kleinfarm.shared.locators import parse_locator
from kleinfarm.shared.refset import content_digest
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
    fetched = [_reference(fetcher, url, settings.reference_max_bytes) for url in references]
    engine = RenderEngine.load(model or settings.model, device)
    result = engine.render(job, fetched)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    return out, job.seed or 0


def _reference(fetcher: ReferenceFetcher, url: str, max_bytes: int) -> tuple[str, Image.Image]:
    """A reference's content digest and checked image. A local file is read here, not by the
    fetcher (which refuses every path a job names): this is the user's own process rendering the
    files they named, checked as the client checks a file it uploads and decoded as the farm does."""
    locator = parse_locator(url)
    if not locator.is_local:
        reference = fetcher.fetch(url)
        return reference.digest, reference.image
    try:
        data = read_local_file(locator.text, max_bytes)
    except LocalFileError as error:
        raise ReferenceImageError(f"reference {error}") from error
    return content_digest(data), fetcher.check(url, data)
