"""Prompt embeddings kept across jobs, so a bulk edit that repeats one prompt encodes it once."""

from __future__ import annotations

from collections import OrderedDict

import torch

from kleinfarm.shared.records import PromptCacheReport


class PromptCache:
    """Prompt -> embeddings on the render device (one engine: one model and encoder setting); LRU
    within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def used(self) -> int:
        # A snapshot: the heartbeat thread reads this while the encoding thread adds entries.
        return sum(tensor.nbytes for tensor in list(self.entries.values()))

    def get(self, key: str) -> torch.Tensor | None:
        tensor = self.entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: str, embeddings: torch.Tensor) -> None:
        if embeddings.nbytes > self.budget:
            return
        self.entries[key] = embeddings
        while self.used > self.budget:
            self.entries.popitem(last=False)

    def peek(self, key: str) -> bool:
        """Whether ``key`` is held, without counting a hit or a miss."""
        return key in self.entries

    def clear(self) -> None:
        self.entries.clear()

    def report(self) -> PromptCacheReport:
        """Hit/miss counters and bytes held against the budget (for the registry and metrics)."""
        return PromptCacheReport(hits=self.hits, misses=self.misses, bytes=self.used, budget=self.budget)
