"""Dequantization of GGUF tensor data to float32 torch tensors.

Each `_dequantize_*` takes the raw blocks of one ggml type as a uint8 tensor `[num_blocks, type_size]`
and returns float32 `[num_blocks, block_size]`. They follow `gguf.quants` (llama.cpp's reference in
numpy) operation for operation, so the results are bit-identical to it; types without a torch version
here fall back to `gguf.quants.dequantize`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from tokenloom.errors import GGUFFormatError

Q = GGMLQuantizationType
_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte `start` of every block, as float32 `[num_blocks, 1]`."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _dequantize_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(_f16(blocks, 0))


def _unpack_nibbles_into(out: torch.Tensor, packed: torch.Tensor, group: int) -> torch.Tensor:
    """Write low nibbles then high nibbles of each `group` bytes into `out`; returns `out` viewed
    `[n, k, 2, group]`. The uint8 -> float32 conversion happens in the copy."""
    view = out.view(packed.shape[0], -1, 2, group)
    packed = packed.reshape(packed.shape[0], -1, group)
    view[:, :, 0] = packed & 0x0F
    view[:, :, 1] = packed >> 4
    return view


def _dequantize_q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _unpack_nibbles_into(out, blocks[:, 2:], 16)
    out.sub_(8.0).mul_(_f16(blocks, 0))


def _dequantize_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _unpack_nibbles_into(out, blocks[:, 4:], 16)
    out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _five_bit_into(out: torch.Tensor, qh: torch.Tensor, qs: torch.Tensor) -> None:
    """Q5_0/Q5_1: value i = nibble i | bit i of the little-endian uint32 `qh` << 4."""
    n = qs.shape[0]
    high = (((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1) << 4).reshape(n, 2, 16)
    view = out.view(n, 2, 16)
    view[:, 0] = (qs & 0x0F) | high[:, 0]
    view[:, 1] = (qs >> 4) | high[:, 1]


def _dequantize_q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _five_bit_into(out, blocks[:, 2:6], blocks[:, 6:])
    out.sub_(16.0).mul_(_f16(blocks, 0))


def _dequantize_q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _five_bit_into(out, blocks[:, 4:8], blocks[:, 8:])
    out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _dequantize_q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = blocks[:, : QK_K // 16]
    qs = blocks[:, QK_K // 16 : QK_K // 16 + QK_K // 4]
    d, dmin = _f16(blocks, QK_K // 16 + QK_K // 4), _f16(blocks, QK_K // 16 + QK_K // 4 + 2)
    dl = (d * (scales & 0x0F).float()).reshape(n, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    view = out.view(n, QK_K // 16, 16)
    view.copy_(((qs.reshape(n, -1, 1, 32) >> _CRUMB_SHIFTS.view(1, 1, 4, 1)) & 3).reshape(n, QK_K // 16, 16))
    view.mul_(dl).sub_(ml)


def _dequantize_q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    hmask = blocks[:, : QK_K // 8]
    qs = blocks[:, QK_K // 8 : QK_K // 8 + QK_K // 4]
    scale_bytes = blocks[:, QK_K // 8 + QK_K // 4 : QK_K // 8 + QK_K // 4 + 12]
    d = _f16(blocks, QK_K // 8 + QK_K // 4 + 12)
    # 16 six-bit scales: low four bits in bytes 0-7 (two per byte), high two bits in bytes 8-11
    low = (scale_bytes[:, :8].reshape(n, 1, 8) >> _NIBBLE_SHIFTS.view(1, 2, 1)).reshape(n, 16) & 0x0F
    high = (scale_bytes[:, 8:].reshape(n, 1, 4) >> _CRUMB_SHIFTS.view(1, 4, 1)).reshape(n, 16) & 0x03
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = ((qs.reshape(n, -1, 1, 32) >> _CRUMB_SHIFTS.view(1, 1, 4, 1)) & 3).reshape(n, 16, QK_K // 16)
    qh = ((hmask.reshape(n, -1, 1, 32) >> _BIT_SHIFTS.view(1, 1, 8, 1)) & 1).reshape(n, 16, QK_K // 16)
    view = out.view(n, 16, QK_K // 16)
    # a set mask bit means no offset; a clear one subtracts 4
    view.copy_(ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8))
    view.mul_(dl)


def _k_scales(scale_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, `[n, 8]` each."""
    n = scale_bytes.shape[0]
    packed = scale_bytes.reshape(n, 3, 4)
    d, m, m_d = packed[:, 0], packed[:, 1], packed[:, 2]
    scales = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _k_scale_min(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: per 32-value sub-block scale d * sc and offset dmin * m, `[n, 8, 1]` each."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    dl = (_f16(blocks, 0) * scales.float()).reshape(n, 8, 1)
    ml = (_f16(blocks, 2) * mins.float()).reshape(n, 8, 1)
    return dl, ml


def _dequantize_q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    dl, ml = _k_scale_min(blocks)
    _unpack_nibbles_into(out, blocks[:, 16:], 32)
    out.view(blocks.shape[0], 8, 32).mul_(dl).sub_(ml)


def _dequantize_q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    dl, ml = _k_scale_min(blocks)
    qh = blocks[:, 16 : 16 + QK_K // 8]
    qs = blocks[:, 16 + QK_K // 8 :].reshape(n, 4, 32)
    high = (((qh.reshape(n, 1, 32) >> _BIT_SHIFTS.view(1, 8, 1)) & 1) << 4).reshape(n, 4, 2, 32)
    view = out.view(n, 4, 2, 32)
    view[:, :, 0] = (qs & 0x0F) | high[:, :, 0]
    view[:, :, 1] = (qs >> 4) | high[:, :, 1]
    out.view(n, 8, 32).mul_(dl).sub_(ml)


def _dequantize_q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    ql = blocks[:, : QK_K // 2]
    qh = blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = (
        blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16].contiguous().view(torch.int8)
    )
    dl = (_f16(blocks, QK_K // 2 + QK_K // 4 + QK_K // 16) * scales.float()).reshape(n, QK_K // 16, 1)
    low = ((ql.reshape(n, -1, 1, 64) >> _NIBBLE_SHIFTS.view(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> _CRUMB_SHIFTS.view(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    view = out.view(n, QK_K // 16, 16)
    view.copy_(((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, 16))
    view.mul_(dl)


def _dequantize_bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.view(torch.int32).copy_(blocks.contiguous().view(torch.int16).reshape(out.shape)).bitwise_left_shift_(
        16
    )


def _dequantize_f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.contiguous().view(torch.float16).reshape(out.shape))


def _dequantize_f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.contiguous().view(torch.float32).reshape(out.shape))


TORCH_DEQUANTIZERS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    Q.F32: _dequantize_f32,
    Q.F16: _dequantize_f16,
    Q.BF16: _dequantize_bf16,
    Q.Q8_0: _dequantize_q8_0,
    Q.Q4_0: _dequantize_q4_0,
    Q.Q4_1: _dequantize_q4_1,
    Q.Q5_0: _dequantize_q5_0,
    Q.Q5_1: _dequantize_q5_1,
    Q.Q2_K: _dequantize_q2_k,
    Q.Q3_K: _dequantize_q3_k,
    Q.Q4_K: _dequantize_q4_k,
    Q.Q5_K: _dequantize_q5_k,
    Q.Q6_K: _dequantize_q6_k,
}

# Blocks per chunk: bounds the temporaries of one step to a few MB so they stay in cache.
_CHUNK_BLOCKS = 1 << 14


def dequantize(raw: torch.Tensor | np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes of one tensor (uint8, as stored) -> float32 tensor of `shape` (torch order)."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise GGUFFormatError(f"unknown ggml tensor type {ggml_type}") from exc
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(raw)
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw tensor data must be uint8 bytes, got {raw.dtype}")
    if raw.numel() % type_size:
        raise GGUFFormatError(f"{qtype.name} data of {raw.numel()} bytes is not a whole number of blocks")
    blocks = raw.reshape(-1, type_size)
    function = TORCH_DEQUANTIZERS.get(qtype)
    if function is None:
        return _dequantize_numpy(blocks, qtype, shape)
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    step = _CHUNK_BLOCKS if block_size > 1 else blocks.shape[0]
    for start in range(0, blocks.shape[0], max(step, 1)):
        function(blocks[start : start + step], out[start : start + step])
    return out.reshape(shape)


def _dequantize_numpy(
    blocks: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    try:
        values = gguf_quants.dequantize(blocks.numpy(), qtype)
    except NotImplementedError as exc:
        raise GGUFFormatError(f"tensor type {qtype.name} is not supported: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def supported_types() -> list[str]:
    """Names of the ggml types this module can dequantize (torch or numpy fallback)."""
    return sorted(qtype.name for qtype in GGMLQuantizationType if _is_supported(qtype))


def _is_supported(qtype: GGMLQuantizationType) -> bool:
    if qtype in TORCH_DEQUANTIZERS:
        return True
    traits = getattr(gguf_quants, "_type_traits", {})
    return qtype in traits
