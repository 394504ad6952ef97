"""llama.cpp's block formats dequantized with torch ops (L1t), for loading and for embedding rows.

Each `_dequantize_*` takes the raw blocks of one ggml type as a uint8 tensor `[num_blocks, type_size]`
and writes float32 `[num_blocks, block_size]` into `out`. They follow `gguf.quants` (llama.cpp's
reference in numpy) operation for operation, so the results are bit-identical to it. They are plain
torch ops, so they run wherever the blocks are (CPU or CUDA). On the CPU, Q8_0, Q4_0 and Q4_1 (the
default models' types) run the same arithmetic in one C pass when `cpu_decode` is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

Q = GGMLQuantizationType
_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _shifts(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table if table.device == like.device else table.to(like.device)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte `start` of every block, as float32 `[num_blocks, 1]`."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _native(blocks: torch.Tensor, out: torch.Tensor, qtype: Q):  # type: ignore[no-untyped-def]
    """The C ops when they can take these tensors (CPU, contiguous uint8 blocks of `qtype`, float32
    out of 32 values per block), else None."""
    if blocks.device.type != "cpu" or out.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or out.numel() != blocks.shape[0] * 32:
        return None
    if blocks.shape[1] != GGML_QUANT_SIZES[qtype][1]:
        return None
    if not (blocks.is_contiguous() and out.is_contiguous()):
        return None
    from tokenloom.kernels import cpu_decode

    return cpu_decode.ops()


def _dequantize_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    native = _native(blocks, out, Q.Q8_0)
    if native is not None:
        native.dequant_q8_0(blocks.data_ptr(), blocks.shape[0], out.data_ptr())
        return
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
    native = _native(blocks, out, Q.Q4_0)
    if native is not None:
        native.dequant_q4(blocks.data_ptr(), blocks.shape[0], 0, out.data_ptr())
        return
    _unpack_nibbles_into(out, blocks[:, 2:], 16)
    out.sub_(8.0).mul_(_f16(blocks, 0))


def _dequantize_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    native = _native(blocks, out, Q.Q4_1)
    if native is not None:
        native.dequant_q4(blocks.data_ptr(), blocks.shape[0], 1, out.data_ptr())
        return
    _unpack_nibbles_into(out, blocks[:, 4:], 16)
    out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _five_bit_into(out: torch.Tensor, qh: torch.Tensor, qs: torch.Tensor) -> None:
    """Q5_0/Q5_1: value i = nibble i | bit i of the little-endian uint32 `qh` << 4."""
    n = qs.shape[0]
    high = (((qh.unsqueeze(-1) >> _shifts(_BIT_SHIFTS, qh)) & 1) << 4).reshape(n, 2, 16)
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
    view.copy_(((qs.reshape(n, -1, 1, 32) >> _shifts(_CRUMB_SHIFTS, qs).view(1, 1, 4, 1)) & 3).reshape(n, QK_K // 16, 16))
    view.mul_(dl).sub_(ml)


def _dequantize_q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    hmask = blocks[:, : QK_K // 8]
    qs = blocks[:, QK_K // 8 : QK_K // 8 + QK_K // 4]
    scale_bytes = blocks[:, QK_K // 8 + QK_K // 4 : QK_K // 8 + QK_K // 4 + 12]
    d = _f16(blocks, QK_K // 8 + QK_K // 4 + 12)
    # 16 six-bit scales: low four bits in bytes 0-7 (two per byte), high two bits in bytes 8-11
    low = (scale_bytes[:, :8].reshape(n, 1, 8) >> _shifts(_NIBBLE_SHIFTS, scale_bytes).view(1, 2, 1)).reshape(n, 16) & 0x0F
    high = (scale_bytes[:, 8:].reshape(n, 1, 4) >> _shifts(_CRUMB_SHIFTS, scale_bytes).view(1, 4, 1)).reshape(n, 16) & 0x03
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = ((qs.reshape(n, -1, 1, 32) >> _shifts(_CRUMB_SHIFTS, qs).view(1, 1, 4, 1)) & 3).reshape(n, 16, QK_K // 16)
    qh = ((hmask.reshape(n, -1, 1, 32) >> _shifts(_BIT_SHIFTS, hmask).view(1, 1, 8, 1)) & 1).reshape(n, 16, QK_K // 16)
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
    high = (((qh.reshape(n, 1, 32) >> _shifts(_BIT_SHIFTS, qh).view(1, 8, 1)) & 1) << 4).reshape(n, 4, 2, 32)
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
    low = ((ql.reshape(n, -1, 1, 64) >> _shifts(_NIBBLE_SHIFTS, ql).view(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> _shifts(_CRUMB_SHIFTS, qh).view(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
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


# ---------------------------------------------------------------- affine view of the block formats
# The formats whose every group of 32 weights is w = code * scale + offset with one scale and offset
# per group (the int4 kernels take them exactly, in one or two 4-bit pieces). Each decoder returns
# codes uint8 [n, block_size], scales and offsets float32 [n, block_size // 32]; code * scale + offset
# is computed by the dequantizers above with the same float32 operations.
AFFINE_GROUP = 32


def _affine_q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.empty(blocks.shape[0], 32, dtype=torch.uint8, device=blocks.device)
    _unpack_nibbles_into(codes, blocks[:, 2:], 16)
    d = _f16(blocks, 0)
    return codes, d, -8.0 * d


def _affine_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.empty(blocks.shape[0], 32, dtype=torch.uint8, device=blocks.device)
    _unpack_nibbles_into(codes, blocks[:, 4:], 16)
    return codes, _f16(blocks, 0), _f16(blocks, 2)


def _affine_q5_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.empty(blocks.shape[0], 32, dtype=torch.uint8, device=blocks.device)
    _five_bit_into(codes, blocks[:, 2:6], blocks[:, 6:])
    d = _f16(blocks, 0)
    return codes, d, -16.0 * d


def _affine_q5_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.empty(blocks.shape[0], 32, dtype=torch.uint8, device=blocks.device)
    _five_bit_into(codes, blocks[:, 4:8], blocks[:, 8:])
    return codes, _f16(blocks, 0), _f16(blocks, 2)


def _affine_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = blocks[:, 2:] ^ 0x80  # int8 q stored as a byte: q + 128 is that byte with its top bit flipped
    d = _f16(blocks, 0)
    return codes, d, -128.0 * d


def _affine_q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dl, ml = _k_scale_min(blocks)
    codes = torch.empty(blocks.shape[0], QK_K, dtype=torch.uint8, device=blocks.device)
    _unpack_nibbles_into(codes, blocks[:, 16:], 32)
    return codes, dl[..., 0], -ml[..., 0]


def _affine_q5_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = blocks.shape[0]
    dl, ml = _k_scale_min(blocks)
    qh = blocks[:, 16 : 16 + QK_K // 8]
    qs = blocks[:, 16 + QK_K // 8 :].reshape(n, 4, 32)
    high = (((qh.reshape(n, 1, 32) >> _shifts(_BIT_SHIFTS, qh).view(1, 8, 1)) & 1) << 4).reshape(n, 4, 2, 32)
    codes = torch.empty(n, 4, 2, 32, dtype=torch.uint8, device=blocks.device)
    codes[:, :, 0] = (qs & 0x0F) | high[:, :, 0]
    codes[:, :, 1] = (qs >> 4) | high[:, :, 1]
    return codes.view(n, QK_K), dl[..., 0], -ml[..., 0]


AffineDecoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# ggml type -> (decoder, bits per code)
AFFINE_DECODERS: dict[int, tuple[AffineDecoder, int]] = {
    Q.Q4_0: (_affine_q4_0, 4),
    Q.Q4_1: (_affine_q4_1, 4),
    Q.Q4_K: (_affine_q4_k, 4),
    Q.Q5_0: (_affine_q5_0, 5),
    Q.Q5_1: (_affine_q5_1, 5),
    Q.Q5_K: (_affine_q5_k, 5),
    Q.Q8_0: (_affine_q8_0, 8),
}


def affine_rows(
    rows: torch.Tensor, qtype: int, row_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Raw rows uint8 [N, row_bytes] of an affine type -> (codes uint8 [N, K], scales and offsets
    float32 [N, K // 32], bits per code) with w = code * scale + offset in every group of 32."""
    decoder, bits = AFFINE_DECODERS[qtype]
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    codes, scales, offsets = decoder(rows.reshape(-1, type_size))
    num_rows = rows.shape[0]
    groups = row_length // AFFINE_GROUP
    return codes.reshape(num_rows, row_length), scales.reshape(num_rows, groups), offsets.reshape(num_rows, groups), bits


def dequantize_rows(rows: torch.Tensor, qtype: int, row_length: int) -> torch.Tensor:
    """Raw rows uint8 [num_rows, row_bytes] of one ggml type -> float32 [num_rows, row_length]."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    blocks = rows.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32, device=rows.device)
    TORCH_DEQUANTIZERS[qtype](blocks, out)
    return out.view(rows.shape[0], row_length)
