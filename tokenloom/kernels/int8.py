"""Weight-only int8 matmul (L1t): y = (x @ q^T) * scale, q int8 [N, K] with one scale per output row.

CPU: torch's `_weight_int8pack_mm` (bfloat16 activations and scales, float32 sums), which needs
K % 16 == 0 (other widths crash it in torch 2.13): `pack_int8` pads the codes and callers pad the
input to `padded_in(K)`. CUDA: the codes converted to the activation dtype and a plain matmul
(simple; not tuned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_K_MULTIPLE = 16


def padded_in(in_features: int) -> int:
    return -(-in_features // _K_MULTIPLE) * _K_MULTIPLE


def pack_int8(codes: torch.Tensor, scales: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int8 [N, K], scales float [N] -> (codes [N, K'] zero-padded, scales bf16 [N]) on `device`."""
    pad = padded_in(codes.shape[1]) - codes.shape[1]
    if pad:
        codes = F.pad(codes, (0, pad))
    return codes.to(device).contiguous(), scales.to(device=device, dtype=torch.bfloat16)


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x bf16 [M, K'] (contiguous) -> bf16 [M, N]."""
    if x.is_cuda:
        return F.linear(x, codes.to(x.dtype)) * scales
    return torch.ops.aten._weight_int8pack_mm(x, codes, scales)
