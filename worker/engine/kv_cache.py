"""Reference K/V kept across jobs, in two tiers with byte budgets: the render device, then host memory.

A reference set's K/V depend on the set alone (``docs/engine.md``, how the KV variant works), so a job whose
set is held skips the VAE encode of its references and their passes through the transformer. A
device eviction demotes to host memory (pinned on CUDA), which is far cheaper to copy back than to
recompute; a host eviction drops the entry. Both tiers evict least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kleinfarm.shared.records import KVReport, TierReport

Layers = list[tuple[torch.Tensor, torch.Tensor]]
# Where ``get`` found a key: the render device's tier, the host tier, or neither.
Lookup = Literal["device", "host", "miss"]


@dataclass
class Entry:
    """One reference set's K/V, per layer, at batch size 1."""

    double: Layers
    single: Layers
    num_ref_tokens: int
    # On CUDA, the event that ends the copy that made this entry (a demotion on the copy stream).
    ready: Any = None

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in (*self.double, *self.single))

    def map(self, move: Any) -> Entry:
        """The entry with ``move`` applied to every tensor."""
        return Entry(
            [(move(k), move(v)) for k, v in self.double],
            [(move(k), move(v)) for k, v in self.single],
            self.num_ref_tokens,
        )

    def to(self, device: torch.device) -> Entry:
        """A copy on ``device``, ordered after the copy that made this one (if it is still running)."""
        if self.ready is not None and device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(self.ready)
        return self.map(lambda tensor: tensor.to(device, non_blocking=True))


@dataclass
class CacheStats:
    hits_device: int = 0
    hits_host: int = 0
    misses: int = 0
    demotions: int = 0
    evictions: int = 0
    too_large: int = 0


@dataclass
class Tier:
    name: str
    device: torch.device
    budget: int
    entries: OrderedDict[str, Entry] = field(default_factory=OrderedDict)

    @property
    def used(self) -> int:
        return sum(entry.nbytes for entry in list(self.entries.values()))  # a snapshot (heartbeat thread)

    def holdings(self) -> dict[str, int]:
        return {key: entry.nbytes for key, entry in list(self.entries.items())}

    def report(self) -> TierReport:
        return TierReport(budget=self.budget, keys=self.holdings())


def from_diffusers(kv_cache: Any) -> Entry:
    """Take the K/V out of a ``Flux2KVCache`` built in extract mode (first batch row only).

    At batch 1 the tensors are taken as they are: diffusers stores its own copies and the job drops
    its cache object, so a second copy would only double the set's bytes at the job's peak (8 GiB
    for four 1024 px references, what ran a 24 GB card out of memory).
    """

    def first_row(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.shape[0] == 1 else tensor[:1].clone()

    double = [(first_row(c.k_ref), first_row(c.v_ref)) for c in kv_cache.double_block_caches]
    single = [(first_row(c.k_ref), first_row(c.v_ref)) for c in kv_cache.single_block_caches]
    return Entry(double, single, int(kv_cache.num_ref_tokens))


def to_diffusers(entry: Entry, batch_size: int) -> Any:
    """A ``Flux2KVCache`` for a batch of ``batch_size``, expanded along the batch dimension."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

    cache = Flux2KVCache(len(entry.double), len(entry.single))
    for layer, (k, v) in zip(cache.double_block_caches, entry.double, strict=True):
        layer.store(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
    for layer, (k, v) in zip(cache.single_block_caches, entry.single, strict=True):
        layer.store(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
    cache.num_ref_tokens = entry.num_ref_tokens
    return cache


class ReferenceKVCache:
    """Reference-set key -> K/V, device tier first, host tier behind it."""

    def __init__(self, device: torch.device, device_budget: int, host_budget: int) -> None:
        self.device_tier = Tier("device", device, device_budget)
        self.host_tier = Tier("host", torch.device("cpu"), host_budget)
        self.pin = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.pin else None  # type: ignore[no-untyped-call]
        self.stats = CacheStats()

    def get(self, key: str) -> tuple[Entry | None, Lookup]:
        """The entry on the render device, promoted from host if needed, and where it was found."""
        if key in self.device_tier.entries:
            self.device_tier.entries.move_to_end(key)
            self.stats.hits_device += 1
            return self.device_tier.entries[key], "device"
        if key in self.host_tier.entries:
            entry = self.host_tier.entries.pop(key).to(self.device_tier.device)
            self.stats.hits_host += 1
            self._admit(key, entry)
            return entry, "host"
        self.stats.misses += 1
        return None, "miss"

    def held_keys(self) -> set[str]:
        """The reference-set keys held in either tier (a lookup of any of them would hit)."""
        return set(self.device_tier.entries) | set(self.host_tier.entries)

    def put(self, key: str, entry: Entry) -> None:
        self._admit(key, entry.to(self.device_tier.device))

    def device_bytes_except(self, key: str | None) -> int:
        """Bytes the device tier holds besides ``key``'s entry."""
        return sum(nbytes for held, nbytes in self.device_tier.holdings().items() if held != key)

    def demote_oldest(self, keep: str | None = None) -> bool:
        """Move the least recently used device entry other than ``keep`` to host memory; False if none."""
        for key in self.device_tier.entries:
            if key != keep:
                entry = self.device_tier.entries.pop(key)
                self.stats.demotions += 1
                self._admit_host(key, entry)
                return True
        return False

    def free_device(self) -> None:
        """Move every device entry to host memory (after the card ran out of memory)."""
        while self.demote_oldest():
            pass

    def _admit(self, key: str, entry: Entry) -> None:
        if entry.nbytes > max(self.device_tier.budget, self.host_tier.budget):
            self.stats.too_large += 1
            return
        if entry.nbytes > self.device_tier.budget:
            self._admit_host(key, entry)
            return
        self.device_tier.entries[key] = entry
        while self.device_tier.used > self.device_tier.budget:
            old_key, old = self.device_tier.entries.popitem(last=False)
            self.stats.demotions += 1
            self._admit_host(old_key, old)

    def _admit_host(self, key: str, entry: Entry) -> None:
        if entry.nbytes > self.host_tier.budget:
            self.stats.evictions += 1
            return
        self.host_tier.entries[key] = self._to_host(entry)
        while self.host_tier.used > self.host_tier.budget:
            self.host_tier.entries.popitem(last=False)
            self.stats.evictions += 1

    def _to_host(self, entry: Entry) -> Entry:
        """A host copy; on CUDA into pinned memory on the copy stream, so the caller does not wait."""
        if self.copy_stream is None:
            return entry.to(self.host_tier.device)
        stream, compute = self.copy_stream, torch.cuda.current_stream(self.device_tier.device)
        stream.wait_stream(compute)  # the K/V were written on the compute stream

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before this copy ends
            return host

        with torch.cuda.stream(stream):
            moved = entry.map(copy)
        moved.ready = stream.record_event()
        return moved

    def report(self) -> KVReport:
        """What the worker holds, per tier, with bytes, plus hit/miss counters (for the registry)."""
        return KVReport(device=self.device_tier.report(), host=self.host_tier.report(), stats=vars(self.stats).copy())
