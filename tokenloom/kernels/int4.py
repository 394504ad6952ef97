"""Weight-only int4 matmul (L1t): y = x @ W^T, W stored as 4-bit codes q in [0, 16) in groups of
`group_size` input columns with one (scale, zero) pair per group and output row:

    w = (q - 8) * scale + zero

the convention of torch's CPU kernel and of tinygemm on CUDA. Scales and zeros are bfloat16 (the
kernels' precision), activations go in and come out as bfloat16, products are summed in float32.

The CPU kernel needs N % 16 == 0 and K % group_size == 0; `pack_int4` pads both (zero weights), and
`Int4Layout` tells the caller how much input padding to add and how many outputs to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

GROUP_SIZES = (32, 64, 128, 256)
_N_MULTIPLE = 16
# Rows packed per call: the CPU packer takes int32 codes, so packing a large matrix in one call would
# need 4 bytes per weight at once. Chunks are whole multiples of every kernel's row block (64 on
# AVX512, 32 on AVX2, 8 on CUDA), so concatenating the packed chunks gives the packed matrix.
_PACK_ROWS = 4096


@dataclass(frozen=True)
class Int4Layout:
    """Sizes of one packed matrix: the logical [out_features, in_features] and the padded kernel shape."""

    out_features: int
    in_features: int
    group_size: int

    @property
    def padded_in(self) -> int:
        return -(-self.in_features // self.group_size) * self.group_size

    @property
    def padded_out(self) -> int:
        return -(-self.out_features // _N_MULTIPLE) * _N_MULTIPLE


def _inner_k_tiles(padded_in: int) -> int:
    for tiles in (8, 4, 2):
        if padded_in % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"in_features {padded_in} is not a multiple of 32, which the CUDA int4 kernel needs")


def pack_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Int4Layout]:
    """codes uint8 [N, K] in [0, 16), scales and zeros float [N, K // group_size] -> (packed weight,
    scale_and_zeros bf16 [K' // group_size, N', 2], layout) on `device`, padded to the kernel's shape."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    out_features, in_features = codes.shape
    layout = Int4Layout(out_features, in_features, group_size)
    pad_rows, pad_cols = layout.padded_out - out_features, layout.padded_in - in_features
    num_groups = layout.padded_in // group_size
    if pad_rows or pad_cols:
        # code 8 with zero 0 is the weight 0.0, whatever the scale
        codes = torch.nn.functional.pad(codes, (0, pad_cols, 0, pad_rows), value=8)
        group_pad = num_groups - scales.shape[1]
        scales = torch.nn.functional.pad(scales, (0, group_pad, 0, pad_rows), value=1.0)
        zeros = torch.nn.functional.pad(zeros, (0, group_pad, 0, pad_rows), value=0.0)
    scale_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
    scale_and_zeros = scale_and_zeros.to(device=device, dtype=torch.bfloat16)
    if device.type == "cpu" and _cpu_block_rows():
        packed = _pack_rows(codes, device)  # uint8 ops only: no int32 staging to bound
    else:
        chunks = [_pack_rows(codes[i : i + _PACK_ROWS], device) for i in range(0, codes.shape[0], _PACK_ROWS)]
        packed = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
    return packed, scale_and_zeros, layout


def _pack_rows(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        pairs = codes.to(device=device, dtype=torch.uint8)
        nibbles = (pairs[:, ::2] << 4 | pairs[:, 1::2]).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(nibbles, _inner_k_tiles(codes.shape[1]))
    block = _cpu_block_rows()
    if block:
        return _pack_cpu_layout(codes, block).to(device)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1).to(device)


def _pack_cpu_layout(codes: torch.Tensor, block: int) -> torch.Tensor:
    """The CPU kernel's layout written with a few uint8 ops (torch's packer wants int32 codes, four
    bytes per weight, and packs them one by one): per block of `block` rows, for every input column,
    byte j holds row j in its low nibble and row j + block/2 in its high one; a last partial block
    (16, 32 or 48 rows) holds rows n and n + 1 in byte n/2 of each column."""
    rows, cols = codes.shape
    full = rows // block * block
    half = block // 2
    parts = []
    if full:
        grouped = codes[:full].view(rows // block, 2, half, cols)
        combined = grouped[:, 0] | (grouped[:, 1] << 4)  # [blocks, half, K]
        parts.append(combined.transpose(1, 2).reshape(-1))  # [blocks, K, half]
    if rows > full:
        pairs = codes[full:].view((rows - full) // 2, 2, cols)
        parts.append((pairs[:, 0] | (pairs[:, 1] << 4)).t().reshape(-1))
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).view(rows, cols // 2)


@lru_cache(maxsize=1)
def _cpu_block_rows() -> int:
    """The row block of this process's CPU kernel layout (64 with AVX512, 32 with AVX2), found by
    packing a small matrix both ways; 0 when neither matches (torch's packer is used then)."""
    probe = torch.randint(0, 16, (112, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    for block in (64, 32):
        if torch.equal(_pack_cpu_layout(probe, block), reference):
            return block
    return 0


# the direct binding where torch exposes one: a few microseconds less per call than torch.ops
_INT4_MM_CPU = getattr(torch, "_weight_int4pack_mm_for_cpu", None) or torch.ops.aten._weight_int4pack_mm_for_cpu


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x bf16 [M, K'] (contiguous, K' the padded in_features) -> bf16 [M, N'] (N' the padded out_features)."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_and_zeros)
    return _INT4_MM_CPU(x, packed, group_size, scale_and_zeros)


def unpack_codes(packed: torch.Tensor, layout: Int4Layout, device: torch.device) -> torch.Tensor:
    """The codes [N', K'] of a packed matrix, read back through the kernel itself (identity input,
    scale 1 and zero 8, so every output is a code exactly), whatever the packed layout is."""
    num_groups = layout.padded_in // layout.group_size
    unit = torch.empty(num_groups, layout.padded_out, 2, dtype=torch.bfloat16, device=device)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    eye = torch.eye(layout.padded_in, dtype=torch.bfloat16, device=device)
    return int4_mm(eye, packed, unit, layout.group_size).t().round().to(torch.uint8)  # [N', K']


def dequantize_packed(
    packed: torch.Tensor, scale_and_zeros: torch.Tensor, layout: Int4Layout
) -> torch.Tensor:
    """float32 [N, K]: the weights the kernel computes with, (q - 8) * scale + zero in float32."""
    codes = unpack_codes(packed, layout, packed.device).float()
    num_groups = layout.padded_in // layout.group_size
    grouped = codes.view(layout.padded_out, num_groups, layout.group_size)
    scales = scale_and_zeros[..., 0].t().float()[..., None]  # [N', groups, 1]
    zeros = scale_and_zeros[..., 1].t().float()[..., None]
    weight = ((grouped - 8.0) * scales + zeros).view(layout.padded_out, layout.padded_in)
    return weight[: layout.out_features, : layout.in_features]
