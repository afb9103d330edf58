"""A module too big to keep on the card beside the transformer, streamed from pinned host memory.

The text encoder (Qwen3-8B, 16 GB in bf16) runs once per distinct prompt. On the 24 and 32 GB
cards it stays in host memory, and each decoder layer is copied to the card just before it runs.
accelerate's ``cpu_offload`` does this from pageable memory, one layer at a time, with the card
waiting on every copy (1.5-2.8 s per prompt on an H100). Here the weights are pinned (55 against
23 GB/s measured) and the next layer is copied on a stream of its own while the current one runs.
The card holds at most two layers: before a third is copied, the host waits until the layer two
back has finished computing, so its memory is free again.

Only what the prompt embedding reads crosses the bus: the pipeline stacks the hidden states after
layers 9, 18 and 27 of 36, so layers 28-35 and the output head are dropped (their outputs were
never read), and the token embedding is looked up in host memory (512 rows of a 1.2 GB table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class StreamedModule:
    """Streams ``units`` (in the order they run) to ``device``; the rest of ``module`` lives there."""

    def __init__(self, module: nn.Module, units: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        self.units = list(units)
        streamed = {id(param) for unit in self.units for param in unit.parameters()}
        for param in module.parameters():
            if id(param) not in streamed:
                param.data = param.data.to(device)
        for owner in module.modules():
            for name, buffer in owner.named_buffers(recurse=False):
                owner._buffers[name] = buffer.to(device)
        self.host: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        for unit in self.units:
            pairs = [(param, _pinned(param.data, device)) for param in unit.parameters()]
            for param, host in pairs:
                param.data = host  # the pageable original is freed: one host copy, the pinned one
            self.host.append(pairs)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self.copied: dict[int, Any] = {}  # unit index -> the event that ends its copy (None on CPU)
        self.computed: dict[int, Any] = {}  # unit index -> the event that ends its forward pass
        self.loads = 0
        for index, unit in enumerate(self.units):
            unit.register_forward_pre_hook(self._before(index))
            unit.register_forward_hook(self._after(index))

    @property
    def unit_bytes(self) -> int:
        """The largest unit: the card holds two of them (one running, the next arriving)."""
        return max((sum(host.nbytes for _, host in unit) for unit in self.host), default=0)

    def release(self) -> None:
        """Every unit back to host memory (after a pass that raised half-way)."""
        for index in list(self.copied):
            self._unload(index)

    def _load(self, index: int) -> None:
        if index in self.copied or index >= len(self.units):
            return
        self.loads += 1
        if self.copy_stream is None:
            for param, host in self.host[index]:
                param.data = host.clone()  # a real copy on CPU too, so the hooks' work is observable
            self.copied[index] = None
            return
        if (two_back := self.computed.pop(index - 2, None)) is not None:
            two_back.synchronize()  # its memory is free again before a third unit is copied
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for param, host in self.host[index]:
                param.data = host.to(self.device, non_blocking=True)
        self.copied[index] = self.copy_stream.record_event()

    def _unload(self, index: int) -> None:
        for param, host in self.host[index]:
            param.data = host
        self.copied.pop(index, None)

    def _before(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            self._load(index)
            ready = self.copied[index]
            if ready is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(ready)
                for param, _host in self.host[index]:
                    param.data.record_stream(compute)  # made on the copy stream, read on this one
            self._load(index + 1)  # the next unit crosses the bus while this one computes

        return hook

    def _after(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            if self.copy_stream is not None:
                self.computed[index] = torch.cuda.current_stream(self.device).record_event()
            self._unload(index)

        return hook


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host copy, page-locked when it will be copied to a CUDA card."""
    host = tensor.detach().to("cpu")
    return host.pin_memory() if device.type == "cuda" else host


class _HostEmbedding(nn.Module):
    """The token embedding looked up in host memory; only the rows used cross the bus."""

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.table = embedding.weight.detach().to("cpu")
        self.device = device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids.to("cpu"), self.table)
        return rows.to(self.device, non_blocking=True)


class _NoHead(nn.Module):
    """Stands in for the output head: the prompt embedding reads hidden states, never logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def stream_text_encoder(text_encoder: Any, device: torch.device, read_layers: Sequence[int]) -> StreamedModule:
    """Stream a causal LM's decoder layers up to the last hidden state read (``read_layers``, as the
    pipeline indexes ``hidden_states``: after that many layers); embedding on the host, no head."""
    inner = text_encoder.model
    keep = max(read_layers)
    if keep < len(inner.layers):
        # hidden_states[k] is the output of layer k-1 unless it is the last, normed entry: keep one more.
        inner.layers = nn.ModuleList(list(inner.layers)[: keep + 1])
    inner.embed_tokens = _HostEmbedding(inner.embed_tokens, device)
    text_encoder.lm_head = _NoHead()
    return StreamedModule(text_encoder, list(inner.layers), device)
