"""fp8 compute for the transformer's blocks: weights and activations in float8 (e4m3), products
accumulated by the tensor cores in higher precision (``torch._scaled_mm``).

diffusers' layerwise casting (the ``rtx4090`` profile's default, ``KLEINFARM_FP8=storage``) keeps
the weights as fp8 to halve their memory and upcasts each layer to bf16 before using it: memory
saved, time lost (1.17 s against 0.64 s for a 1024 px generate on an H100). Cards with fp8 tensor
cores (Ada, Hopper, Blackwell) can instead multiply in fp8 (1,320-1,370 against 720-815 TFLOP/s on
the transformer's shapes, measured). Each block's linear layers become ``Fp8Linear``: the weight
scaled per output row into e4m3's range once, the activation per token row at each call.
The embedders and the output projection stay in bf16. ``kleinfarm bench fp8`` reports the latents'
error against bf16 for both ways, on the same random weights; quality with the real weights is
not measured here.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
# cuBLASLt's fp8 products want every dimension a multiple of 16: the token count is padded.
ALIGN = 16


class Fp8Linear(nn.Module):
    """``linear``, multiplying in fp8; the output in the layer's own dtype."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # One scale per output row: a row of small weights keeps its precision beside a large one.
        scale = (weight.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        # Stored (out, in) contiguous; ``.t()`` gives the column-major (in, out) operand _scaled_mm wants.
        self.register_buffer("weight_fp8", (weight / scale).to(E4M3))
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out): scales the output's columns
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        padded = -count % ALIGN
        if padded:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padded))
        # One scale per token row (what the row-wise kernel takes): an outlier token keeps to itself.
        scale = (rows.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        quantized = (rows * (1.0 / scale).to(rows.dtype)).to(E4M3)  # no fp32 copy of the activations
        out = torch._scaled_mm(
            quantized,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
        )
        return out[:count].reshape(*x.shape[:-1], self.out_features)


def use_fp8_compute(transformer: nn.Module) -> int:
    """Replace the linear layers of every transformer block; return how many were replaced."""
    replaced = 0
    for blocks_name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, blocks_name, []):
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    # cuBLASLt wants K and N multiples of 16 (the real model's are; tiny ones may not be).
                    if type(child) is nn.Linear and child.in_features % ALIGN == 0 and child.out_features % ALIGN == 0:
                        setattr(parent, name, Fp8Linear(child))
                        replaced += 1
    return replaced
