"""Reading a local reference file safely, for the processes that may read the user's own disk: the
client at submit (which uploads it) and ``kleinfarm render``. Workers never read local paths."""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError

from kleinfarm.shared.errors import JobSpecError

# What the farm decodes (Pillow opens an MPO, the JPEG phone cameras write, through its JPEG parser).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")

# A FIFO opens without waiting for a writer (and is then refused by the fstat of what was opened).
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_LIMIT = "the limit is {} (KLEINFARM_REFERENCE_MAX_BYTES)"


class LocalFileError(JobSpecError):
    """A local reference file the client will not upload; the message names the path and why."""


def check_local_file(path: str, max_bytes: int) -> None:
    """Refuse a missing, irregular or oversize file from its metadata alone, before reading anything."""
    with _as_local_file_error(path):
        _check_stat(path, os.stat(path), max_bytes)  # follows links: a link to a FIFO is refused too


def read_local_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``LocalFileError`` otherwise."""
    with _as_local_file_error(path), os.fdopen(os.open(path, OPEN_FLAGS), "rb") as file:
        # Checked again on what was opened: the path may have been swapped since ``check_local_file``.
        _check_stat(path, os.fstat(file.fileno()), max_bytes)
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:  # files such as /proc/self/environ report a size of 0
        raise LocalFileError(f"{path} is over {max_bytes} bytes: {_LIMIT.format(max_bytes)}")
    return data


def _check_stat(path: str, status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise LocalFileError(f"{path} is {_kind(status.st_mode)}: a reference must be a regular file")
    if status.st_size > max_bytes:
        raise LocalFileError(f"{path} is {status.st_size} bytes: {_LIMIT.format(max_bytes)}")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


@contextmanager
def _as_local_file_error(path: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as error:
        raise LocalFileError(f"{path} does not exist") from error
    except OSError as error:
        raise LocalFileError(f"{path} cannot be read: {error.strerror or error}") from error


def check_image_bytes(path: str, data: bytes, max_pixels: int) -> None:
    """Refuse bytes that are not a PNG, JPEG or WebP image within ``max_pixels`` (header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise LocalFileError(f"{path} is not a PNG, JPEG or WebP image") from error
    if width * height > max_pixels:
        raise LocalFileError(
            f"{path} is {width}x{height} = {width * height} pixels: the limit is {max_pixels} "
            "(KLEINFARM_REFERENCE_MAX_PIXELS)"
        )
