"""The worker's reference disk cache (real S3 server): checked bytes only, within a byte budget, least
recently used evicted first; and the JPEG flavours phone cameras write."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from kleinfarm.shared.errors import ReferenceInvalidError
from kleinfarm.shared.refset import content_digest
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage
from kleinfarm.worker.references import ReferenceFetcher

NOISE_SIDE = 400  # a noise PNG of 400x400 is about 480 KB: two fit in 1 MiB, three do not


def noise_png() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (NOISE_SIDE, NOISE_SIDE), os.urandom(NOISE_SIDE * NOISE_SIDE * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(storage: Storage, data: bytes, suffix: str = ".png") -> str:
    key = f"cache-test/{uuid.uuid4().hex}{suffix}"
    storage.client.put_object(Bucket=storage.bucket, Key=key, Body=data)
    return f"s3://{storage.bucket}/{key}"


def cached_digests(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")}


@pytest.fixture()
def make_fetcher(storage: Storage, settings: FarmSettings, tmp_path: Path) -> Callable[..., ReferenceFetcher]:
    def make(budget_mb: int = 1) -> ReferenceFetcher:
        return ReferenceFetcher(
            storage, settings.model_copy(update={"cache_dir": tmp_path, "reference_cache_mb": budget_mb})
        )

    return make


def test_the_cache_keeps_to_its_byte_budget_evicting_the_least_recently_used(
    make_fetcher: Callable[..., ReferenceFetcher], storage: Storage, tmp_path: Path
) -> None:
    fetcher: ReferenceFetcher = make_fetcher()
    images = [noise_png() for _ in range(3)]
    first, second, third = (upload(storage, data) for data in images)
    digests = [content_digest(data) for data in images]
    fetcher.fetch(first)
    fetcher.fetch(second)
    fetcher.fetch(first)  # a hit: the first is now the most recently used
    fetcher.fetch(third)
    folder = tmp_path / "references"
    assert cached_digests(folder) == {digests[0], digests[2]}  # the second went
    assert fetcher.cache.used_bytes() <= 1 << 20
    assert fetcher.fetch(second).digest == digests[1]  # fetched again from S3, and kept again
    assert cached_digests(folder) == {digests[2], digests[1]}


def test_bytes_that_fail_the_checks_never_reach_the_cache(
    make_fetcher: Callable[..., ReferenceFetcher], storage: Storage, tmp_path: Path
) -> None:
    fetcher: ReferenceFetcher = make_fetcher(budget_mb=64)
    good = noise_png()
    truncated = upload(storage, good[: len(good) // 2])
    with pytest.raises(ReferenceInvalidError, match="truncated or corrupt"):
        fetcher.fetch(truncated)
    folder = tmp_path / "references"
    assert cached_digests(folder) == set() and cached_digests(folder / "s3") == set()


def test_a_zero_budget_keeps_nothing(
    make_fetcher: Callable[..., ReferenceFetcher], storage: Storage, tmp_path: Path
) -> None:
    fetcher: ReferenceFetcher = make_fetcher(budget_mb=0)
    assert fetcher.fetch(upload(storage, noise_png())).image.size == (NOISE_SIDE, NOISE_SIDE)
    assert cached_digests(tmp_path / "references") == set()


def test_a_phone_cameras_mpo_jpeg_is_accepted_as_a_jpeg(
    make_fetcher: Callable[..., ReferenceFetcher], storage: Storage
) -> None:
    fetcher: ReferenceFetcher = make_fetcher()
    buffer = io.BytesIO()
    front, depth = Image.new("RGB", (320, 240), "orange"), Image.new("RGB", (320, 240), "gray")
    front.save(buffer, format="MPO", save_all=True, append_images=[depth])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"  # what Pillow calls it
    reference = fetcher.fetch(upload(storage, buffer.getvalue(), ".jpg"))
    assert reference.image.size == (320, 240) and reference.image.getpixel((10, 10))[0] > 200  # the front frame


def test_a_format_other_than_png_jpeg_or_webp_is_refused_without_trying_other_parsers(
    make_fetcher: Callable[..., ReferenceFetcher],
) -> None:
    fetcher: ReferenceFetcher = make_fetcher()
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), "red").save(buffer, format="GIF")
    with pytest.raises(ReferenceInvalidError, match=r"is not an image \(PNG, JPEG or WebP\)"):
        fetcher.check("s3://b/a.gif", buffer.getvalue())
