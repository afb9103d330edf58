"""Prompt embeddings, encoded ahead: the prompts of the jobs a worker already holds are encoded
while the current job denoises, so on a campaign whose prompts differ (the usual case) a new prompt
costs the render nothing.

Every encode runs on one thread, in the order asked, so a look-ahead encode and the running job's
own never meet inside the (streamed) text encoder; on CUDA that thread uses a stream of its own,
so the encoder's copies and kernels run beside the denoise. A job whose prompt is being encoded
waits for that encode rather than starting a second one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch

from kleinfarm.worker.engine.prompt_cache import PromptCache

# How a job's prompt embeddings were had: already cached, encoded ahead, or encoded for it now.
PromptSource = Literal["cached", "ahead", "encoded"]
Encode = Callable[[str], torch.Tensor]


class PromptEncoder:
    """The prompt cache in front of one encoding thread."""

    def __init__(self, encode: Encode, cache: PromptCache, device: torch.device) -> None:
        self._encode = encode
        self.cache = cache
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-encoder")
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[torch.Tensor]] = {}
        self._ahead: set[str] = set()  # encoded ahead and not yet asked for: its job reports "ahead"
        self.encoded_ahead = 0

    def start(self, prompt: str) -> None:
        """Start encoding the running job's own prompt (while its references are fetched), first."""
        with self._lock:
            if prompt not in self._inflight and not self.cache.peek(prompt):
                self._inflight[prompt] = self._executor.submit(self._encode_and_keep, prompt)

    def ahead(self, prompts: Iterable[str]) -> int:
        """Start encoding the prompts of later jobs not cached nor under way; return how many."""
        started = 0
        with self._lock:
            for prompt in prompts:
                if prompt in self._inflight or self.cache.peek(prompt):
                    continue
                self._inflight[prompt] = self._executor.submit(self._encode_and_keep, prompt)
                self._ahead.add(prompt)
                self.encoded_ahead += 1
                started += 1
        return started

    def get(self, prompt: str) -> tuple[torch.Tensor, PromptSource]:
        """The prompt's embeddings, and whether they were cached, encoded ahead or encoded now."""
        with self._lock:
            ahead = prompt in self._ahead
            self._ahead.discard(prompt)
            cached = self.cache.get(prompt)
            if cached is not None:
                return self._for_this_stream(cached), "ahead" if ahead else "cached"
            future = self._inflight.get(prompt)
            source: PromptSource = "ahead" if future is not None else "encoded"
            if future is None:
                future = self._inflight[prompt] = self._executor.submit(self._encode_and_keep, prompt)
        return self._for_this_stream(future.result()), source

    def clear(self) -> None:
        """Wait for the encodes under way (they hold the card), then drop every embedding."""
        self._executor.submit(lambda: None).result()
        with self._lock:
            self.cache.clear()
            self._ahead.clear()

    def _encode_and_keep(self, prompt: str) -> torch.Tensor:
        try:
            if self.stream is None:
                embeddings = self._encode(prompt)
            else:
                with torch.cuda.stream(self.stream):
                    embeddings = self._encode(prompt)
                self.stream.synchronize()  # this thread waits for its kernels, the render never does
            with self._lock:
                self.cache.put(prompt, embeddings)
            return embeddings
        finally:
            with self._lock:
                self._inflight.pop(prompt, None)

    def _for_this_stream(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.stream is not None:
            # Made on the encoder's stream: its memory must not be reused while this stream reads it.
            embeddings.record_stream(torch.cuda.current_stream(self.device))
        return embeddings
