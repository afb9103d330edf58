"""A contact sheet: the campaign's images on one PNG, so people see results, not a file list."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

THUMB = 192
LABEL = 18


def write_contact_sheet(images: list[Path], target: Path, columns: int = 6) -> Path | None:
    """Tile ``images`` as labelled thumbnails into ``target``; None if there are none."""
    if not images:
        return None
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, path in enumerate(images):
        with Image.open(path) as image:
            image.thumbnail((THUMB, THUMB))
            x, y = (index % columns) * THUMB, (index // columns) * (THUMB + LABEL)
            sheet.paste(image.convert("RGB"), (x + (THUMB - image.width) // 2, y))
        draw.text((x + 4, y + THUMB + 2), path.stem[:28], fill="black")
    sheet.save(target)
    return target
