"""A module too big to keep on the card beside the transformer, streamed from pinned host memory.

The text encoder (Qwen3-8B, 16 GB in bf16) runs once per distinct prompt. On the 24 and 32 GB
cards it stays in host memory, and each of its units (the embedding, every decoder layer, the
output head) is copied to the card just before it runs. accelerate's ``cpu_offload`` does this
from pageable memory, one unit at a time, with the card waiting on every copy (1.5-2.8 s per prompt
on an H100). Here the weights are pinned (55 against 23 GB/s measured) and the next unit is copied
on a stream of its own while the current one runs, so the encoder costs about one pass of its
bytes over the bus. Units go back to host memory after they run: the card holds at most two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class StreamedModule:
    """Streams ``units`` of ``module`` (in the order they run) to ``device``; the rest lives there."""

    def __init__(self, module: nn.Module, units: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        self.units = list(units)
        streamed = {id(p) for unit in self.units for p in unit.parameters()}
        for param in module.parameters():
            if id(param) not in streamed:
                param.data = param.data.to(device)
        for buffer_owner in module.modules():
            for name, buffer in buffer_owner.named_buffers(recurse=False):
                buffer_owner._buffers[name] = buffer.to(device)
        self.host: list[list[tuple[nn.Parameter, torch.Tensor]]] = [
            [(param, _pinned(param.data, device)) for param in unit.parameters()] for unit in self.units
        ]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self.loaded: dict[int, Any] = {}  # unit index -> the event that ends its copy (None on CPU)
        for index, unit in enumerate(self.units):
            unit.register_forward_pre_hook(self._before(index))
            unit.register_forward_hook(self._after(index))

    @property
    def unit_bytes(self) -> int:
        """The largest unit: the card holds two of them (one running, the next arriving)."""
        return max((sum(host.nbytes for _, host in unit) for unit in self.host), default=0)

    def _load(self, index: int) -> None:
        if index in self.loaded or index >= len(self.units):
            return
        if self.copy_stream is None:
            for param, host in self.host[index]:
                param.data = host.to(self.device)
            self.loaded[index] = None
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for param, host in self.host[index]:
                param.data = host.to(self.device, non_blocking=True)
        self.loaded[index] = self.copy_stream.record_event()

    def _before(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            self._load(index)
            ready = self.loaded[index]
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
                for param, _host in self.host[index]:
                    param.data.record_stream(torch.cuda.current_stream(self.device))
            self._load(index + 1)  # the next unit crosses the bus while this one computes

        return hook

    def _after(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            for param, host in self.host[index]:
                param.data = host
            self.loaded.pop(index, None)

        return hook


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host copy, page-locked when it will be copied to a CUDA card."""
    host = tensor.detach().to("cpu")
    return host.pin_memory() if device.type == "cuda" else host


def stream_text_encoder(text_encoder: Any, device: torch.device) -> StreamedModule:
    """Stream a causal LM's embedding, decoder layers and output head; keep its norms on ``device``."""
    inner = text_encoder.model
    units = [inner.embed_tokens, *inner.layers, text_encoder.lm_head]
    return StreamedModule(text_encoder, units, device)
