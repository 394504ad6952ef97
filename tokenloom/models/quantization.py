"""Weight-only quantization of Linear layers (L2): int8 per output row, int4 in groups.

Correct rather than fast: weights are stored quantized and dequantized on each forward call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """Symmetric int8 weights with one float scale per output row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups of `group_size` input columns, two values per byte.

    When in_features is not a multiple of the group size the last group is padded (by repeating the
    last column, so its range is not widened) and the padding is dropped again on dequantization.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 64) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        out_features, in_features = weight.shape
        group_size = min(group_size, in_features)
        num_groups = -(-in_features // group_size)
        padded = num_groups * group_size
        if padded != in_features:
            weight = torch.cat([weight, weight[:, -1:].expand(-1, padded - in_features)], dim=1)
        groups = weight.view(out_features, num_groups, group_size)
        low = groups.amin(dim=-1, keepdim=True)
        high = groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.uint8).view(out_features, -1)
        if q.shape[1] % 2:
            q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
        self.register_buffer("packed", q[:, 0::2] | (q[:, 1::2] << 4))  # [out, ceil(padded / 2)]
        self.register_buffer("scale", scale.to(linear.weight.dtype))  # [out, num_groups, 1]
        self.register_buffer("low", low.to(linear.weight.dtype))  # [out, num_groups, 1]
        self.bias = linear.bias
        self.group_size = group_size
        self.in_features, self.out_features = in_features, out_features

    def dequantized_weight(self) -> torch.Tensor:
        q = torch.stack((self.packed & 0xF, self.packed >> 4), dim=-1).view(self.out_features, -1)
        num_groups = self.scale.shape[1]
        q = q[:, : num_groups * self.group_size].view(self.out_features, num_groups, self.group_size)
        weight = (q.to(self.scale.dtype) * self.scale + self.low).view(self.out_features, -1)
        return weight[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def quantize_linears(model: nn.Module, bits: int, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear (except those named in `skip`) in place; returns how many."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module) if bits == 8 else Int4Linear(module))
    return len(targets)
