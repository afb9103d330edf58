"""How much host memory one worker may use for its caches, and the budgets that follow.

The engine's profiles size the host K/V tier from the machine's physical memory, which a container
does not own: a container limited to 64 GiB on a 1 TiB machine, or two workers on one machine,
would each plan for a quarter of the machine, beside a 16 GB text encoder held in host memory on
the rtx4090/rtx5090 profiles, and meet the OOM killer. So the worker reads its cgroup's memory
limit (v2 or v1), divides what it may use among the workers sharing it (``KLEINFARM_HOST_WORKERS``),
subtracts what its model already holds in host memory and a process overhead, and caps the host
tier there. Each ``KLEINFARM_*_BUDGET_MB`` variable set alone overrides its own budget.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kleinfarm.shared.settings import FarmSettings

if TYPE_CHECKING:
    from kleinfarm.worker.engine import RenderEngine

log = logging.getLogger(__name__)

GIB = 1 << 30
# The interpreter, torch and the CUDA context, pinned staging, a job's images: host memory every
# worker needs besides its weights and caches.
PROCESS_OVERHEAD = 4 * GIB
# cgroup v1 reports "no limit" as a huge number (a page-rounded 2^63 - 1).
UNLIMITED = 1 << 60
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def physical_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """The memory limit of this process's cgroup (the lowest on its path), or None if there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    limits: list[int] = []
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            limits += _limits_on_path(root, path, "memory.max")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            limits += _limits_on_path(root / "memory", path, "memory.limit_in_bytes")
    if not lines:  # no /proc (or unreadable): the namespace's own root files
        limits += _read_limit(root / "memory.max") + _read_limit(root / "memory" / "memory.limit_in_bytes")
    return min(limits) if limits else None


def _limits_on_path(root: Path, path: str, name: str) -> list[int]:
    """Every limit from ``root/path`` up to ``root``: an ancestor's limit binds its children too.

    Inside a container's cgroup namespace the path is ``/`` and the container's limit is at the root."""
    folder = root / path.strip("/")
    limits: list[int] = []
    for candidate in (folder, *folder.parents):
        limits += _read_limit(candidate / name)
        if candidate == root:
            break
    return limits


def _read_limit(path: Path) -> list[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return []
    if not text or text == "max" or not text.isdigit() or int(text) >= UNLIMITED:
        return []
    return [int(text)]


@dataclass(frozen=True)
class HostShare:
    """This worker's share of host memory and where the figure came from."""

    total: int  # the machine's memory, or the cgroup limit if lower
    source: str  # "cgroup" or "physical"
    workers: int
    share: int

    @classmethod
    def measure(cls, settings: FarmSettings, limit: int | None = None, physical: int | None = None) -> HostShare:
        physical = physical_memory() if physical is None else physical
        limit = cgroup_memory_limit() if limit is None else limit
        total, source = (limit, "cgroup") if limit is not None and limit < physical else (physical, "physical")
        return cls(total, source, settings.host_workers, total // settings.host_workers)


def host_resident_bytes(pipeline: Any) -> int:
    """Bytes of the pipeline's weights held in host memory (a streamed text encoder, or all on CPU)."""
    seen: set[int] = set()
    total = 0
    for component in getattr(pipeline, "components", {}).values():
        tensors = [*getattr(component, "parameters", list)(), *getattr(component, "buffers", list)()]
        for tensor in tensors:
            if tensor.device.type == "cpu" and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.nbytes
    return total


@dataclass(frozen=True)
class Budgets:
    kv_device: int
    kv_host: int
    prompts: int


def plan_budgets(settings: FarmSettings, share: HostShare, resident: int, default: Budgets) -> Budgets:
    """The engine's budgets with the host tier capped by this worker's share of host memory, and
    each budget named in the settings (alone or with others) taking its place."""
    room = max(share.share - resident - PROCESS_OVERHEAD, 0)
    planned = Budgets(default.kv_device, min(default.kv_host, room), default.prompts)
    mib = 1 << 20
    return Budgets(
        settings.kv_device_budget_mb * mib if settings.kv_device_budget_mb is not None else planned.kv_device,
        settings.kv_host_budget_mb * mib if settings.kv_host_budget_mb is not None else planned.kv_host,
        settings.prompt_cache_mb * mib if settings.prompt_cache_mb is not None else planned.prompts,
    )


def apply_budgets(engine: RenderEngine, settings: FarmSettings, share: HostShare | None = None) -> Budgets:
    """Set the loaded engine's cache budgets (nothing is cached yet) and log why they are what they are."""
    share = share or HostShare.measure(settings)
    resident = host_resident_bytes(engine.pipeline)
    kv = engine.kv_cache
    default = Budgets(kv.device_tier.budget, kv.host_tier.budget, engine.prompt_cache.budget)
    budgets = plan_budgets(settings, share, resident, default)
    from kleinfarm.worker.engine import CacheBudgets

    engine.set_budgets(CacheBudgets(kv_device=budgets.kv_device, kv_host=budgets.kv_host, prompts=budgets.prompts))
    log.info(
        "host memory: %.1f GiB (%s) / %d worker(s) = %.1f GiB each; weights in host memory %.1f GiB; "
        "budgets: K/V device %.1f GiB, K/V host %.1f GiB, prompts %.2f GiB",
        *(share.total / GIB, share.source, share.workers, share.share / GIB, resident / GIB),
        *(budgets.kv_device / GIB, budgets.kv_host / GIB, budgets.prompts / GIB),
    )
    if resident + PROCESS_OVERHEAD > share.share:
        log.warning(
            "this worker's share of host memory (%.1f GiB) is below its weights in host memory plus %d GiB: "
            "give it more memory or set KLEINFARM_HOST_WORKERS to the workers really sharing it",
            share.share / GIB,
            PROCESS_OVERHEAD // GIB,
        )
    return budgets
