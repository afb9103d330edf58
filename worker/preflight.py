"""What a worker checks before it loads the model: minutes of loading must not end in an error
that was there from the start (a cache it cannot write, storage it cannot reach, no bucket).

A worker that fails here exits at once with one line naming the folder or service and what to do,
instead of loading 29 GB, failing, restarting and loading again for ever.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from kleinfarm.shared.errors import ConfigError, StorageUnavailableError
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage

log = logging.getLogger(__name__)

# Storage that is still starting (MinIO beside the worker) is waited for this long, then reported.
STORAGE_WAITS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Create ``folder`` if needed and write a file in it, or raise ``ConfigError`` saying so."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kleinfarm-write-check-"):
            pass
    except OSError as error:
        owner = _owner(folder)
        raise ConfigError(
            f"{what} {folder} is not writable by uid {os.getuid()}{owner}: {error.strerror or error}; {fix}"
        ) from error


def _owner(folder: Path) -> str:
    """`` (owned by uid N, mode 755)`` of the nearest existing folder, or nothing."""
    for candidate in (folder, *folder.parents):
        try:
            info = candidate.stat()
        except OSError:
            continue
        return f" ({candidate} is owned by uid {info.st_uid}, mode {info.st_mode & 0o777:o})"
    return ""


def hub_cache(model: str) -> Path | None:
    """The Hugging Face cache a Hub id is downloaded into; None for a local folder or offline use."""
    if Path(model).is_dir():
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # nothing is downloaded; a missing model fails the load with the hub's message
    return Path(constants.HF_HUB_CACHE)


def preflight(settings: FarmSettings) -> None:
    """Every check a worker makes before loading the model; raises ``ConfigError`` or a storage error."""
    check_writable(
        settings.cache_dir,
        "KLEINFARM_CACHE_DIR",
        "create it owned by the worker's user, or point KLEINFARM_CACHE_DIR at a writable folder",
    )
    cache = hub_cache(settings.model)
    if cache is not None:
        check_writable(
            cache,
            "the Hugging Face cache (HF_HOME)",
            "give the model volume to the worker's user (chown, or fsGroup in Kubernetes), or set HF_HOME",
        )
    ensure_bucket(Storage.from_settings(settings))
    log.info("preflight passed: caches writable, bucket %s ready", settings.s3_bucket)


def ensure_bucket(storage: Storage) -> None:
    """Create the farm's bucket if missing (a fresh MinIO has none), waiting out storage that is
    still starting; a refusal (wrong keys, no right to create it) is raised at once."""
    for wait_s in (*STORAGE_WAITS_S, None):
        try:
            storage.ensure_bucket()
            return
        except StorageUnavailableError as error:
            if wait_s is None:
                raise
            log.warning("%s; trying again in %.0f s", error, wait_s)
            time.sleep(wait_s)
